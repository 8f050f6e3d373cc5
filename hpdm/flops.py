"""Analytic cost model of HPDM: matmul FLOPs per sample and level; activation memory of a micro-batch (with and
without activation checkpointing) and the memory of weights, gradients and optimizer state.

FLOPs count 2 per multiply-add of every matrix product (linear layers, attention and convolutions); element-wise
work and the per-sample conditioning MLPs are left out (well under 1 % at the paper's sizes). Training costs three
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
        if cfg.pixel_head:  # two 3x3 convolutions per pixel: [output, input] -> hidden -> 3 channels
            fl += 2 * math.prod(cfg.patch) * 9 * (6 + 3) * cfg.pixel_head
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


def _saved_bytes(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype) -> tuple[int, list[int], int]:
    """One training forward of a micro-batch on meta tensors: bytes autograd saves outside the blocks, bytes it
    saves inside each block (``HPDM._run_block``, context fusion included), and the blocks' distinct inputs."""
    from hpdm.model import HPDM  # noqa: PLC0415
    from hpdm.pyramid import boxes_from_offsets, sample_offsets  # noqa: PLC0415

    outside: dict[int, torch.Tensor] = {}
    per_block: list[dict[int, torch.Tensor]] = [{} for _ in cfg.levels_per_block]
    inputs: dict[int, torch.Tensor] = {}
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # weights are not activations
            (outside if current[0] is None else per_block[current[0]])[id(t)] = t  # kept: ids stay unique
        return t

    boxes = boxes_from_offsets(sample_offsets(micro_batch, cfg.levels, cfg.patch), cfg.patch)
    with torch.device("meta"):
        model = HPDM(cfg).to(dtype)
        run = model._run_block

        def run_block(b, h, z, cond, boxes, active, text):  # noqa: ANN001, ANN202
            for t in [*h, *z, cond, boxes, *(text or ())]:
                if t._base is None or not isinstance(t._base, torch.nn.Parameter):  # not the shared latents
                    inputs[id(t)] = t
            current[0] = b
            try:
                return run(b, h, z, cond, boxes, active, text)
            finally:
                current[0] = None

        model._run_block = run_block
        x = torch.empty(micro_batch, cfg.levels, 3, *cfg.patch, dtype=dtype)
        labels = torch.zeros(micro_batch, dtype=torch.long)
        text = torch.zeros(micro_batch, cfg.text_tokens, cfg.text_dim, dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, torch.zeros(micro_batch, cfg.levels, dtype=dtype), boxes.to("meta", dtype), labels, text)

    def size(ts: dict[int, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts.values())
    return size(outside), [size(d) for d in per_block], size(inputs)


def activation_bytes(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype = torch.float32,
                     checkpointed: bool = False) -> int:
    """Bytes of activations that one training forward of a micro-batch keeps for backward (activations only).

    Without checkpointing: every tensor autograd saves. With ``train.activation_checkpointing``: what is saved
    outside the blocks, every block's inputs, and the largest block's saved tensors (alive while that block is
    recomputed in backward). An upper bound: two views of one tensor count twice."""
    outside, per_block, inputs = _saved_bytes(cfg, micro_batch, dtype)
    return outside + (inputs + max(per_block) if checkpointed else sum(per_block))


def state_bytes(parameters: int, precision: str) -> dict[str, int]:
    """Weights, gradients and optimizer state of one process without ZeRO partitioning: weights and gradients in
    the training dtype; AdamW and LAMB keep two fp32 moments (8 bytes/parameter), and bf16 adds fp32 master
    weights (4 bytes/parameter). ZeRO-1 divides the optimizer state by the number of processes, ZeRO-2 also the
    gradients, ZeRO-3 also the weights."""
    width = 2 if precision == "bf16" else 4
    return {"weights": width * parameters, "gradients": width * parameters,
            "optimizer": (8 + (4 if precision == "bf16" else 0)) * parameters}
