"""Kernel benchmark (``hpdm bench-kernels``): the fused kernels against eager and torch.compile'd references.

For each kernel and size: median device time (CUDA events around a call whose launches queue behind a ~5 ms GPU
sleep, so that up to that much of the host's launch cost is not counted; the fused kernel's host time per call is
reported beside it), achieved GB/s on the bytes the op must move, that as a percentage of a device-to-device copy
measured in the same run, and speed-ups over the eager reference and over ``torch.compile(reference)``. A call that
synchronises (the eager gather reads its offsets back) counts its host time after that point too. Prints a table,
writes JSON and, if matplotlib imports, a PNG of GB/s vs size. ``--device cpu`` is a smoke mode (Triton
interpreter, tiny sizes): it checks the plumbing, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from data_pipeline.cli import number_at_least
from hpdm.errors import UsageError
from hpdm.pyramid import boxes_from_offsets, sample_offsets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", default="gather,fusion,conv", help="comma list of: gather, fusion, conv")
    parser.add_argument("--out", default="kernel_bench.json", help="JSON results path, ending in .json (the plot goes "
                                                                   "beside it as .png; default: kernel_bench.json)")
    parser.add_argument("--reps", type=number_at_least(1), default=20, help="timed repetitions per case (default 20)")
    parser.add_argument("--warmup", type=number_at_least(0), default=5, help="untimed calls first (default 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: smoke test through the Triton interpreter at tiny sizes")


def _median_ms(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn``: on CUDA its device time, on CPU wall time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(10_000_000)  # ~5 ms: fn's launches queue up behind it, the events see the GPU alone
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _host_ms(fn: Callable[[], object], reps: int) -> float:
    """Median host milliseconds of one call of ``fn`` (its launch cost on CUDA, where it does not synchronise)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, warmup: int, reps: int) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, warmup, reps)
    return 2 * src.numel() / ms / 1e6


def gather_cases(device: str) -> list[dict]:
    """(B, video T/H/W, patch, levels, factors) per case; the last entries are the issue's target sizes."""
    if device == "cpu":
        return [dict(name="tiny 2x8x16x16", B=2, video=(8, 16, 16), patch=(2, 4, 4), levels=3, factors=None)]
    ucf = dict(video=(64, 256, 256), patch=(16, 64, 64), levels=3, factors=None)
    return [dict(name=f"ucf B={b} 64x256x256", B=b, **ucf) for b in (1, 4)] + [
        dict(name="t2v B=4 64x288x512 L=4", B=4, video=(64, 288, 512), patch=(8, 36, 64), levels=4, factors=None),
        dict(name="ucf B=16 64x256x256", B=16, **ucf),
        dict(name="B=16 16x512x512 f=(1,8,8)..", B=16, video=(16, 512, 512), patch=(16, 64, 64), levels=3,
             factors=((1, 8, 8), (1, 4, 4), (1, 2, 2))),
    ]


