"""Triton kernel for pyramid patch gathering: one launch writes every level of every sample.

One program makes one output row (sample b, level l, patch row t, h; a block of ``BLOCK_W`` columns) for all
three channels. The level's integer factors are compile-time constants (the kernel branches on the level over a
tuple of per-level factors), so each output pixel's ``fw`` RGB triples are one contiguous run of ``3*fw`` bytes:
the tile is [BLOCK_W, SPAN] bytes with SPAN = next_pow2(3*fw), accumulated in fp32 over the ``ft*fh`` input
rows (exact: at most 255 * 512 per sum) and split into channels once at the end. Programs are numbered
sample-major, so the finer levels of a sample re-read bytes its coarser levels just pulled into L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import MANUAL_BF16_ROUNDING, to_output


@triton.jit
def _level_row(video_ptr, off_ptr, out_ptr, b, l, t, h, wblk, T, H, W,
               L: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
               FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, SPAN: tl.constexpr, BLOCK_W: tl.constexpr,
               ROUND: tl.constexpr):
    ob = off_ptr + (b * L + l) * 3
    t0 = tl.load(ob).to(tl.int64)
    h0 = tl.load(ob + 1).to(tl.int64)
    w0 = tl.load(ob + 2).to(tl.int64)
    w = wblk * BLOCK_W + tl.arange(0, BLOCK_W)
    j = tl.arange(0, SPAN)
    col = (w0 * FW) * 3 + (w * (3 * FW))[:, None] + j[None, :]
    mask = (w < PW)[:, None] & (j < 3 * FW)[None, :]
    acc = tl.zeros([BLOCK_W, SPAN], dtype=tl.float32)
    for dt in range(FT):
        tt = (t0 + t) * FT + dt
        for dh in range(FH):
            hh = (h0 + h) * FH + dh
            row = ((b.to(tl.int64) * T + tt) * H + hh) * W * 3
            acc += tl.load(video_ptr + row + col, mask=mask, other=0).to(tl.float32)
    out_row = out_ptr + ((b * L + l) * 3 * PT + t) * (PH * PW) + h * PW + w
    chan = (j % 3)[None, :]
    for c in tl.static_range(3):
        s = tl.sum(tl.where(chan == c, acc, 0.0), axis=1)
        v = tl.math.div_rn(tl.math.div_rn(s, FT * FH * FW * 1.0), 127.5) - 1.0  # as the reference rounds
        tl.store(out_row + c * (PT * PH * PW), to_output(v, out_ptr.dtype.element_ty, ROUND), mask=w < PW)


@triton.jit
def _gather_kernel(video_ptr, off_ptr, out_ptr, T, H, W,
                   L: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   FACTORS: tl.constexpr, SPANS: tl.constexpr, BLOCK_W: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)  # ((b * L + l) * PT + t) * PH + h
    h = pid % PH
    t = (pid // PH) % PT
    l = (pid // (PH * PT)) % L
    b = pid // (PH * PT * L)
    wblk = tl.program_id(1)
    for lv in tl.static_range(L):
        if l == lv:
            _level_row(video_ptr, off_ptr, out_ptr, b, l, t, h, wblk, T, H, W, L, PT, PH, PW,
                       FACTORS[lv][0], FACTORS[lv][1], FACTORS[lv][2], SPANS[lv], BLOCK_W, ROUND)


def gather(video: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int], dtype: torch.dtype,
           factors: list[tuple[int, int, int]]) -> torch.Tensor:
    """Launch the kernel; see ``kernels.patch_gather.gather_pyramid_reference`` for the semantics."""
    B, T, H, W, _ = video.shape
    L = offsets.shape[1]
    pt, ph, pw = patch
    video = video.contiguous()
    offsets = offsets.to(device=video.device, dtype=torch.int32, non_blocking=True).contiguous()
    out = torch.empty(B, L, 3, pt, ph, pw, dtype=dtype, device=video.device)
    block_w = min(64, triton.next_power_of_2(pw))
    spans = tuple(triton.next_power_of_2(3 * fw) for _, _, fw in factors)
    grid = (B * L * pt * ph, triton.cdiv(pw, block_w))
    _gather_kernel[grid](video, offsets, out, T, H, W, L, pt, ph, pw, tuple(factors), spans, block_w,
                         MANUAL_BF16_ROUNDING, num_warps=4)
    return out
