"""Pyramid patch gathering: every level's patch of a uint8 clip, area-downsampled and normalised to [-1, 1].

Level ``l`` of ``L`` is cut from the clip downsampled by ``f = 2**(L-1-l)`` in t, h and w; its box starts at
``offsets[b, l]`` (in that level's pixels) and has the size of ``patch``. Each output value is the mean of
its ``f x f x f`` block of the full-resolution clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def level_factor(level: int, num_levels: int) -> int:
    """Integer downsampling factor of a level relative to the full-resolution video."""
    return 2 ** (num_levels - 1 - level)


def gather_pyramid_reference(video: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int],
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-PyTorch reference. video uint8 [B,T,H,W,3], offsets int [B,L,3] -> [B,L,3,t,h,w] in ``dtype``."""
    B, L = offsets.shape[:2]
    pt, ph, pw = patch
    offs = offsets.tolist()
    out = torch.empty(B, L, 3, pt, ph, pw, dtype=dtype, device=video.device)
    for b in range(B):
        for l in range(L):
            f = level_factor(l, L)
            t0, h0, w0 = (o * f for o in offs[b][l])
            crop = video[b, t0:t0 + pt * f, h0:h0 + ph * f, w0:w0 + pw * f]
            if crop.shape[:3] != (pt * f, ph * f, pw * f):
                raise ValueError(f"level {l} box {offs[b][l]} of sample {b} lies outside the video {tuple(video.shape[1:4])}")
            crop = crop.permute(3, 0, 1, 2).float()
            if f > 1:
                crop = F.avg_pool3d(crop[None], kernel_size=f)[0]
            out[b, l] = (crop / 127.5 - 1.0).to(dtype)
    return out


def gather_pyramid(video: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int],
                   dtype: torch.dtype = torch.float32, impl: str = "auto") -> torch.Tensor:
    """Gather all pyramid levels; ``impl`` is ``reference``, ``fused`` or ``auto`` (fused on GPU)."""
    if impl == "fused" or (impl == "auto" and video.is_cuda):
        raise NotImplementedError("the fused patch-gathering kernel is not built yet; use impl='reference'")
    return gather_pyramid_reference(video, offsets, patch, dtype)
