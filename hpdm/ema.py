"""Exponential moving average of the weights, with its half-life counted in training samples (as in EDM)."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """fp32 shadow copy of the parameters. The half-life ramps up with training (``rampup`` x samples seen)."""

    def __init__(self, model: nn.Module, halflife_samples: float, rampup: float = 0.05):
        self.halflife, self.rampup = halflife_samples, rampup
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int, samples_seen: int) -> None:
        halflife = min(self.halflife, samples_seen * self.rampup) if self.rampup else self.halflife
        beta = 0.5 ** (batch_size / max(halflife, 1e-8))
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - beta)

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
