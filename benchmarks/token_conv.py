"""The token convolution's backward: PyTorch's own against hpdm.depthwise_conv's two forward convolutions.

hpdm.depthwise_conv3d takes the two-convolution backward on CPU and PyTorch's own elsewhere; this measures both on
one device at the configs' sizes, so that the choice rests on numbers. Prints a table and writes JSON.

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
from hpdm.depthwise_conv import _DepthwiseConv3d  # noqa: E402

# (name, clips, channels, grid, kernel): the token grid of level 0 (finer levels' tiles have the same grid)
CASES = [("tiny_1level", 16, 64, (8, 4, 4), 5), ("synthetic_gpu", 256, 256, (8, 8, 8), 5),
         ("tiny", 8, 64, (4, 4, 4), 3)]


def native(x, w, b):
    return F.conv3d(x, w, b, padding=w.shape[-1] // 2, groups=x.shape[1])


def two_conv(x, w, b):
    return _DepthwiseConv3d.apply(x, w, b)


def time_ms(fn, leaves, grad, device, repeats: int) -> dict:
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
        y = fn(*leaves)
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
    p.add_argument("--cases", nargs="*", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'case':<14} {'input':<22} {'forward ms':>10} {'bwd PyTorch ms':>14} {'bwd two-conv ms':>15}")
    for name, clips, channels, grid, k in (c for c in CASES if c[0] in args.cases):
        x = torch.randn(clips, channels, *grid, generator=gen)
        leaves = [t.to(device, dtype).requires_grad_() for t in
                  (x, torch.randn(channels, 1, k, k, k, generator=gen) / k, torch.randn(channels, generator=gen))]
        grad = torch.randn(x.shape, generator=gen).to(device, dtype)
        row = {"case": name, "shape": list(x.shape), "kernel": k,
               **{path: time_ms(fn, leaves, grad, device, args.repeats)
                  for path, fn in (("pytorch", native), ("two_conv", two_conv))}}
        rows.append(row)
        print(f"{name:<14} {'x'.join(map(str, x.shape)) + f' k{k}':<22} {row['pytorch']['forward_ms']:>10.3f} "
              f"{row['pytorch']['backward_ms']:>14.3f} {row['two_conv']['backward_ms']:>15.3f}")
    if args.out:
        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": rows}
        Path(args.out).write_text(json.dumps(info, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
