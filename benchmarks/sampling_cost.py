"""Cost of hierarchical tiled sampling per video and level: network evaluations and wall time.

Default: the HPDM-S config (3 levels of 16x64x64, video 64x256x256) on a GPU, the paper's steps (128 / 64 / 32),
50 % overlap, random weights (the cost does not depend on them) or a given generator. Prints a table and writes
JSON. ``--config configs/tiny.yaml --device cpu`` is the CPU smoke run.

    python benchmarks/sampling_cost.py --out benchmarks/sampling_cost.json
    python benchmarks/sampling_cost.py --config configs/tiny.yaml --device cpu --steps 8,4,2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpdm.config import load_config  # noqa: E402
from hpdm.diffusion import Condition  # noqa: E402
from hpdm.model import HPDM  # noqa: E402
from hpdm.sampling import SampleOptions, TiledSampler, cost_table  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ucf101_hpdm_s.yaml")
    p.add_argument("--generator", default=None, help="exported generator instead of random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", default="", help="e.g. 128,64,32 (default: the config's, halved per level)")
    p.add_argument("--overlap", default="half")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--tile-batch", type=int, default=32)
    p.add_argument("--videos", type=int, default=1, help="videos sampled together")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="network precision (the paper: fp32)")
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args()

    device = torch.device(args.device)
    if args.generator:
        from hpdm.export import load_generator  # noqa: PLC0415

        cfg, net = load_generator(args.generator, device=device)
    else:
        cfg = load_config(args.config)
        torch.manual_seed(0)
        net = HPDM(cfg.model).to(device).eval()
    if args.dtype == "bf16":
        net = net.to(torch.bfloat16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    opts = SampleOptions(steps=tuple(int(s) for s in args.steps.split(",") if s), guidance=args.guidance,
                         overlap=args.overlap, tile_batch=args.tile_batch)
    sampler = TiledSampler(net, cfg, opts, device=device)
    m = cfg.model
    cond = Condition(labels=torch.zeros(args.videos, dtype=torch.long, device=device)) if m.cond == "class" else Condition()
    if m.cond == "text":
        cond = Condition(text=torch.zeros(args.videos, 1, m.text_dim, device=device))
    _, stats = sampler.sample(cond, seeds=list(range(args.videos)), progress=True)
    table = cost_table(stats)
    total = sum(s.seconds for s in stats) / args.videos
    print(f"{args.config if not args.generator else args.generator}: video {'x'.join(map(str, m.resolution))}, "
          f"overlap {args.overlap}, device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
    print(table)
    print(f"total: {total:.2f} s/video")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "generator": args.generator, "device": str(device),
                                              "overlap": args.overlap, "tile_batch": args.tile_batch, "dtype": args.dtype,
                                              "levels": [s.row() for s in stats], "seconds_per_video": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
