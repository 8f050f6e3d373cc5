"""Attention backends on HPDM's shapes: each backend's time, and the dispatch's (``hpdm.attention``) against
the best one per shape.

Shapes (HPDM-L, bf16): latent self-attention over 768 latents; the read (768 latents attend to 4,096 data
tokens of a 16x64x64 patch in 1x4x4 tubes) and the write (4,096 data tokens attend to the 768 latents); head
dims 64 and 128 at model width 1024. ``--device cpu`` is a smoke run at 1/16 of the token counts.

    python benchmarks/attention_shapes.py --out benchmarks/attention_shapes.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpdm import attention as attn  # noqa: E402

SHAPES = [("latent self", 768, 768), ("read", 768, 4096), ("write", 4096, 768)]


def _cpu_time(fn, q, k, v, backward: bool, warmup: int = 1, reps: int = 3) -> float:
    if backward:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        with torch.enable_grad() if backward else torch.no_grad():
            out = fn(q, k, v)
            if backward:
                out.sum().backward()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> list[dict]:
    cuda = args.device == "cuda"
    timer = attn.time_backend if cuda else _cpu_time
    scale = 1 if cuda else 16
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for name, nq, nk in SHAPES:
        for d in (64, 128):
            heads = args.width // d
            q = torch.randn(args.batch, nq // scale, heads, d, device=args.device, dtype=dtype)
            k, v = (torch.randn(args.batch, nk // scale, heads, d, device=args.device, dtype=dtype) for _ in "kv")
            for backward in (False, True):
                names = attn.candidates(q) if cuda else ["sdpa"]
                best, timings = attn.choose(names, lambda n: timer(attn.backend_fn(n), q, k, v, backward))
                with torch.enable_grad():  # the dispatch keys on whether gradients are needed
                    qq = q.detach().requires_grad_(backward)
                    chosen = attn.select_backend(qq, k, v)
                dispatch = timer(attn.attention, q, k, v, backward)
                flops = 4 * args.batch * heads * nq * nk * d / scale ** 2 * (3.5 if backward else 1.0)
                rows.append(dict(shape=name, nq=nq // scale, nk=nk // scale, head_dim=d, heads=heads,
                                 mode="fwd+bwd" if backward else "fwd", best=best, best_ms=timings.get(best),
                                 chosen=chosen, dispatch_ms=dispatch, timings_ms=timings,
                                 dispatch_tflops=flops / dispatch / 1e9))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024, help="model width; heads = width // head_dim")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="attention_shapes.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (none found); --device cpu runs a smoke test")
        return 2
    rows = run(args)
    print(f"{'shape':12} {'Nq':>5} {'Nk':>5} {'d':>4} {'mode':8} {'best':>15} {'ms':>8} {'chosen':>15} "
          f"{'dispatch':>9} {'ratio':>6} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['shape']:12} {r['nq']:5} {r['nk']:5} {r['head_dim']:4} {r['mode']:8} {r['best']:>15} "
              f"{r['best_ms'] or float('nan'):8.3f} {r['chosen']:>15} {r['dispatch_ms']:9.3f} "
              f"{r['dispatch_ms'] / (r['best_ms'] or float('nan')):6.2f} {r['dispatch_tflops']:8.1f}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps(dict(device=device, torch=torch.__version__, batch=args.batch,
                                              rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
