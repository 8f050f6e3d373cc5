"""Training throughput (issue 11): the trainer's step beside the bare model step, same model, micro-batch and precision.

* trainer: the real ``hpdm train`` in a subprocess (DeepSpeed engine, data loader on synthetic shards or ``--data``,
  EMA, divergence guard), ``train.log_every=1``, one micro-batch per optimizer step; the per-step ``time/*`` of its
  ``metrics.jsonl`` after ``--warmup`` steps.
* bare: in-process, the HPDM model on the device, the EDM loss on random inputs already there (no loader, no
  DeepSpeed, no gradient clipping), plain backward and the trainer's optimizer from ``hpdm.optim.build_optimizer``
  (fused AdamW on CUDA, foreach on CPU; multi-tensor LAMB) stepped on the model's own parameters (in bf16: bf16
  weights, no fp32 master copy). Timed with ``torch.cuda.synchronize`` on GPU.

Cases: precision bf16 (AdamW) or the paper's fp32 + LAMB, each adaptive (the config's ``model.levels_per_block``) or
non-adaptive (every block runs every level). MFU = ``training_flops_per_sample`` x clips/s / ``peak_flops``; peak
memory is ``torch.cuda.max_memory_allocated`` on GPU, the host RSS peak (``resource.getrusage``) on CPU, beside the
estimate of ``hpdm info`` (weights, gradients, optimizer state, activations saved for backward). Targets
(HPDM-S on an H100) are checked and printed only on GPU with configs/ucf101_hpdm_s.yaml.

    python benchmarks/train_throughput.py --out benchmarks/train_throughput.json          # HPDM-S, GPU, micro-batch 4
    python benchmarks/train_throughput.py train.activation_checkpointing=true --micro-batch 16 --cases bf16/adaptive
    python benchmarks/train_throughput.py train.compile=true --cases bf16/adaptive fp32-lamb/adaptive
    python benchmarks/train_throughput.py --smoke --out /tmp/train_throughput.json       # CPU, tiny, < 90 s

Config overrides (``key=value``, given to both paths) go before the options.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_pipeline.cli import number_at_least  # noqa: E402
from hpdm.config import Config, load_config  # noqa: E402
from hpdm.diffusion import EDM, Condition  # noqa: E402
from hpdm.flops import activation_bytes, as_on_gpu, state_bytes, training_flops_per_sample  # noqa: E402
from hpdm.metrics import peak_flops  # noqa: E402
from hpdm.model import HPDM  # noqa: E402
from hpdm.optim import build_optimizer  # noqa: E402
from hpdm.pyramid import boxes_from_offsets, sample_offsets  # noqa: E402

CASES = ("bf16/adaptive", "bf16/non-adaptive", "fp32-lamb/adaptive", "fp32-lamb/non-adaptive")
PRECISION = {"bf16": ("bf16", "adamw"), "fp32-lamb": ("fp32", "lamb")}
SPLIT = ("data", "fwd_bwd", "optimizer", "other")
# issue 11, HPDM-S on one H100
BF16_CLIPS, BF16_MFU, BF16_VS_BARE, PAPER_CLIPS, PAPER_OPT_SHARE, ADAPTIVE_SPEEDUP = 60.0, 0.45, 0.95, 2 * 8.5, 0.05, 1.5
MEMORY_ESTIMATE_TOLERANCE = 0.2


def memory_estimate_gib(cfg: Config, micro: int) -> float:
    """What ``hpdm info`` estimates for one process: weights, gradients, optimizer state and activations."""
    with torch.device("meta"):
        params = sum(p.numel() for p in HPDM(cfg.model).parameters())
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    act = activation_bytes(as_on_gpu(cfg.model), micro, dtype, checkpointed=cfg.train.activation_checkpointing)
    return (sum(state_bytes(params, cfg.train.precision).values()) + act) / 2**30


def case_overrides(case: str, cfg: Config, smoke: bool) -> tuple[list[str], str, str]:
    """Config overrides of a case, and its (precision, optimizer); the smoke run keeps fp32 on CPU."""
    prec, opt = PRECISION[case.split("/")[0]]
    prec = "fp32" if smoke else prec
    out = [f"train.precision={prec}", f"train.optimizer={opt}"]
    if case.endswith("non-adaptive"):
        out.append(f"model.levels_per_block=[{','.join([str(cfg.model.levels)] * cfg.model.blocks)}]")
    return out, prec, opt


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: reset this process's RSS high-water mark, which getrusage then reports
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def summarize(rows: list[dict], micro: int) -> dict:
    """clips/s (total clips / total step time) and the mean split in ms (other: step minus the parts)."""
    step = sum(r["step"] for r in rows)
    split = {k: 1000 * sum(r.get(k, 0.0) for r in rows) / len(rows) for k in SPLIT[:3]}
    step_ms = 1000 * step / len(rows)
    split["other"] = step_ms - sum(split.values())
    return {"steps": len(rows), "clips_per_s": micro * len(rows) / step, "step_ms": step_ms, "split_ms": split}


def bare(cfg: Config, device: torch.device, micro: int, steps: int, warmup: int) -> dict:
    """The bare step: EDM loss, backward, optimizer step and zero_grad, on inputs already on the device."""
    m, t = cfg.model, cfg.train
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(t.seed)
    reset_peak(device)
    model = HPDM(m).to(device, dtype)
    if t.compile:  # as the trainer does
        model.compile(mode=t.compile_mode)
    opt = build_optimizer(model, t.optimizer, t.lr, t.betas, t.weight_decay)
    edm = EDM(cfg.diffusion)
    offsets = sample_offsets(micro, m.levels, m.patch, gen)
    boxes = boxes_from_offsets(offsets, m.patch).to(device)
    x0 = (torch.rand(micro, m.levels, 3, *m.patch, generator=gen) * 2 - 1).to(device, dtype)
    noise = torch.randn(x0.shape, generator=gen).to(device, dtype)
    sigma = edm.sample_sigma(micro, m.levels, device, gen)
    cond = Condition(labels=torch.randint(m.num_classes, (micro,), generator=gen).to(device)) if m.cond == "class" else Condition()
    if m.cond == "text":
        cond = Condition(text=torch.randn(micro, m.text_tokens, m.text_dim, generator=gen).to(device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss, _ = edm.loss(model, x0, boxes, cond, sigma, noise)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            rows.append({"step": t2 - t0, "fwd_bwd": t1 - t0, "optimizer": t2 - t1})
    out = {**summarize(rows, micro), "peak_mem_gib": peak_gib(device)}
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def trainer(config: str, overrides: list[str], run_dir: Path, micro: int, steps: int, warmup: int, log: Path,
            threads: int) -> dict:
    """The real ``hpdm train`` for warmup + steps steps of one micro-batch each; its metrics after the warm-up."""
    args = [f"train.run_dir={run_dir}", f"train.steps={warmup + steps}", f"train.batch_size={micro}",
            f"train.micro_batch={micro}", "train.log_every=1", "train.save_every=1000000", "train.sample_every=0",
            "train.sample_at_end=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", config, *overrides, *args],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"hpdm train failed (exit {proc.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lines = [x for x in lines if "time/step_s" in x and x["step"] > warmup]
    rows = [{"step": x["time/step_s"], "data": x["time/data_wait_s"], "fwd_bwd": x["time/fwd_bwd_s"],
             "optimizer": x["time/optimizer_s"]} for x in lines]
    mem = [x.get("mem/gpu_max_alloc_gib", x.get("mem/host_max_rss_gib", float("nan"))) for x in lines]
    return {**summarize(rows, micro), "peak_mem_gib": max(mem)}


def targets(case: str, r: dict) -> list[dict]:
    """Issue 11's per-case targets (HPDM-S, H100)."""
    tr, out = r["trainer"], []
    if case == "bf16/adaptive":
        out += [("trainer clips/s", tr["clips_per_s"], BF16_CLIPS), ("MFU", r["mfu"] or 0.0, BF16_MFU),
                ("trainer/bare", r["trainer_over_bare"], BF16_VS_BARE)]
    if case == "fp32-lamb/adaptive":
        share = tr["split_ms"]["optimizer"] / tr["step_ms"]
        out += [("trainer clips/s", tr["clips_per_s"], PAPER_CLIPS), ("optimizer share <=", -share, -PAPER_OPT_SHARE)]
    out = [{"name": n, "value": abs(v), "target": abs(t), "pass": v >= t} for n, v, t in out]
    ratio = r["memory_estimate_gib"] / tr["peak_mem_gib"]
    return out + [{"name": "memory estimate/peak", "value": ratio, "target": 1.0,
                   "pass": abs(ratio - 1) <= MEMORY_ESTIMATE_TOLERANCE}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, configs/tiny.yaml, micro-batch 2, a few steps, fp32")
    p.add_argument("--config", default=None, help="default: configs/ucf101_hpdm_s.yaml (configs/tiny.yaml with --smoke)")
    p.add_argument("--steps", type=number_at_least(1), default=None, help="measured steps per path (default 20; smoke 3)")
    p.add_argument("--warmup", type=number_at_least(0), default=None, help="steps discarded first (default 5; smoke 1)")
    p.add_argument("--micro-batch", type=number_at_least(1), default=None, help="clips per step (default 4; smoke 2)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--data", default=None, help="shards for the trainer (default: a synthetic set under --work)")
    p.add_argument("--videos", type=number_at_least(1), default=None, help="synthetic clips written (default 64; smoke 16)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hpdm-train-bench"))
    p.add_argument("--out", default=None, help="JSON output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both paths (the bare step "
                   "builds HPDM(cfg.model) and the optimizer of cfg.train)")
    a = p.parse_args(argv)
    smoke = a.smoke
    config = str(Path(a.config or ("configs/tiny.yaml" if smoke else "configs/ucf101_hpdm_s.yaml")).resolve())
    steps = a.steps if a.steps is not None else 3 if smoke else 20
    warmup = a.warmup if a.warmup is not None else 1 if smoke else 5
    micro = a.micro_batch if a.micro_batch is not None else 2 if smoke else 4
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    threads = 1 if smoke else 0  # one thread: steadier on a small shared CPU, and the same on both paths
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = load_config(config, a.overrides)
    res, work = base.model.resolution, Path(a.work)
    data = [f"data.shards={a.data}"] if a.data else [
        f"data.shards={work / 'synthetic-{}-{}'.format('x'.join(map(str, res)), base.model.num_classes)}",
        "data.synthetic=true", "data.flip=false",
        f"data.synthetic_videos={a.videos if a.videos is not None else 16 if smoke else 64}"]
    if smoke:
        data.append("data.num_workers=1")
    with_targets = device.type == "cuda" and Path(config).name == "ucf101_hpdm_s.yaml"
    print(f"config {config}, device {device}, micro-batch {micro}, {warmup} warm-up + {steps} measured steps per path"
          f"{'; smoke: every case in fp32, one CPU thread' if smoke else ''}", flush=True)

    results: dict[str, dict] = {}
    for case in a.cases:
        over, prec, opt = case_overrides(case, base, smoke)
        over = [*a.overrides, *over]
        cfg = load_config(config, over + data)
        flops, peak = training_flops_per_sample(cfg.model), peak_flops(device, prec)
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work.mkdir(parents=True, exist_ok=True) or work))
        print(f"[{case}] trainer: hpdm train, {warmup + steps} steps ...", flush=True)
        t0 = time.perf_counter()
        tr = trainer(config, over + data, run_dir, micro, steps, warmup, run_dir / "train.log", threads)
        print(f"[{case}] trainer {tr['clips_per_s']:.2f} clips/s ({time.perf_counter() - t0:.0f} s); bare step ...", flush=True)
        br = bare(cfg, device, micro, steps, warmup)
        r = {"case": case, "precision": prec, "optimizer": opt, "levels_per_block": list(cfg.model.levels_per_block),
             "flops_per_clip": flops, "bare": br, "trainer": tr, "trainer_over_bare": tr["clips_per_s"] / br["clips_per_s"],
             "mfu": flops * tr["clips_per_s"] / peak if peak else None,
             "mfu_bare": flops * br["clips_per_s"] / peak if peak else None, "run_dir": str(run_dir),
             "memory_estimate_gib": memory_estimate_gib(cfg, micro)}
        r["targets"] = targets(case, r) if with_targets else []
        results[case] = r
    speedups = {}
    for prec in PRECISION:
        ad, na = results.get(f"{prec}/adaptive"), results.get(f"{prec}/non-adaptive")
        if ad and na:
            s = ad["trainer"]["clips_per_s"] / na["trainer"]["clips_per_s"]
            speedups[prec] = {"trainer_speedup": s, "flops_ratio": na["flops_per_clip"] / ad["flops_per_clip"]}
            if with_targets:
                ad["targets"].append({"name": "adaptive/non-adaptive", "value": s, "target": ADAPTIVE_SPEEDUP,
                                      "pass": s >= ADAPTIVE_SPEEDUP})

    mem = "GPU max alloc GiB" if device.type == "cuda" else "host RSS peak GiB (getrusage)"
    head = (f"{'case':24} {'bare clips/s':>12} {'trainer clips/s':>15} {'tr/bare':>7} {'MFU':>6}  "
            f"{'trainer split ms data/fwd+bwd/opt/other':>40}  {'bare fwd+bwd/opt ms':>19}  {mem + ' tr/bare':>31}  targets")
    print("\n" + head + "\n" + "-" * len(head))
    for case, r in results.items():
        tr, br = r["trainer"], r["bare"]
        split = "/".join(f"{tr['split_ms'][k]:.1f}" for k in SPLIT)
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        tg = ", ".join(f"{t['name']} {t['value']:.3g} vs {t['target']:.3g} {'PASS' if t['pass'] else 'FAIL'}" for t in r["targets"])
        print(f"{case:24} {br['clips_per_s']:>12.2f} {tr['clips_per_s']:>15.2f} {r['trainer_over_bare']:>7.2f} "
              f"{mfu:>6}  {split:>40}  "
              f"{br['split_ms']['fwd_bwd']:>9.1f}/{br['split_ms']['optimizer']:<9.1f}  "
              f"{tr['peak_mem_gib']:>15.2f} / {br['peak_mem_gib']:<13.2f}  {r['memory_estimate_gib']:>8.2f}  {tg or '—'}")
    for prec, s in speedups.items():
        print(f"{prec}: adaptive / non-adaptive trainer clips/s {s['trainer_speedup']:.2f} "
              f"(FLOPs per clip non-adaptive / adaptive {s['flops_ratio']:.2f})")
    if not with_targets:
        print("targets: only checked on GPU with configs/ucf101_hpdm_s.yaml")

    if a.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip())
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
               "commit": commit, "dirty_tree": dirty, "torch": torch.__version__, "deepspeed": importlib.metadata.version("deepspeed"),
               "config": config, "overrides": a.overrides, "smoke": smoke, "torch_threads": torch.get_num_threads(),
               "micro_batch": micro, "steps": steps, "warmup": warmup,
               "memory": mem, "bare_step": "no loader, no DeepSpeed, no clipping; optimizer from hpdm.optim on the model's parameters",
               "cases": list(results.values()), "adaptive_speedup": speedups}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.out}")
    return 0 if all(math.isfinite(r["trainer"]["clips_per_s"]) for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
