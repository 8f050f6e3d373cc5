"""Exponential moving average of the weights, with its half-life counted in training samples (as in EDM).

Under ZeRO-3 each rank holds only a shard of every parameter; the update gathers the full parameters for its
duration, so every rank's EMA is the EMA of the full weights.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


def full_parameters(model: nn.Module):
    """Context in which ``model``'s parameters are whole, also when ZeRO-3 partitions them."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed  # noqa: PLC0415

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class EMA:
    """fp32 shadow copy of the parameters. The half-life ramps up with training (``rampup`` x samples seen)."""

    def __init__(self, model: nn.Module, halflife_samples: float, rampup: float = 0.05):
        self.halflife, self.rampup = halflife_samples, rampup
        with full_parameters(model):
            self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int, samples_seen: int) -> None:
        halflife = min(self.halflife, samples_seen * self.rampup) if self.rampup else self.halflife
        beta = 0.5 ** (batch_size / max(halflife, 1e-8))
        with full_parameters(model):
            named = list(model.named_parameters())  # one multi-tensor lerp: a launch per tensor cost ms on a GPU
            torch._foreach_lerp_([self.shadow[n] for n, _ in named], [p.detach().float() for _, p in named], 1 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))
