"""Analytic cost model of HPDM: matmul FLOPs per sample and level; activation memory of a micro-batch (with and
without activation checkpointing) and the memory of weights, gradients and optimizer state.

FLOPs count 2 per multiply-add of every matrix product (linear layers, attention and convolutions); element-wise
work and the per-sample conditioning MLPs are left out (well under 1 % at the paper's sizes). Training costs three
forward passes (forward, and backward for inputs and weights). The MFU that the trainer reports uses these.
"""
from __future__ import annotations

import dataclasses

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


def training_flops_per_sample(cfg: ModelConfig, levels: int | None = None) -> int:
    """Forward and backward FLOPs of one sample over its ``levels`` coarsest levels (default: all)."""
    return 3 * sum(forward_flops_per_level(cfg)[:levels])


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per top-level component, and per layer kind inside the blocks."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = f"blocks.{parts[2]}" if parts[0] == "blocks" else parts[0]
        counts[key] = counts.get(key, 0) + p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a fused kernel (flash, memory-efficient, cuDNN) runs it: autograd saves q, k, v, the output and
    the row log-sum-exp, not the attention matrix that meta tensors' math path would keep."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # as SDPA hands a boolean mask to its kernels
        attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                      attn_mask=attn_mask, scale=scale)[0]


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


Tensors = dict[int, torch.Tensor]


def _saved_tensors(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype) -> tuple[Tensors, list[Tensors], Tensors]:
    """One training forward of a micro-batch on meta tensors: what autograd saves outside the blocks, what it
    saves inside each block (``HPDM._run_block``, context fusion included), and the blocks' inputs; by identity
    of the whole tensor (a saved view keeps the tensor it views alive). Attention runs as a fused kernel."""
    from unittest import mock  # noqa: PLC0415

    from hpdm.model import HPDM  # noqa: PLC0415

    outside: Tensors = {}
    per_block: list[Tensors] = [{} for _ in cfg.levels_per_block]
    inputs: Tensors = {}
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        root = _root(t)
        if not isinstance(root, torch.nn.Parameter):  # weights are not activations
            (outside if current[0] is None else per_block[current[0]])[id(root)] = root  # kept: ids stay unique
        return t

    with torch.device("meta"), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa):
        boxes = torch.zeros(micro_batch, cfg.levels, 6)  # shapes only: a real tensor took 24 bytes a sample and level
        model = HPDM(cfg).to(dtype)
        run = model._run_block

        def run_block(b, h, z, cond, boxes, active, text):  # noqa: ANN001, ANN202
            for t in [*h, *z, cond, boxes, *(text or ())]:
                if not isinstance(_root(t), torch.nn.Parameter):  # not the shared latents
                    inputs[id(_root(t))] = _root(t)
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
    return outside, per_block, inputs


def _size(*parts: Tensors) -> int:
    """Bytes of the distinct tensors in ``parts``."""
    return sum(t.numel() * t.element_size() for t in {k: t for d in parts for k, t in d.items()}.values())


def as_on_gpu(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as a GPU runs it: ``model.kernels: auto`` takes the fused kernels there, which save slightly other
    tensors for backward than the references that a CPU (and a meta-tensor forward) runs (1.5 % less for HPDM-S)."""
    return dataclasses.replace(cfg, kernels="fused") if cfg.kernels == "auto" else cfg


def activation_bytes(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype = torch.float32,
                     checkpointed: bool = False) -> int:
    """Bytes of activations that one training forward of a micro-batch keeps for backward (activations only).

    Without checkpointing: every tensor autograd saves. With ``train.activation_checkpointing``: what is saved
    outside the blocks, every block's inputs, and the largest block's saved tensors (alive while that block is
    recomputed in backward). Each tensor counts once, however many views of it are saved."""
    outside, per_block, inputs = _saved_tensors(cfg, micro_batch, dtype)
    if not checkpointed:
        return _size(outside, *per_block)
    kept = {**outside, **inputs}
    return _size(kept) + max(_size({k: t for k, t in d.items() if k not in kept}) for d in per_block)


def state_bytes(parameters: int, precision: str) -> dict[str, int]:
    """Weights, gradients and optimizer state of one process without ZeRO partitioning: weights and gradients in
    the training dtype; AdamW and LAMB keep two fp32 moments (8 bytes/parameter), and bf16 adds fp32 master
    weights (4 bytes/parameter). ZeRO-1 divides the optimizer state by the number of processes, ZeRO-2 also the
    gradients, ZeRO-3 also the weights."""
    width = 2 if precision == "bf16" else 4
    return {"weights": width * parameters, "gradients": width * parameters,
            "optimizer": (8 + (4 if precision == "bf16" else 0)) * parameters}
