"""Triton kernels for deep context fusion, forward and a deterministic backward. They are called through the
custom ops of ``kernels/context_fusion.py``, which give them autograd and fake implementations for torch.compile.

Trilinear resampling at a regular grid of token centres is separable: per sample b, coarse level k and
dimension, fine index i reads coarse cells ``i0 = floor(ix)`` and ``i0 + 1`` (clamped) with weights ``1 - frac``
and ``frac``. A tiny kernel computes these per-axis tables once (fp32, grid_sample's align_corners=False and
border conventions); forward and backward both read them, so they agree exactly on which cells a token uses.

Along w the resampling of a whole token row is a small matrix: W[i, c], the weight with which fine column i
reads coarse column c (at most two per row), built in registers from the tables. Forward: one program per
(b, fine row t, h; a block of channels) multiplies, per coarse level, each of the 4 coarse rows at its t and h
corners by W (``tl.dot``; contiguous row loads, no per-column gathers). Backward is gather-style, with no
atomics, hence bitwise deterministic: ``ix`` is monotone in ``i``, so the fine indices that touch coarse cell c
along an axis form a contiguous range [lo[c], hi[c]) (counted in the table kernel); one program per
(b, k, coarse row t, h; channel block) sums, in a fixed order, the gradient rows of exactly those fine rows,
each times W transposed, and writes each grad_ctx value once. Accumulation is fp32 throughout (the products
as three TF32 matrix products, fp32-accurate); bf16 inputs are read as bf16 and results rounded once on store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import MANUAL_BF16_ROUNDING, to_output

# fp32 accuracy from the matrix units: three TF32 products (plain TF32 would put errors of 1e-3 into gradients
# that the reference computes in fp32)
DOT_PRECISION = "tf32x3"


@triton.jit
def _table_kernel(box_ptr, cbox_ptr, idx_ptr, frac_ptr, lo_ptr, hi_ptr, K,
                  NT, NH, NW, CT, CH, CW, NMAX: tl.constexpr, CMAX: tl.constexpr):
    pid = tl.program_id(0)  # (b * K + k) * 3 + dim
    dim = pid % 3
    bk = pid // 3
    b = bk // K
    n = tl.where(dim == 0, NT, tl.where(dim == 1, NH, NW))
    size = tl.where(dim == 0, CT, tl.where(dim == 1, CH, CW))
    lo = tl.load(box_ptr + b * 6 + dim)
    hi = tl.load(box_ptr + b * 6 + 3 + dim)
    clo = tl.load(cbox_ptr + bk * 6 + dim)
    chi = tl.load(cbox_ptr + bk * 6 + 3 + dim)
    i = tl.arange(0, NMAX)
    u = tl.math.div_rn(i.to(tl.float32) + 0.5, n.to(tl.float32))
    pos = lo + u * (hi - lo)
    g = tl.math.div_rn(pos - clo, chi - clo) * 2.0 - 1.0  # grid_sample coordinate in [-1, 1]
    ix = tl.math.div_rn((g + 1.0) * size.to(tl.float32) - 1.0, 2.0)
    ix = tl.minimum(tl.maximum(ix, 0.0), (size - 1).to(tl.float32))  # border padding
    i0f = tl.floor(ix)
    i0 = i0f.to(tl.int32)
    tl.store(idx_ptr + pid * NMAX + i, i0, mask=i < n)
    tl.store(frac_ptr + pid * NMAX + i, ix - i0f, mask=i < n)
    c = tl.arange(0, CMAX)
    valid = (i < n)[None, :]
    below = valid & (i0[None, :] < c[:, None] - 1)
    upto = valid & (i0[None, :] <= c[:, None])
    tl.store(lo_ptr + pid * CMAX + c, tl.sum(below.to(tl.int32), axis=1), mask=c < size)
    tl.store(hi_ptr + pid * CMAX + c, tl.sum(upto.to(tl.int32), axis=1), mask=c < size)


@triton.jit
def _forward_kernel(x_ptr, ctx_ptr, out_ptr, idx_ptr, frac_ptr, K, NT, NH, NW, CT, CH, CW, D,
                    NMAX: tl.constexpr, NWP: tl.constexpr, CWP: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)  # (b * NT + t) * NH + h
    ih = pid % NH
    it = (pid // NH) % NT
    b = pid // (NH * NT)
    iw = tl.arange(0, NWP)
    cw = tl.arange(0, CWP)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, :]
    cmask = (cw < CW)[:, None] & dmask
    acc = tl.zeros([NWP, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        tab = (b * K + k) * 3 * NMAX
        t0 = tl.load(idx_ptr + tab + it)
        ft = tl.load(frac_ptr + tab + it)
        h0 = tl.load(idx_ptr + tab + NMAX + ih)
        fh = tl.load(frac_ptr + tab + NMAX + ih)
        # [NWP, CWP]: the weight with which fine column iw reads coarse column cw (the backward's, transposed)
        ww = _axis_weight(idx_ptr + tab + 2 * NMAX, frac_ptr + tab + 2 * NMAX, iw[:, None], cw[None, :],
                          (iw < NW)[:, None])
        base = ctx_ptr + (b * K + k).to(tl.int64) * CT * CH * CW * D
        for a in tl.static_range(2):
            ct = t0 if a == 0 else tl.minimum(t0 + 1, CT - 1)
            wt = 1.0 - ft if a == 0 else ft
            for c in tl.static_range(2):
                ch = h0 if c == 0 else tl.minimum(h0 + 1, CH - 1)
                wth = wt * (1.0 - fh if c == 0 else fh)
                row = tl.load(base + ((ct * CH + ch) * CW + cw)[:, None] * D + d[None, :], mask=cmask, other=0.0)
                acc = tl.dot(ww * wth, row.to(tl.float32), acc, input_precision=PRECISION)
    offs = (pid.to(tl.int64) * NW + iw)[:, None] * D + d[None, :]
    mask = (iw < NW)[:, None] & dmask
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_output(x + acc / K, out_ptr.dtype.element_ty, ROUND), mask=mask)


@triton.jit
def _axis_weight(idx_ptr, frac_ptr, i, cell, mask):
    """Weight with which fine index ``i`` reads coarse ``cell`` along one axis (0 where it does not)."""
    i0 = tl.load(idx_ptr + i, mask=mask, other=-2)
    fr = tl.load(frac_ptr + i, mask=mask, other=0.0)
    return tl.where(i0 == cell, 1.0 - fr, tl.where(i0 + 1 == cell, fr, 0.0))


@triton.jit
def _backward_kernel(g_ptr, gctx_ptr, idx_ptr, frac_ptr, lo_ptr, hi_ptr, K, NT, NH, NW, CT, CH, CW, D,
                     NMAX: tl.constexpr, CMAX: tl.constexpr, NWP: tl.constexpr, CWP: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)  # (bk * CT + ct) * CH + ch
    ch = pid % CH
    ct = (pid // CH) % CT
    bk = pid // (CH * CT)
    b = bk // K
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, :]
    it_lo = tl.load(lo_ptr + bk * 3 * CMAX + ct)
    it_hi = tl.load(hi_ptr + bk * 3 * CMAX + ct)
    ih_lo = tl.load(lo_ptr + (bk * 3 + 1) * CMAX + ch)
    ih_hi = tl.load(hi_ptr + (bk * 3 + 1) * CMAX + ch)
    tab = bk * 3 * NMAX
    # [CWP, NWP]: the weight with which fine column iw reads coarse column cw; a fine row's gradient times this
    # matrix is what that row gives to a coarse row, so the w axis is one small matrix product per fine row.
    cw = tl.arange(0, CWP)
    iw = tl.arange(0, NWP)
    ww = _axis_weight(idx_ptr + tab + 2 * NMAX, frac_ptr + tab + 2 * NMAX, iw[None, :], cw[:, None],
                      (iw < NW)[None, :])
    gmask = (iw < NW)[:, None] & dmask
    acc = tl.zeros([CWP, BLOCK_D], dtype=tl.float32)
    for it in range(it_lo, it_hi):
        wt = _axis_weight(idx_ptr + tab, frac_ptr + tab, it, ct, True)
        for ih in range(ih_lo, ih_hi):
            wth = wt * _axis_weight(idx_ptr + tab + NMAX, frac_ptr + tab + NMAX, ih, ch, True)
            grow = ((b * NT + it) * NH + ih).to(tl.int64) * NW
            g = tl.load(g_ptr + (grow + iw)[:, None] * D + d[None, :], mask=gmask, other=0.0)
            acc = tl.dot(ww * wth, g.to(tl.float32), acc, input_precision=PRECISION)
    offs = (pid.to(tl.int64) * CW + cw)[:, None] * D + d[None, :]
    tl.store(gctx_ptr + offs, to_output(acc / K, gctx_ptr.dtype.element_ty, ROUND), mask=(cw < CW)[:, None] & dmask)


def _tiles(fine_w: int, coarse_w: int, D: int) -> tuple[int, int, int]:
    """(fine, coarse row tile, BLOCK_D): rows padded to tl.dot's smallest tile, 16; up to 128 channels."""
    return (max(16, triton.next_power_of_2(fine_w)), max(16, triton.next_power_of_2(coarse_w)),
            max(16, min(triton.next_power_of_2(D), 128)))


