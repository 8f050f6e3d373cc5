import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

import hpdm.layers
from hpdm.config import load_config
from hpdm.flops import activation_bytes, forward_flops_per_level, state_bytes
from hpdm.model import HPDM
from hpdm.pyramid import boxes_from_offsets, sample_offsets
from tests.helpers import tiny_model_config


def _math_attention(q, k, v, mask=None):
    """Attention as explicit matmuls, so that FlopCounterMode sees its FLOPs on CPU."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_analytic_flops_match_counted(monkeypatch):
    monkeypatch.setattr(hpdm.layers, "attention", _math_attention)
    cfg = tiny_model_config(context_fusion="none")
    model = HPDM(cfg)
    per_level = forward_flops_per_level(cfg)
    boxes = boxes_from_offsets(sample_offsets(1, cfg.levels, cfg.patch), cfg.patch)
    for L in range(1, cfg.levels + 1):
        with FlopCounterMode(display=False) as fc:
            model(torch.randn(1, L, 3, *cfg.patch), torch.randn(1, L), boxes[:, :L], torch.tensor([0]))
        counted, analytic = fc.get_total_flops(), sum(per_level[:L])
        # the analytic model leaves out the per-sample conditioning MLPs and modulations (a few % at this tiny size)
        assert 0.9 < analytic / counted <= 1.0, (L, analytic, counted)


def test_analytic_flops_match_counted_for_a_text_model(monkeypatch):
    """Caption tokens are read beside the data tokens (padding included, masked)."""
    monkeypatch.setattr(hpdm.layers, "attention", _math_attention)
    cfg = tiny_model_config(context_fusion="none", cond="text", text_dim=48, text_tokens=24)
    boxes = boxes_from_offsets(sample_offsets(1, cfg.levels, cfg.patch), cfg.patch)
    text, mask = torch.randn(1, 24, 48), torch.arange(24)[None] < 10
    with FlopCounterMode(display=False) as fc:
        HPDM(cfg)(torch.randn(1, cfg.levels, 3, *cfg.patch), torch.randn(1, cfg.levels), boxes, None, text, mask)
    analytic = sum(forward_flops_per_level(cfg))
    assert 0.9 < analytic / fc.get_total_flops() <= 1.0, (analytic, fc.get_total_flops())
    assert analytic > sum(forward_flops_per_level(tiny_model_config(context_fusion="none")))


def _saved_on_cpu(cfg, B: int) -> int:
    """Bytes of the distinct storages that a real CPU training forward keeps for backward (weights left out)."""
    model = HPDM(cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    boxes = boxes_from_offsets(sample_offsets(B, cfg.levels, cfg.patch), cfg.patch)
    text = torch.randn(B, cfg.text_tokens, cfg.text_dim) if cfg.cond == "text" else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(B, cfg.levels, 3, *cfg.patch), torch.randn(B, cfg.levels), boxes, torch.zeros(B).long(), text)
    return sum(kept.values())


def test_memory_estimate_is_what_a_real_forward_saves():
    """``hpdm info``'s activation memory (meta tensors) equals what autograd keeps in a real CPU forward, whose
    SDPA is a fused kernel as on the GPU (no attention matrix saved); views of one tensor count once."""
    for cfg in (tiny_model_config(), tiny_model_config(cond="text", text_dim=12, text_tokens=6),
                tiny_model_config(levels_per_block=(3, 3, 3, 3), token_conv=0, pixel_head=0)):
        for B in (1, 3):
            assert activation_bytes(cfg, B) == _saved_on_cpu(cfg, B), (cfg, B)


def test_memory_estimate_with_checkpointing_and_state():
    """Checkpointing keeps less than the full activations but at least the largest block; state per parameter."""
    cfg = tiny_model_config()
    full, ckpt = activation_bytes(cfg, 1), activation_bytes(cfg, 1, checkpointed=True)
    assert 0 < ckpt < full
    assert activation_bytes(cfg, 2, checkpointed=True) > ckpt
    assert state_bytes(10, "fp32") == {"weights": 40, "gradients": 40, "optimizer": 80}
    assert state_bytes(10, "bf16") == {"weights": 20, "gradients": 20, "optimizer": 120}


def test_info_estimates_the_kernels_a_gpu_runs(capsys):
    """`hpdm info` is for GPU runs, where `model.kernels: auto` takes the fused kernels; it estimated with the
    references, whose saved tensors differ (1.5 % more for HPDM-S)."""
    from hpdm.info import print_info, size

    cfg = load_config("configs/tiny.yaml", ["train.micro_batch=2"])
    fused, reference = (activation_bytes(dataclasses.replace(cfg.model, kernels=k), 2) for k in ("fused", "reference"))
    assert fused != reference
    print_info(cfg)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "activation memory" in ln)
    assert size(fused) in line and size(fused) != size(reference) and "fused kernels" in line
