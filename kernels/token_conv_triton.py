"""Triton kernels for the token convolution (a depthwise 3-D convolution, odd kernel k, same padding) on tokens
held as the model holds them: rows ``r = b * N + (t * H + h) * W + w`` of C contiguous channels. Called through
the custom ops of ``kernels/token_conv.py``, which give them autograd and fake implementations for torch.compile.

With that layout a tap's input is the same rows shifted by a constant (masked where the shift leaves the grid),
so every load is a contiguous run of channels and no transpose to [B, C, T, H, W] is needed.

- forward: one program per (block of rows, block of channels) sums the k^3 shifted tiles times the tap's weights;
- input gradient: the same kernel on the output gradient with the taps reversed (the kernel flipped in every
  dimension);
- weight gradient: one program per (block of rows, block of channels) loads its output-gradient tile once and,
  per tap, reduces the product with the shifted input over its rows into a partial sum; the partials
  [row blocks, k^3, C] are summed by torch. No atomics: bitwise deterministic.

Accumulation is fp32; bf16 inputs are read as bf16 and results rounded once on store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import MANUAL_BF16_ROUNDING, to_output

BLOCK_M, BLOCK_C = 64, 64  # forward and input gradient
WGRAD_BLOCK_M, WGRAD_BLOCK_C = 256, 32  # weight gradient: more rows per partial sum, fewer partials


@triton.jit
def _grid_position(rows, N, H, W):
    n = rows % N
    return n // (H * W), (n // W) % H, n % W


@triton.jit
def _tap(tap, rmask, t, h, w, T, H, W, K: tl.constexpr):
    """Which rows the tap's shifted source is inside the grid for, and the row shift to it."""
    P: tl.constexpr = K // 2
    dt, dh, dw = tap // (K * K) - P, (tap // K) % K - P, tap % K - P
    valid = rmask & (t + dt >= 0) & (t + dt < T) & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
    return valid, (dt * H + dh) * W + dw


@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, C, N, T, H, W, K: tl.constexpr, FLIP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROUND: tl.constexpr):
    """y[r, c] = bias[c] + sum over taps of w[tap, c] * x[r + shift(tap), c]; w is [k^3, C] fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask, cmask = rows < M, cols < C
    t, h, w = _grid_position(rows, N, H, W)
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for tap in range(K * K * K):  # a loop, not unrolled: 125 unrolled taps spilled registers
        valid, shift = _tap(tap, rmask, t, h, w, T, H, W, K)
        xv = tl.load(x_ptr + (rows64 + shift)[:, None] * C + cols[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + (K * K * K - 1 - tap if FLIP else tap) * C + cols, mask=cmask, other=0.0)
        acc += xv * wv[None, :]
    out = to_output(acc, y_ptr.dtype.element_ty, ROUND)
    tl.store(y_ptr + rows64[:, None] * C + cols[None, :], out, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _weight_grad_kernel(x_ptr, g_ptr, part_ptr, M, C, N, T, H, W, K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """part[row block, tap, c] = sum over the block's rows r of g[r, c] * x[r + shift(tap), c]."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask, cmask = rows < M, cols < C
    t, h, w = _grid_position(rows, N, H, W)
    rows64 = rows.to(tl.int64)
    g = tl.load(g_ptr + rows64[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    for tap in range(K * K * K):
        valid, shift = _tap(tap, rmask, t, h, w, T, H, W, K)
        xv = tl.load(x_ptr + (rows64 + shift)[:, None] * C + cols[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        tl.store(part_ptr + (pid_m * K * K * K + tap) * C + cols, tl.sum(xv * g, axis=0), mask=cmask)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """[C, 1, k, k, k] -> [k^3, C] fp32, tap-major so that a tap's weights are contiguous over channels."""
    return weight.reshape(weight.shape[0], -1).t().float().contiguous()


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: list[int],
         flip: bool = False) -> torch.Tensor:
    """x [B, N, C] -> [B, N, C] in x's dtype; ``flip`` reverses the kernel in every dimension."""
    x = x.contiguous()
    B, N, C = x.shape
    y = torch.empty_like(x)
    M = B * N
    block_c = min(BLOCK_C, triton.next_power_of_2(C))
    _conv_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(C, block_c))](
        x, _taps(weight), bias.contiguous() if bias is not None else x, y, M, C, N, *grid, weight.shape[-1], flip,
        bias is not None, BLOCK_M, block_c, MANUAL_BF16_ROUNDING, num_warps=4)
    return y


def weight_grad(x: torch.Tensor, grad: torch.Tensor, grid: list[int], k: int) -> torch.Tensor:
    """The weight's gradient [C, 1, k, k, k] (fp32) from the input x and output gradient grad, both [B, N, C]."""
    x, grad = x.contiguous(), grad.contiguous()
    B, N, C = x.shape
    M = B * N
    block_c = min(WGRAD_BLOCK_C, triton.next_power_of_2(C))
    blocks = triton.cdiv(M, WGRAD_BLOCK_M)
    part = torch.empty(blocks, k ** 3, C, dtype=torch.float32, device=x.device)
    _weight_grad_kernel[(blocks, triton.cdiv(C, block_c))](x, grad, part, M, C, N, *grid, k, WGRAD_BLOCK_M,
                                                           block_c, num_warps=4)
    return part.sum(0).t().contiguous().view(C, 1, k, k, k)