def axis_tables(box: torch.Tensor, ctx_boxes: torch.Tensor, fine: tuple[int, int, int],
                coarse: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Per (b, k, axis): corner index int32 and fraction fp32 per fine index, and per coarse cell the range
    [lo, hi) of fine indices that read it."""
    B, K = ctx_boxes.shape[:2]
    dev = ctx_boxes.device
    nmax, cmax = triton.next_power_of_2(max(fine)), triton.next_power_of_2(max(coarse))
    idx = torch.zeros(B, K, 3, nmax, dtype=torch.int32, device=dev)
    frac = torch.zeros(B, K, 3, nmax, dtype=torch.float32, device=dev)
    lo = torch.zeros(B, K, 3, cmax, dtype=torch.int32, device=dev)
    hi = torch.zeros(B, K, 3, cmax, dtype=torch.int32, device=dev)
    _table_kernel[(B * K * 3,)](box.float().contiguous(), ctx_boxes.float().contiguous(), idx, frac, lo, hi, K,
                                *fine, *coarse, nmax, cmax, num_warps=1)
    return idx, frac, lo, hi


def fusion_forward(x: torch.Tensor, ctx: torch.Tensor, tables) -> torch.Tensor:
    B, t, h, w, D = x.shape
    K, ct, ch, cw = ctx.shape[1:5]
    idx, frac = tables[:2]
    out = torch.empty_like(x)
    nwp, cwp, block_d = _tiles(w, cw, D)
    _forward_kernel[(B * t * h, triton.cdiv(D, block_d))](x, ctx, out, idx, frac, K, t, h, w, ct, ch, cw, D,
                                                          idx.shape[-1], nwp, cwp, block_d, DOT_PRECISION,
                                                          MANUAL_BF16_ROUNDING, num_warps=4)
    return out


def fusion_backward(grad: torch.Tensor, ctx_shape, ctx_dtype: torch.dtype, tables) -> torch.Tensor:
    B, t, h, w, D = grad.shape
    K, ct, ch, cw = ctx_shape[1:5]
    idx, frac, lo, hi = tables
    gctx = torch.empty(ctx_shape, dtype=ctx_dtype, device=grad.device)
    nwp, cwp, block_d = _tiles(w, cw, D)
    _backward_kernel[(B * K * ct * ch, triton.cdiv(D, block_d))](grad, gctx, idx, frac, lo, hi, K, t, h, w,
                                                                 ct, ch, cw, D, idx.shape[-1], lo.shape[-1],
                                                                 nwp, cwp, block_d, DOT_PRECISION,
                                                                 MANUAL_BF16_ROUNDING, num_warps=4)
    return gctx


def forward(x: torch.Tensor, ctx: torch.Tensor, box: torch.Tensor, ctx_boxes: torch.Tensor) -> torch.Tensor:
    """``x + mean_k trilinear(ctx[:, k])`` (see ``kernels.context_fusion.context_fusion_reference``)."""
    x, ctx = x.contiguous(), ctx.contiguous()
    tables = axis_tables(box.to(x.device), ctx_boxes.to(x.device), tuple(x.shape[1:4]), tuple(ctx.shape[2:5]))
    return fusion_forward(x, ctx, tables)


def backward(grad: torch.Tensor, box: torch.Tensor, ctx_boxes: torch.Tensor, ctx_shape, ctx_dtype) -> torch.Tensor:
    """The gradient for ``ctx`` (that for ``x`` is ``grad`` itself). The tables are rebuilt (one tiny launch)
    rather than kept from the forward pass, exactly as the forward built them."""
    grad = grad.contiguous()
    tables = axis_tables(box.to(grad.device), ctx_boxes.to(grad.device), tuple(grad.shape[1:4]), tuple(ctx_shape[2:5]))
    return fusion_backward(grad, ctx_shape, ctx_dtype, tables)
