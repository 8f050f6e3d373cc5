"""torch.compile (issue 11): the fused kernels are custom ops with fake implementations and autograd, so the whole
model traces without a graph break, and `train.compile=true` trains like eager."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel module is first imported (lazily)

import pytest  # noqa: E402

from hpdm.config import ConfigError, load_config  # noqa: E402
from hpdm.model import HPDM  # noqa: E402
from hpdm.pyramid import boxes_from_offsets, sample_offsets  # noqa: E402
from kernels.context_fusion import _fusion_op  # noqa: E402
from kernels.patch_gather import _gather_op  # noqa: E402
from kernels.token_conv import _conv_op, _weight_grad_op  # noqa: E402
from tests.helpers import randomize, run_hpdm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_custom_ops_pass_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of the ops, against their real outputs."""
    g = torch.Generator().manual_seed(0)
    patch = (2, 3, 5)
    boxes = boxes_from_offsets(sample_offsets(2, 3, patch, g), patch).to(DEVICE)
    x = torch.randn(2, *patch, 8, generator=g).to(DEVICE).requires_grad_()
    ctx = torch.randn(2, 2, 2, 3, 5, 8, generator=g).to(DEVICE).requires_grad_()
    results = [torch.library.opcheck(_fusion_op, (x, ctx, boxes[:, -1], boxes[:, :-1]))]
    video = torch.randint(0, 256, (2, 8, 12, 20, 3), dtype=torch.uint8, generator=g).to(DEVICE)
    offsets = sample_offsets(2, 3, patch, g).to(DEVICE)
    results.append(torch.library.opcheck(_gather_op, (video, offsets, list(patch), torch.float32, [4, 4, 4, 2, 2, 2, 1, 1, 1])))
    tokens = torch.randn(2, 2 * 3 * 5, 8, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(8, 1, 3, 3, 3, generator=g).to(DEVICE).requires_grad_()
    for bias in (torch.randn(8, generator=g).to(DEVICE).requires_grad_(), None):
        results.append(torch.library.opcheck(_conv_op, (tokens, weight, bias, list(patch), False)))
    results.append(torch.library.opcheck(_weight_grad_op, (tokens.detach(), torch.randn_like(tokens), list(patch), 3)))
    for result in results:
        assert set(result) >= {"test_schema", "test_faketensor", "test_autograd_registration"}, result
        assert set(result.values()) == {"SUCCESS"}, result


def _model_case(kernels: str):
    cfg = load_config("configs/tiny.yaml", [f"model.kernels={kernels}", "model.patch=[2,8,8]",
                                            "model.levels_per_block=[1,2,3,3]"]).model
    net = randomize(HPDM(cfg), std=0.2).to(DEVICE)  # no zero-initialised layers: every path carries gradients
    g = torch.Generator().manual_seed(1)
    offsets = sample_offsets(2, 3, tuple(cfg.patch), g)
    args = (torch.randn(2, 3, 3, *cfg.patch, generator=g), torch.randn(2, 3, generator=g),
            boxes_from_offsets(offsets, tuple(cfg.patch)), torch.tensor([1, -1]))
    return net, [a.to(DEVICE) for a in args]


def _forward_backward(net, args):
    net.zero_grad()
    out = net(*args)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def test_the_model_with_fused_kernels_compiles_as_one_graph():
    """The failure of issue 11 (a Triton kernel reached through a lazy import broke Dynamo): with the kernels as
    custom ops, fullgraph=True traces forward and backward, and AOT autograd's graph gives eager's numbers."""
    net, args = _model_case("fused")
    eager = _forward_backward(net, args)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    got = _forward_backward(compiled, args)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the gradient reached the context projections through the custom op's backward
    fuse = [g for n, g in zip(dict(net.named_parameters()), got[1]) if ".fuse." in n]
    assert fuse and all(g.abs().sum() > 0 for g in fuse)


def test_the_model_with_fused_kernels_matches_the_references():
    """Gathering aside (the model receives its pyramid), every fused kernel in the network, context fusion and the
    token convolution, against the references: same output and parameter gradients."""
    results = [_forward_backward(*_model_case(kernels)) for kernels in ("fused", "reference")]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_options_are_checked():
    with pytest.raises(ConfigError, match=r"train.compile: not with train.zero_stage 3"):
        load_config("configs/tiny.yaml", ["train.compile=true", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"train.compile_mode: must be one of default, reduce-overhead"):
        load_config("configs/tiny.yaml", ["train.compile_mode=fast"])
    with pytest.raises(ConfigError, match=r"train.compile: must be true or false"):
        load_config("configs/tiny.yaml", ["train.compile=yes please"])


@pytest.mark.slow
def test_train_compile_gives_eager_losses(tmp_path):
    """`hpdm train train.compile=true` (inductor): the same losses as eager within float rounding, two steps (the
    second after an optimizer step through the compiled backward)."""
    data, losses = tmp_path / "data", {}
    for on in (False, True):
        run = tmp_path / f"run_{on}"
        out = run_hpdm("train", "--config", "configs/tiny_1level.yaml", f"train.run_dir={run}", f"data.shards={data}",
                       "train.steps=2", "train.log_every=1", "train.batch_size=4", "train.sample_at_end=false",
                       "train.sample_every=0", "data.synthetic_videos=8", "data.shuffle_buffer=8",
                       f"train.compile={str(on).lower()}", timeout=900)
        assert "done: step 2" in out
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4), losses
