"""Stops a run that cannot learn: a non-finite loss, or optimizer steps that DeepSpeed keeps skipping.

The loss is checked without a device sync per step: non-finite steps are counted on the device and the count is
read at log steps and before every save, so a checkpoint never holds diverged weights.
"""
from __future__ import annotations

import math

import torch

from hpdm.errors import DivergenceError

CAUSES = ("a learning rate too high for this model and batch (train.lr; a longer train.warmup_steps helps), "
          "too little gradient clipping (train.grad_clip), or bf16 overflow (train.precision=fp32)")


class DivergenceGuard:
    def __init__(self, max_skipped: int, device: torch.device, skipped_before: int = 0):
        self.max_skipped = max_skipped
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int64)
        self.skipped_total, self.skipped_in_row, self._seen = 0, 0, skipped_before
        self.last_finite: tuple[int, float] | None = None

    def step(self, level_losses: torch.Tensor, skipped_steps: int, step: int) -> None:
        """After each optimizer step: the per-level losses and DeepSpeed's ``engine.skipped_steps``."""
        self.nonfinite += (~torch.isfinite(level_losses)).any()
        new = skipped_steps - self._seen
        self._seen = skipped_steps
        self.skipped_total += new
        self.skipped_in_row = self.skipped_in_row + new if new else 0
        if self.skipped_in_row > self.max_skipped:
            self._stop(step, f"DeepSpeed skipped the last {self.skipped_in_row} optimizer steps (non-finite gradients; "
                             f"train.max_skipped_steps={self.max_skipped})")

    def check(self, step: int, loss: float | None = None) -> None:
        """At log steps (with the mean loss) and before saves: raise if any loss since the last check was not finite."""
        if self.nonfinite.item() or (loss is not None and not math.isfinite(loss)):
            self._stop(step, "the loss is not finite")
        if loss is not None:
            self.last_finite = (step, loss)

    def _stop(self, step: int, what: str) -> None:
        last = (f"the last finite loss was {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
                if self.last_finite else "no finite loss was logged")
        raise DivergenceError(f"training diverged by step {step}: {what}; {last}. The newest checkpoint holds weights "
                              f"from before it. Likely causes: {CAUSES}")
