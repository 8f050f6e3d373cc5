"""The token convolution, forward and backward, by each path of kernels/token_conv.py on tokens [B, N, C].

PyTorch's own (transposes + F.conv3d), the CPU path's two-convolution backward, and the Triton kernels (what
model.kernels=auto takes on a GPU), at the configs' sizes, so that the choice rests on numbers. Prints a table and
writes JSON.

    python benchmarks/token_conv.py --out token_conv.json                   # CUDA in bf16 where there is a GPU
    OMP_NUM_THREADS=2 python benchmarks/token_conv.py --device cpu --dtype fp32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.token_conv import _DepthwiseConv3d, token_conv_fused  # noqa: E402

# (name, clips, channels, grid, kernel): the token grid of level 0 (finer levels' tiles have the same grid);
# hpdm_s: configs/ucf101_hpdm_s.yaml's 3 levels of one clip at micro-batch 8
CASES = [("tiny_1level", 16, 64, (8, 4, 4), 5), ("synthetic_gpu", 256, 256, (8, 8, 8), 5),
         ("tiny", 8, 64, (4, 4, 4), 3), ("hpdm_s", 24, 1024, (16, 16, 16), 3)]


def _channels_first(conv):
    def run(x, grid, w, b):
        B, N, C = x.shape
        return conv(x.transpose(1, 2).reshape(B, C, *grid), w, b).reshape(B, C, N).transpose(1, 2)
    return run


PATHS = {"pytorch": _channels_first(lambda x, w, b: F.conv3d(x, w, b, padding=w.shape[-1] // 2, groups=x.shape[1])),
         "two_conv": _channels_first(_DepthwiseConv3d.apply), "triton": token_conv_fused}


def time_ms(fn, leaves, grid, grad, device, repeats: int) -> dict:
    """Median forward and forward+backward milliseconds over ``repeats`` runs after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fwd, total = [], []
    for i in range(repeats + 1):
        for t in leaves:
            t.grad = None
        sync()
        t0 = time.perf_counter()
        y = fn(leaves[0], grid, *leaves[1:])
        sync()
        t1 = time.perf_counter()
        y.backward(grad)
        sync()
        if i:
            fwd.append(1e3 * (t1 - t0))
            total.append(1e3 * (time.perf_counter() - t0))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"forward_ms": med(fwd), "backward_ms": med(total) - med(fwd)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on CUDA, else fp32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cases", nargs="*", choices=[c[0] for c in CASES], help="default: all on CUDA, all but hpdm_s "
                   "on CPU")
    p.add_argument("--paths", nargs="*", choices=list(PATHS), help="default: pytorch and triton on CUDA (the "
                   "two-convolution backward took 400 ms of a 620 ms step there), pytorch and two_conv on CPU")
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    paths = args.paths or (["pytorch", "triton"] if device.type == "cuda" else ["pytorch", "two_conv"])
    cases = args.cases or [c[0] for c in CASES if device.type == "cuda" or c[0] != "hpdm_s"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'case':<14} {'tokens':<26} " + " ".join(f"{p + ' fwd / bwd ms':>24}" for p in paths))
    for name, clips, channels, grid, k in (c for c in CASES if c[0] in cases):
        x = torch.randn(clips, grid[0] * grid[1] * grid[2], channels, generator=gen)
        leaves = [t.to(device, dtype).requires_grad_() for t in
                  (x, torch.randn(channels, 1, k, k, k, generator=gen) / k, torch.randn(channels, generator=gen))]
        grad = torch.randn(x.shape, generator=gen).to(device, dtype)
        row = {"case": name, "shape": list(x.shape), "grid": list(grid), "kernel": k,
               **{path: time_ms(PATHS[path], leaves, grid, grad, device, args.repeats) for path in paths}}
        rows.append(row)
        print(f"{name:<14} {'x'.join(map(str, x.shape)) + f' k{k}':<26} " + " ".join(
            f"{row[p]['forward_ms']:>11.3f} / {row[p]['backward_ms']:>10.3f}" for p in paths))
    if args.out:
        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": rows}
        Path(args.out).write_text(json.dumps(info, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
