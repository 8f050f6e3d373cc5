"""train.activation_checkpointing: blocks recomputed in backward give the same loss and gradients, keep far
fewer activations, stay out of sampling, and work through `hpdm train`."""
import json

import pytest
import torch

import hpdm.model
from hpdm.config import DiffusionConfig, TrainConfig, config_differences, load_config
from hpdm.diffusion import EDM, Condition
from hpdm.flops import activation_bytes
from hpdm.model import HPDM
from hpdm.pyramid import boxes_from_offsets, sample_offsets
from tests.helpers import randomize, run_hpdm, tiny_model_config

B = 2


def _batch(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, cfg.levels, 3, *cfg.patch, generator=g) * 2 - 1
    boxes = boxes_from_offsets(sample_offsets(B, cfg.levels, cfg.patch, g), cfg.patch)
    edm = EDM(DiffusionConfig())
    sigma = edm.sample_sigma(B, cfg.levels, "cpu", g)
    return edm, x0, boxes, sigma, torch.randn(x0.shape, generator=g)


def _loss_and_grads(model: HPDM, checkpointed: bool, labels=None) -> tuple[torch.Tensor, dict]:
    model.checkpoint_blocks = checkpointed
    model.zero_grad(set_to_none=True)
    edm, x0, boxes, sigma, noise = _batch(model.cfg)
    loss, _ = edm.loss(model, x0, boxes, Condition(labels=labels), sigma, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion,cond", [("deep", "class"), ("shallow", "class"), ("none", "none")])
def test_same_loss_and_gradients(fusion, cond):
    model = randomize(HPDM(tiny_model_config(context_fusion=fusion, cond=cond)))
    labels = torch.tensor([1, -1]) if cond == "class" else None
    loss, grads = _loss_and_grads(model, False, labels)
    loss_c, grads_c = _loss_and_grads(model, True, labels)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and any("fuse" in n for n in grads) == (fusion != "none")
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=0, atol=1e-6, msg=n)


def _kept_bytes(model: HPDM, checkpointed: bool, monkeypatch) -> int:
    """Activation bytes a training forward keeps for backward: what autograd saves (as hpdm/flops.py counts it)
    plus, with checkpointing, the inputs that each checkpointed block keeps alive for its recompute."""
    kept: dict[int, torch.Tensor] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            kept[id(t)] = t

    def pack(t):
        keep(t)
        return t

    def recording_checkpoint(fn, *args, **kwargs):
        for a in args:
            for t in a if isinstance(a, (list, tuple)) else [a]:
                keep(t)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(hpdm.model, "checkpoint", recording_checkpoint)
    model.checkpoint_blocks = checkpointed
    edm, x0, boxes, sigma, noise = _batch(model.cfg)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = edm.loss(model, x0, boxes, Condition(labels=torch.tensor([0, 1])), sigma, noise)
    total = sum(t.numel() * t.element_size() for t in kept.values())
    loss.backward()  # the graph is still whole: recompute works after the measurement
    return total


def test_saved_activations_at_least_halved(monkeypatch):
    model = randomize(HPDM(tiny_model_config()))
    full, ckpt = _kept_bytes(model, False, monkeypatch), _kept_bytes(model, True, monkeypatch)
    assert ckpt * 2 <= full, (full, ckpt)
    # the analytic estimate of `hpdm info` agrees on the direction
    assert activation_bytes(model.cfg, B, checkpointed=True) < activation_bytes(model.cfg, B)


def test_not_used_when_sampling_or_without_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(hpdm.model, "checkpoint", lambda *a, **k: calls.append(1))
    cfg = tiny_model_config()
    model = HPDM(cfg)
    model.checkpoint_blocks = True
    _, x0, boxes, sigma, _ = _batch(cfg)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        model(x0, sigma.log() / 4, boxes, labels)
        ctx = model.coarse_context(x0[:, :2], sigma[:, :2].log() / 4, boxes[:, :2], labels)
        model.forward_level(x0[:, 2:], sigma[:, 2:].log() / 4, boxes, ctx, labels)
    assert not calls


def test_config_key_validated_and_free_to_change_on_resume():
    with pytest.raises(ValueError, match="^train.activation_checkpointing: must be true or false; got 1$"):
        TrainConfig(activation_checkpointing=1).validate()
    on = load_config("configs/tiny.yaml", ["train.activation_checkpointing=true"])
    off = load_config("configs/tiny.yaml")
    assert on.train.activation_checkpointing and not off.train.activation_checkpointing
    assert config_differences(json.loads(json.dumps(off.to_dict())), on.to_dict()) == []  # as saved


OVERRIDES = ["train.steps=2", "train.log_every=1", "train.batch_size=4", "train.warmup_steps=2",
             "train.sample_at_end=false", "data.synthetic_videos=12", "data.shuffle_buffer=8", "diffusion.steps=2"]


@pytest.mark.slow
def test_train_cli_matches_without_checkpointing(tmp_path):
    data, losses = tmp_path / "data", {}
    for on in (False, True):
        run = tmp_path / f"run_{on}"
        out = run_hpdm("train", "--config", "configs/tiny.yaml", f"train.run_dir={run}", f"data.shards={data}",
                       *OVERRIDES, f"train.activation_checkpointing={str(on).lower()}")
        assert "done: step 2" in out
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 2
    # no random numbers are drawn inside a block, so the recompute changes nothing: the same losses exactly
    assert losses[True] == losses[False], losses
