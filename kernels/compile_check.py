"""Compile the Triton kernels for an NVIDIA target without a GPU (Triton ships ptxas), to catch code-generation
errors that the CPU interpreter cannot see. Run in a process without ``TRITON_INTERPRET``:

    python -m kernels.compile_check [--arch 90]

Prints, per kernel, the global load/store instructions of the PTX (vector widths show the coalescing), the
registers per thread, and the matrix-unit (HMMA) and spill (LDL/STL) instructions of the SASS.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_GATHER_SIGNATURE = "words_ptr:*i32 nwords:i32 off_ptr:*i32 out_ptr:*bf16 T:i32 H:i32 W:i32"


def _gather_consts(patch, fws, factors=None) -> dict:
    from kernels.patch_gather_triton import level_starts, level_tile
    tiles = tuple(level_tile(patch, fw, 256) for fw in fws)
    return dict(L=len(fws), PT=patch[0], PH=patch[1], PW=patch[2], FACTORS=factors or tuple((f, f, f) for f in fws),
                TILES=tiles, STARTS=level_starts(patch, tiles), ROUND=False)


def _cases() -> dict:
    """Kernel name -> (module, function, signature, constexprs); the ints in _ALIGNED get divisibility 16."""
    return {
        "gather": ("patch_gather_triton", "_gather_kernel", _GATHER_SIGNATURE,
                   _gather_consts((16, 64, 64), (4, 2, 1))),
        "gather-per-dim": ("patch_gather_triton", "_gather_kernel", _GATHER_SIGNATURE,
                           _gather_consts((16, 64, 64), (8, 4, 2), ((1, 8, 8), (1, 4, 4), (1, 2, 2)))),
        "fusion-tables": ("context_fusion_triton", "_table_kernel",
                          "box_ptr:*fp32 cbox_ptr:*fp32 idx_ptr:*i32 frac_ptr:*fp32 lo_ptr:*i32 hi_ptr:*i32 K:i32 "
                          "NT:i32 NH:i32 NW:i32 CT:i32 CH:i32 CW:i32", dict(NMAX=16, CMAX=16)),
        "fusion-forward": ("context_fusion_triton", "_forward_kernel",
                           "x_ptr:*bf16 ctx_ptr:*bf16 out_ptr:*bf16 idx_ptr:*i32 frac_ptr:*fp32 K:i32 NT:i32 NH:i32 "
                           "NW:i32 CT:i32 CH:i32 CW:i32 D:i32",
                           dict(NMAX=16, NWP=16, CWP=16, BLOCK_D=128, PRECISION="tf32x3", ROUND=False)),
        "fusion-backward": ("context_fusion_triton", "_backward_kernel",
                            "g_ptr:*bf16 gctx_ptr:*bf16 idx_ptr:*i32 frac_ptr:*fp32 lo_ptr:*i32 hi_ptr:*i32 K:i32 "
                            "NT:i32 NH:i32 NW:i32 CT:i32 CH:i32 CW:i32 D:i32",
                            dict(NMAX=16, CMAX=16, NWP=16, CWP=16, BLOCK_D=128, PRECISION="tf32x3", ROUND=False)),
        "token-conv": ("token_conv_triton", "_conv_kernel", "x_ptr:*bf16 w_ptr:*fp32 b_ptr:*bf16 y_ptr:*bf16 M:i32 "
                       "C:i32 N:i32 T:i32 H:i32 W:i32",
                       dict(K=5, FLIP=False, HAS_BIAS=True, BLOCK_M=64, BLOCK_C=64, ROUND=False)),
        "token-conv-wgrad": ("token_conv_triton", "_weight_grad_kernel", "x_ptr:*bf16 g_ptr:*bf16 part_ptr:*fp32 "
                             "M:i32 C:i32 N:i32 T:i32 H:i32 W:i32", dict(K=5, BLOCK_M=256, BLOCK_C=32)),
    }


_ALIGNED = {"T", "H", "W", "D", "C"}


def _sass(cubin: bytes) -> tuple[int, collections.Counter]:
    """(registers per thread, counts of the SASS opcodes that matter here) via the cuobjdump Triton ships."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True, check=True)
    regs = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    return regs, collections.Counter(re.findall(r"\b(HMMA|LDL|STL)\b", sass.stdout))


def compile_all(arch: int) -> dict[str, collections.Counter]:
    """Per kernel, counts of its PTX global loads and stores, of the SASS matrix (HMMA) and local-memory (LDL,
    STL: spills) instructions, and ``registers``; raises on the first kernel that fails to compile."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    out = {}
    for name, (module, fn, sig, consts) in _cases().items():
        kernel = getattr(importlib.import_module(f"kernels.{module}"), fn)
        signature = dict(p.split(":") for p in sig.split())
        signature.update({k: "constexpr" for k in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(signature.items())
                 if t.startswith("*") or n in _ALIGNED}
        compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=4))
        counts = collections.Counter(re.findall(r"(?:ld|st)\.global[.\w]*", compiled.asm["ptx"]))
        counts["registers"], sass = _sass(compiled.asm["cubin"])
        out[name] = counts + sass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    for name, counts in compile_all(args.arch).items():
        regs = counts.pop("registers")
        print(f"{name:16} OK  {regs} registers, " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
