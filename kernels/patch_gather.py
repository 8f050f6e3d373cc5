"""Pyramid patch gathering: every level's patch of a uint8 clip, area-downsampled and normalised to [-1, 1].

Level ``l`` of ``L`` is cut from the clip downsampled by ``f = 2**(L-1-l)`` in t, h and w (or by the per-level,
per-dimension integer ``factors`` given); its box starts at ``offsets[b, l]`` (in that level's pixels) and has
the size of ``patch``. Each output value is the mean of its ``ft x fh x fw`` block of the full-resolution clip.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kernels import _triton

Factors = Sequence[Sequence[int]]


def level_factor(level: int, num_levels: int) -> int:
    """Integer downsampling factor of a level relative to the full-resolution video."""
    return 2 ** (num_levels - 1 - level)


def level_factors(num_levels: int, factors: Factors | None = None) -> list[tuple[int, int, int]]:
    """Per level, the (t, h, w) factors: ``factors`` checked, or the default ``2**(L-1-l)`` in all dims."""
    if factors is None:
        return [(level_factor(l, num_levels),) * 3 for l in range(num_levels)]
    out = [tuple(int(f) for f in fl) for fl in factors]
    if len(out) != num_levels or any(len(fl) != 3 or min(fl) < 1 for fl in out):
        raise ValueError(f"factors must be {num_levels} triples of positive ints, got {factors}")
    return out


def check_boxes(video_shape: Sequence[int], offsets: torch.Tensor, patch: Sequence[int],
                factors: list[tuple[int, int, int]]) -> None:
    """Raise ValueError naming the first level box that does not lie inside the video (offsets on CPU)."""
    f = torch.tensor(factors, dtype=torch.int64)  # [L,3]
    lo = offsets.to(torch.int64) * f
    hi = lo + torch.tensor(patch, dtype=torch.int64) * f
    bad = (lo < 0).any(-1) | (hi > torch.tensor(video_shape, dtype=torch.int64)).any(-1)  # [B,L]
    if bad.any():
        b, l = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"level {l} box {offsets[b, l].tolist()} of sample {b} lies outside the video "
                         f"{tuple(video_shape)}")


def check_offsets(video: torch.Tensor, offsets: torch.Tensor) -> None:
    """Raise ValueError unless ``offsets`` is an integer [B,L,3] tensor of the video's batch (the kernel read out of
    bounds for another batch; float offsets were truncated)."""
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"offsets must be an integer tensor, got {offsets.dtype}")
    if offsets.dim() != 3 or offsets.shape[-1] != 3 or offsets.shape[0] != video.shape[0]:
        raise ValueError(f"offsets must be [B,L,3] for the video's batch of {video.shape[0]}, got {tuple(offsets.shape)}")


def gather_pyramid_reference(video: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int],
                             dtype: torch.dtype = torch.float32, factors: Factors | None = None) -> torch.Tensor:
    """Plain-PyTorch reference. video uint8 [B,T,H,W,3], offsets int [B,L,3] -> [B,L,3,t,h,w] in ``dtype``."""
    check_offsets(video, offsets)
    B, L = offsets.shape[:2]
    pt, ph, pw = patch
    fs = level_factors(L, factors)
    check_boxes(video.shape[1:4], offsets.cpu(), patch, fs)
    offs = offsets.tolist()
    out = torch.empty(B, L, 3, pt, ph, pw, dtype=dtype, device=video.device)
    for b in range(B):
        for l in range(L):
            ft, fh, fw = fs[l]
            t0, h0, w0 = (o * f for o, f in zip(offs[b][l], fs[l]))
            crop = video[b, t0:t0 + pt * ft, h0:h0 + ph * fh, w0:w0 + pw * fw]
            crop = crop.permute(3, 0, 1, 2).float()
            if ft * fh * fw > 1:
                crop = F.avg_pool3d(crop[None], kernel_size=(ft, fh, fw))[0]
            out[b, l] = (crop / 127.5 - 1.0).to(dtype)
    return out


def gather_pyramid_fused(video: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int],
                         dtype: torch.dtype = torch.float32, factors: Factors | None = None) -> torch.Tensor:
    """The Triton kernel: all levels in one launch. Boxes are checked only when ``offsets`` is on the CPU
    (checking device offsets would synchronise); a box outside the video is then undefined behaviour."""
    if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"video must be uint8 [B,T,H,W,3], got {video.dtype} {tuple(video.shape)}")
    check_offsets(video, offsets)
    fs = level_factors(offsets.shape[1], factors)
    if not offsets.is_cuda:
        check_boxes(video.shape[1:4], offsets, patch, fs)
    return _gather_op(video, offsets, list(patch), dtype, [f for fl in fs for f in fl])


# The Triton kernel as a custom op, opaque to torch.compile (which traces the fake implementation for shapes).
@torch.library.custom_op("hpdm::gather_pyramid", mutates_args=())
def _gather_op(video: torch.Tensor, offsets: torch.Tensor, patch: list[int], dtype: torch.dtype,
               factors: list[int]) -> torch.Tensor:
    fs = [tuple(factors[i:i + 3]) for i in range(0, len(factors), 3)]
    return _triton.load("patch_gather_triton", video).gather(video, offsets, tuple(patch), dtype, fs)


@_gather_op.register_fake
def _(video, offsets, patch, dtype, factors):
    return video.new_empty((video.shape[0], offsets.shape[1], 3, *patch), dtype=dtype)


def gather_pyramid(video: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int],
                   dtype: torch.dtype = torch.float32, impl: str = "auto",
                   factors: Factors | None = None) -> torch.Tensor:
    """Gather all pyramid levels; ``impl`` is ``reference``, ``fused`` or ``auto`` (fused on GPU)."""
    if impl == "fused" or (impl == "auto" and video.is_cuda):
        return gather_pyramid_fused(video, offsets, patch, dtype, factors)
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'fused', got {impl!r}")
    return gather_pyramid_reference(video, offsets, patch, dtype, factors)