def _gather_setup(case: dict, device: str, dtype: torch.dtype):
    from kernels.patch_gather import check_boxes, gather_pyramid, level_factors
    B, patch = case["B"], case["patch"]
    levels = case["levels"]
    fs = level_factors(levels, case["factors"])
    video = torch.randint(0, 256, (B, *case["video"], 3), dtype=torch.uint8, device=device)
    if case["factors"] is None:
        offsets = sample_offsets(B, levels, patch, torch.Generator().manual_seed(0))
    else:  # deterministic nested boxes: level l starts in the middle of what it may cover
        room = [[case["video"][d] // fs[l][d] - patch[d] for d in range(3)] for l in range(levels)]
        offsets = torch.tensor([[[r // 2 for r in room[l]] for l in range(levels)]] * B)
    check_boxes(case["video"], offsets, patch, fs)
    offsets = offsets.to(device)  # as the trainer draws them: the fused gather then checks nothing on the host
    # must move: the coarsest box (it contains the finer ones) once, and every level's output once
    read = B * 3 * max(math.prod(p * f for p, f in zip(patch, fl)) for fl in fs)
    write = B * levels * 3 * math.prod(patch) * dtype.itemsize

    def call(impl):
        return lambda: gather_pyramid(video, offsets, patch, dtype, impl=impl, factors=case["factors"])
    return call, read + write


def fusion_cases(device: str) -> list[dict]:
    if device == "cpu":
        return [dict(name="tiny B=2 D=16 2x4x4 K=2", B=2, D=16, grid=(2, 4, 4), K=2)]
    return [dict(name=f"B={b} D={d} 8x16x16 K={k}", B=b, D=d, grid=(8, 16, 16), K=k)
            for b, d, k in ((4, 1024, 2), (16, 256, 2), (16, 1024, 1), (16, 1024, 2), (16, 1024, 3))]


def _fusion_setup(case: dict, device: str, dtype: torch.dtype):
    from kernels.context_fusion import context_fusion
    B, D, grid, K = case["B"], case["D"], case["grid"], case["K"]
    boxes = boxes_from_offsets(sample_offsets(B, K + 1, grid, torch.Generator().manual_seed(0)), grid).to(device)
    x = torch.randn(B, *grid, D, device=device, dtype=dtype, requires_grad=True)
    ctx = torch.randn(B, K, *grid, D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    tokens = B * math.prod(grid) * D * dtype.itemsize
    # must move: x read, out written, the coarse cells under the fine box read; backward: grad read, grad_ctx written
    lo, hi = boxes[:, :K, :3], boxes[:, :K, 3:]
    frac = ((boxes[:, K:, 3:] - boxes[:, K:, :3]) / (hi - lo)).clamp(max=1.0)
    cells = torch.minimum(torch.ceil(frac * torch.tensor(grid, device=device)) + 1, torch.tensor(grid, device=device))
    footprint = int(cells.prod(-1).sum()) * D * dtype.itemsize
    fwd_bytes, bwd_bytes = 2 * tokens + footprint, tokens + K * tokens

    def call(impl):
        def step():
            out = context_fusion(x, ctx, boxes[:, K], boxes[:, :K], impl=impl)
            torch.autograd.backward(out, g)
        return step
    return call, fwd_bytes + bwd_bytes


def conv_cases(device: str) -> list[dict]:
    if device == "cpu":
        return [dict(name="tiny B=2 C=16 2x4x4 k=3", B=2, C=16, grid=(2, 4, 4), k=3)]
    return [dict(name="synth_gpu B=256 C=256 8^3 k=5", B=256, C=256, grid=(8, 8, 8), k=5),
            dict(name="hpdm_s B=24 C=1024 16^3 k=3", B=24, C=1024, grid=(16, 16, 16), k=3)]


def _conv_setup(case: dict, device: str, dtype: torch.dtype):
    from kernels.token_conv import token_conv
    B, C, grid, k = case["B"], case["C"], case["grid"], case["k"]
    x = torch.randn(B, math.prod(grid), C, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(C, 1, k, k, k, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def call(impl):
        def step():
            torch.autograd.backward(token_conv(x, grid, w, b, impl=impl), g)
        return step
    # must move: forward x read, out written; backward grad read, x read (weight gradient), grad_x written
    return call, 5 * x.numel() * dtype.itemsize


def _measure(kernel: str, case: dict, setup, args, copy_gbs: float) -> dict:
    dtype = torch.bfloat16
    call, nbytes = setup(case, args.device, dtype)
    timing = dict(warmup=args.warmup, reps=args.reps, device=args.device)
    row = dict(kernel=kernel, case=case["name"], dtype=str(dtype), bytes=nbytes)
    row["fused_ms"] = _median_ms(call("fused"), **timing)
    row["fused_host_ms"] = _host_ms(call("fused"), args.reps) if args.device == "cuda" else None
    row["eager_ms"] = _median_ms(call("reference"), **timing)
    host = f" (host {row['fused_host_ms']:.3f} ms per call)" if row["fused_host_ms"] is not None else ""
    print(f"  fused {row['fused_ms']:.3f} ms{host}, eager {row['eager_ms']:.3f} ms"
          + ("" if args.no_compile else "; compiling the reference (can take a minute)"), flush=True)
    row["compile_ms"] = None
    if not args.no_compile:
        try:
            from torch import _dynamo
            _dynamo.reset()
            with _compiled_reference(kernel):
                row["compile_ms"] = _median_ms(call("reference"), **timing)
        except Exception as exc:  # noqa: BLE001 - report, do not abort the run
            print(f"  torch.compile baseline failed for {case['name']}: {type(exc).__name__}: {exc}"[:300])
    row["gbs"] = nbytes / row["fused_ms"] / 1e6
    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
    row["x_eager"] = row["eager_ms"] / row["fused_ms"]
    row["x_compile"] = row["compile_ms"] / row["fused_ms"] if row["compile_ms"] else None
    return row


class _compiled_reference:
    """Swap the dispatcher's reference for ``torch.compile`` of it for the duration of a ``with``."""

    def __init__(self, kernel: str):
        # The modules themselves: `import kernels.context_fusion` would give the function that kernels/__init__.py
        # exports under the same name.
        module, self.name = {"gather": ("kernels.patch_gather", "gather_pyramid_reference"),
                             "fusion": ("kernels.context_fusion", "context_fusion_reference"),
                             "conv": ("kernels.token_conv", "token_conv_reference")}[kernel]
        self.module = importlib.import_module(module)

    def __enter__(self):
        self.orig = getattr(self.module, self.name)
        setattr(self.module, self.name, torch.compile(self.orig))

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.orig)


def _table(rows: list[dict], copy_gbs: float) -> str:
    head = (f"{'kernel':7} {'case':30} {'fused ms':>9} {'host ms':>8} {'GB/s':>8} {'% copy':>7} {'x eager':>8} "
            f"{'x compile':>9}")
    lines = [f"device-to-device copy: {copy_gbs:.0f} GB/s", head, "-" * len(head)]
    for r in rows:
        xc = f"{r['x_compile']:.1f}" if r["x_compile"] else "n/a"
        host = f"{r['fused_host_ms']:.3f}" if r["fused_host_ms"] is not None else "n/a"
        lines.append(f"{r['kernel']:7} {r['case']:30} {r['fused_ms']:9.3f} {host:>8} {r['gbs']:8.0f} "
                     f"{r['pct_copy']:7.1f} {r['x_eager']:8.1f} {xc:>9}")
    return "\n".join(lines)


def _plot(rows: list[dict], copy_gbs: float, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG drawn")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for kernel in sorted({r["kernel"] for r in rows}):
        pts = sorted((r["bytes"], r["gbs"]) for r in rows if r["kernel"] == kernel)
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "o-", label=kernel)
    ax.axhline(copy_gbs, ls="--", c="gray", label="device copy")
    ax.set(xscale="log", xlabel="MB moved", ylabel="GB/s", title="fused kernels")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda, but no CUDA GPU was found; `--device cpu` runs a smoke test via Triton's "
                         "interpreter")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # kernel modules are imported lazily, after this
        args.no_compile = True
    wanted = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(wanted) - {"gather", "fusion", "conv"})
    if unknown or not wanted:
        raise UsageError(f"--kernels: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; choose from "
                         "gather, fusion, conv")
    if Path(args.out).suffix != ".json":  # the plot, written to OUT.png, would replace the results
        raise UsageError(f"--out: {args.out} must end in .json (the plot is written beside it as .png)")
    copy_gbs = copy_bandwidth(args.device, 1 << 30 if args.device == "cuda" else 1 << 24, args.warmup, args.reps)
    rows = []
    plan = [(kernel, case, setup) for kernel, cases, setup in (("gather", gather_cases, _gather_setup),
                                                               ("fusion", fusion_cases, _fusion_setup),
                                                               ("conv", conv_cases, _conv_setup))
            if kernel in wanted for case in cases(args.device)]
    for i, (kernel, case, setup) in enumerate(plan):
        print(f"[{i + 1}/{len(plan)}] {kernel} {case['name']}", flush=True)
        rows.append(_measure(kernel, case, setup, args, copy_gbs))
        torch.cuda.empty_cache() if args.device == "cuda" else None
    print(_table(rows, copy_gbs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    out.write_text(json.dumps(dict(device=device, torch=torch.__version__, copy_gbs=copy_gbs, rows=rows), indent=1))
    print(f"wrote {out}")
    _plot(rows, copy_gbs, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":  # the same as `hpdm bench-kernels` (its errors printed as one line)
    from hpdm.cli import main  # noqa: PLC0415

    raise SystemExit(main(["bench-kernels", *sys.argv[1:]]))
