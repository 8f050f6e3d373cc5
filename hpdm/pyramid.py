"""Pyramid geometry: nested patch boxes per level, and their normalised coordinates.

Level ``l`` of ``L`` lives at resolution ``patch * 2**l`` (level 0 is the whole video, downsampled). A box is
integer-aligned at its level's resolution; the box of level ``l`` covers ``2 * patch`` pixels of level
``l + 1``, and the child box is placed uniformly at random inside it: ``o[l+1] = 2 * o[l] + u`` with ``u``
uniform in ``{0, ..., patch}`` per dimension.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant tensor on ``device``, made once: per-step callers then copy nothing from the host."""
    return torch.tensor(values, dtype=dtype, device=device)


def sample_offsets(batch: int, levels: int, patch: tuple[int, int, int],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random nested boxes: int64 [B, L, 3] offsets (t, h, w) in each level's own pixels, drawn on the
    generator's device (the CPU without one)."""
    device = generator.device if generator is not None else torch.device("cpu")
    size = _constant(tuple(patch), torch.int64, device)
    offsets = torch.zeros(batch, levels, 3, dtype=torch.int64, device=device)
    for l in range(1, levels):
        u = (torch.rand(batch, 3, generator=generator, device=device) * (size + 1)).long().clamp_max(size)
        offsets[:, l] = 2 * offsets[:, l - 1] + u
    return offsets


def level_resolution(level: int, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(p * 2 ** level for p in patch)


def boxes_from_offsets(offsets: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, L, 6] boxes (t0, h0, w0, t1, h1, w1) in normalised full-video coordinates [0, 1], on the offsets'
    device."""
    levels = offsets.shape[1]
    res = _constant(tuple(level_resolution(l, patch) for l in range(levels)), torch.float64, offsets.device)  # [L,3]
    lo = offsets.double() / res
    hi = (offsets.double() + _constant(tuple(patch), torch.float64, offsets.device)) / res
    return torch.cat([lo, hi], dim=-1).float()

