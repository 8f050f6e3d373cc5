"""Small Triton helpers shared by the kernels (imported only by kernel modules, so lazily)."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels._triton import interpreting

# Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest even as the GPU does; kernels
# round explicitly in interpreter mode so CPU tests can hold bf16 outputs to exact equality.
MANUAL_BF16_ROUNDING: bool = interpreting()


@triton.jit
def to_output(v, dtype: tl.constexpr, MANUAL: tl.constexpr):
    """Cast fp32 ``v`` to ``dtype`` with round-to-nearest-even (done by hand when ``MANUAL`` and bf16)."""
    if MANUAL and dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = u.to(tl.float32, bitcast=True)
    return v.to(dtype)
