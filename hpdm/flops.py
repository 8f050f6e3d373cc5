"""Analytic cost model of HPDM: matmul FLOPs per sample and level, and activation memory of a micro-batch.

FLOPs count 2 per multiply-add of every matrix product (linear layers and attention); element-wise work and
the per-sample conditioning MLPs are left out (well under 1 % at the paper's sizes). Training costs three
forward passes (forward, and backward for inputs and weights). The MFU that the trainer reports uses these.
"""
from __future__ import annotations

import math

import torch

from hpdm.config import ModelConfig


def _layer(n_q: int, n_kv: int, dim: int, ctx_dim: int, inner: int, mlp_hidden: int) -> int:
    """One ResidualLayer over n_q query tokens attending to n_kv context tokens."""
    proj = 2 * n_q * dim * inner * 2 + 2 * n_kv * ctx_dim * 2 * inner  # q and out; k and v
    attn = 2 * 2 * n_q * n_kv * inner  # scores and weighted sum
    return proj + attn + 2 * n_q * dim * mlp_hidden * 2


def block_flops(cfg: ModelConfig) -> int:
    """One RIN block for one sample of one level."""
    N, M, D, Z = math.prod(cfg.token_grid), cfg.num_latents, cfg.token_dim, cfg.latent_dim
    S = cfg.text_tokens if cfg.cond == "text" else 0  # caption tokens, read beside the data tokens (padding too)
    read = _layer(M, N + S, Z, D, Z, int(Z * cfg.mlp_ratio))
    latent = _layer(M, M, Z, Z, Z, int(Z * cfg.mlp_ratio))
    write = _layer(N, M, D, Z, D, int(D * cfg.data_mlp_ratio))
    conv = 2 * N * D * (cfg.token_conv ** 3 + D) if cfg.token_conv else 0  # depthwise taps + projection
    return conv + read + cfg.latent_layers * latent + write


def forward_flops_per_level(cfg: ModelConfig) -> list[int]:
    """Forward FLOPs of one sample, per level: tokenizer, the blocks that run the level, de-tokenizer, and the
    context projections and resampling that the level's fusion needs."""
    N, D = math.prod(cfg.token_grid), cfg.token_dim
    pixels = 3 * math.prod(cfg.patchify)
    out = []
    for level in range(cfg.levels):
        blocks = [b for b, n in enumerate(cfg.levels_per_block) if n > level]
        fl = 2 * 2 * N * pixels * D + len(blocks) * block_flops(cfg)
        if cfg.cond == "text":  # the caption tokens' projection to the data-token width
            fl += 2 * cfg.text_tokens * cfg.text_dim * D
        if level > 0 and cfg.context_fusion != "none":
            fused = blocks if cfg.context_fusion == "deep" else blocks[:1]
            # projection of the next-coarser level (each coarse level is projected once per block) + trilinear taps
            fl += len(fused) * (2 * N * D * D + 2 * 8 * level * N * D)
        out.append(fl)
    return out


def training_flops_per_sample(cfg: ModelConfig) -> int:
    return 3 * sum(forward_flops_per_level(cfg))


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per top-level component, and per layer kind inside the blocks."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = f"blocks.{parts[2]}" if parts[0] == "blocks" else parts[0]
        counts[key] = counts.get(key, 0) + p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def activation_bytes(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes that autograd saves for backward in one training forward of a micro-batch (run on meta tensors).

    An upper bound: two views of one tensor count twice."""
    from hpdm.model import HPDM  # noqa: PLC0415
    from hpdm.pyramid import boxes_from_offsets, sample_offsets  # noqa: PLC0415

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # weights are not activations
            saved[id(t)] = t.numel() * t.element_size()
        return t

    boxes = boxes_from_offsets(sample_offsets(micro_batch, cfg.levels, cfg.patch), cfg.patch)
    with torch.device("meta"):
        model = HPDM(cfg).to(dtype)
        x = torch.empty(micro_batch, cfg.levels, 3, *cfg.patch, dtype=dtype)
        labels = torch.zeros(micro_batch, dtype=torch.long)
        text = torch.zeros(micro_batch, cfg.text_tokens, cfg.text_dim, dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, torch.zeros(micro_batch, cfg.levels, dtype=dtype), boxes.to("meta", dtype), labels, text)
    return sum(saved.values())
