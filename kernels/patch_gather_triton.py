"""Triton kernel for pyramid patch gathering: one launch writes every level of every sample.

The clip is read as 32-bit words, not bytes. A level with width factor ``fw`` is cut into groups of ``G`` output
pixels whose ``3*fw*G`` input bytes per row are a whole number ``WG`` of words (``G = 4 / gcd(fw, 4)``: 4
pixels at fw 1, 2 at fw 2, 1 from fw 4 on), so a tile [ROWS, groups, words] covers ``ROWS`` output rows of one
patch frame with one 4-byte load per word. A run that starts inside a word (the box's offset, or rows of
``3*W`` bytes that are not a multiple of 4) is realigned by a funnel shift of two neighbouring words; levels
where no run can start inside a word skip that second load at compile time. Over the ``fh`` rows of an input
frame the words are summed two bytes at a time in the 16-bit lanes of two uint32 (exact for fh <= 256), then
into four int32 accumulators per byte position, and split into output pixels and channels once at the end by
where each byte sits in its group.

Each level has its own tile shape (the tuple ``TILES``); programs are numbered sample-major and, within a
sample, level by level, so the finer levels of a sample re-read bytes its coarser levels just pulled into L2.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_utils import MANUAL_BF16_ROUNDING, to_output

SLOTS = 1024  # words per tile (ROWS * BLOCK_G * next_pow2(WG)): 8 per thread at 4 warps


@triton.jit
def _holds(q, j, u: tl.constexpr, c: tl.constexpr, FW: tl.constexpr, WG: tl.constexpr):
    """[1, 1, WGP] mask: byte ``q`` of its group (word ``j``) is channel ``c`` of the group's output pixel ``u``."""
    return (((q // 3) // FW == u) & (q % 3 == c) & (j < WG))[None, None, :]


@triton.jit
def _level_tile(words_ptr, nwords, off_ptr, out_ptr, b, l, local, T, H, W,
                L: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, G: tl.constexpr, WG: tl.constexpr,
                WGP: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr, SHIFTS: tl.constexpr,
                ROUND: tl.constexpr):
    NGB: tl.constexpr = (PW + G * BLOCK_G - 1) // (G * BLOCK_G)
    NHB: tl.constexpr = (PH + ROWS - 1) // ROWS
    gblk = local % NGB
    hblk = (local // NGB) % NHB
    t = local // (NGB * NHB)
    ob = off_ptr + (b * L + l) * 3
    t0 = tl.load(ob).to(tl.int64)
    h0 = tl.load(ob + 1).to(tl.int64)
    w0 = tl.load(ob + 2).to(tl.int64)
    h = hblk * ROWS + tl.arange(0, ROWS)
    g = gblk * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, WGP)
    group_byte = ((w0 * FW + g * (G * FW)) * 3)[None, :, None] + 4 * j[None, None, :]  # [1, BLOCK_G, WGP]
    # a last group that is only partly inside the box reads bytes past it (kept inside the clip by `nwords`);
    # the pixels they make are not stored
    valid = (h < PH)[:, None, None] & (g * G < PW)[None, :, None] & (j < WG)[None, None, :]
    a0 = tl.zeros([ROWS, BLOCK_G, WGP], dtype=tl.int32)
    a1 = tl.zeros([ROWS, BLOCK_G, WGP], dtype=tl.int32)
    a2 = tl.zeros([ROWS, BLOCK_G, WGP], dtype=tl.int32)
    a3 = tl.zeros([ROWS, BLOCK_G, WGP], dtype=tl.int32)
    for dt in range(FT):
        tt = (t0 + t) * FT + dt
        even = tl.zeros([ROWS, BLOCK_G, WGP], dtype=tl.uint32)  # bytes 0 and 2 of each word, in 16-bit lanes
        odd = tl.zeros([ROWS, BLOCK_G, WGP], dtype=tl.uint32)  # bytes 1 and 3 (exact for fh <= 256)
        for dh in range(FH):
            hh = (h0 + h) * FH + dh
            byte = (((b.to(tl.int64) * T + tt) * H + hh) * (W * 3))[:, None, None] + group_byte
            wi = byte // 4
            word = tl.load(words_ptr + wi, mask=valid & (wi < nwords), other=0).to(tl.uint32, bitcast=True)
            if SHIFTS:
                shift = (byte % 4).to(tl.uint32) * 8  # the same for a whole row: its runs are multiples of 4
                hi = tl.load(words_ptr + wi + 1, mask=valid & (shift != 0) & (wi + 1 < nwords), other=0)
                word = tl.where(shift == 0, word, (word >> shift) | (hi.to(tl.uint32, bitcast=True) << (32 - shift)))
            even += word & 0x00FF00FF
            odd += (word >> 8) & 0x00FF00FF
        a0 += (even & 0xFFFF).to(tl.int32)
        a1 += (odd & 0xFFFF).to(tl.int32)
        a2 += (even >> 16).to(tl.int32)
        a3 += (odd >> 16).to(tl.int32)
    out_frame = out_ptr + (b * L + l) * 3 * PT * PH * PW + t * PH * PW
    for u in tl.static_range(G):
        w = g * G + u
        store_mask = (h < PH)[:, None] & (w < PW)[None, :]
        for c in tl.static_range(3):
            s = tl.sum(tl.where(_holds(4 * j, j, u, c, FW, WG), a0, 0)
                       + tl.where(_holds(4 * j + 1, j, u, c, FW, WG), a1, 0)
                       + tl.where(_holds(4 * j + 2, j, u, c, FW, WG), a2, 0)
                       + tl.where(_holds(4 * j + 3, j, u, c, FW, WG), a3, 0), axis=2)
            v = tl.math.div_rn(tl.math.div_rn(s.to(tl.float32), FT * FH * FW * 1.0), 127.5) - 1.0  # as the reference
            ptr = out_frame + c * PT * PH * PW + h[:, None] * PW + w[None, :]
            tl.store(ptr, to_output(v, out_ptr.dtype.element_ty, ROUND), mask=store_mask)


@triton.jit
def _gather_kernel(words_ptr, nwords, off_ptr, out_ptr, T, H, W,
                   L: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   FACTORS: tl.constexpr, TILES: tl.constexpr, STARTS: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)
    per_sample: tl.constexpr = STARTS[L]
    b = pid // per_sample
    r = pid % per_sample
    for lv in tl.static_range(L):
        if (r >= STARTS[lv]) & (r < STARTS[lv + 1]):
            _level_tile(words_ptr, nwords, off_ptr, out_ptr, b, lv, r - STARTS[lv], T, H, W, L, PT, PH, PW,
                        FACTORS[lv][0], FACTORS[lv][1], FACTORS[lv][2],
                        TILES[lv][0], TILES[lv][1], TILES[lv][2], TILES[lv][3], TILES[lv][4], TILES[lv][5], ROUND)


def level_tile(patch: tuple[int, int, int], fw: int, width: int) -> tuple[int, int, int, int, int, bool]:
    """(G, WG, next_pow2(WG), ROWS, BLOCK_G, SHIFTS) for a level of width factor ``fw`` in a video ``width``
    pixels wide: about ``SLOTS`` words a tile; SHIFTS unless every run starts on a word."""
    _, ph, pw = patch
    group = 4 // math.gcd(fw, 4)
    wg = 3 * fw * group // 4
    wgp = triton.next_power_of_2(wg)
    block_g = min(triton.next_power_of_2(triton.cdiv(pw, group)), max(1, SLOTS // wgp))
    rows = min(triton.next_power_of_2(ph), max(1, SLOTS // (wgp * block_g)))
    return group, wg, wgp, rows, block_g, (3 * width) % 4 != 0 or fw % 4 != 0


def level_starts(patch: tuple[int, int, int], tiles) -> tuple[int, ...]:
    """Each level's first program within a sample, and the programs per sample last."""
    pt, ph, pw = patch
    starts = [0]
    for group, _, _, rows, block_g, _ in tiles:
        starts.append(starts[-1] + pt * triton.cdiv(ph, rows) * triton.cdiv(pw, group * block_g))
    return tuple(starts)


def gather(video: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int], dtype: torch.dtype,
           factors: list[tuple[int, int, int]]) -> torch.Tensor:
    """Launch the kernel; see ``kernels.patch_gather.gather_pyramid_reference`` for the semantics."""
    B, T, H, W, _ = video.shape
    L = offsets.shape[1]
    pt, ph, pw = patch
    if max(fh for _, fh, _ in factors) > 256:
        raise ValueError(f"the fused gather sums at most 256 rows per frame in 16 bits: height factors {factors}")
    flat = video.contiguous().view(-1)
    if flat.numel() % 4 or flat.data_ptr() % 4:  # read as whole, aligned words
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 4)])
    words = flat.view(torch.int32)
    offsets = offsets.to(device=video.device, dtype=torch.int32, non_blocking=True).contiguous()
    out = torch.empty(B, L, 3, pt, ph, pw, dtype=dtype, device=video.device)
    tiles = tuple(level_tile(patch, fw, W) for _, _, fw in factors)
    starts = level_starts(patch, tiles)
    _gather_kernel[(B * starts[-1],)](words, words.numel(), offsets, out, T, H, W, L, pt, ph, pw, tuple(factors),
                                      tiles, starts, MANUAL_BF16_ROUNDING, num_warps=4)
    return out
