"""Pyramid geometry: nested patch boxes per level, and their normalised coordinates.

Level ``l`` of ``L`` lives at resolution ``patch * 2**l`` (level 0 is the whole video, downsampled). A box is
integer-aligned at its level's resolution; the box of level ``l`` covers ``2 * patch`` pixels of level
``l + 1``, and the child box is placed uniformly at random inside it: ``o[l+1] = 2 * o[l] + u`` with ``u``
uniform in ``{0, ..., patch}`` per dimension.
"""
from __future__ import annotations

import torch


def sample_offsets(batch: int, levels: int, patch: tuple[int, int, int],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random nested boxes: int64 [B, L, 3] offsets (t, h, w) in each level's own pixels."""
    size = torch.tensor(patch, dtype=torch.int64)
    offsets = torch.zeros(batch, levels, 3, dtype=torch.int64)
    for l in range(1, levels):
        u = (torch.rand(batch, 3, generator=generator) * (size + 1)).long().clamp_max(size)
        offsets[:, l] = 2 * offsets[:, l - 1] + u
    return offsets


def level_resolution(level: int, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(p * 2 ** level for p in patch)


def boxes_from_offsets(offsets: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, L, 6] boxes (t0, h0, w0, t1, h1, w1) in normalised full-video coordinates [0, 1]."""
    levels = offsets.shape[1]
    res = torch.tensor([level_resolution(l, patch) for l in range(levels)], dtype=torch.float64)  # [L,3]
    lo = offsets.double() / res
    hi = (offsets.double() + torch.tensor(patch, dtype=torch.float64)) / res
    return torch.cat([lo, hi], dim=-1).float()

