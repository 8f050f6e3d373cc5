"""benchmarks/train_throughput.py --smoke (CPU, tiny config): every case measured on both paths, a split that adds up
to the step, and non-adaptive FLOPs above adaptive. No timing thresholds: the CPU numbers are noise."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpdm.config import load_config
from hpdm.flops import training_flops_per_sample

ROOT = Path(__file__).resolve().parents[1]
CASES = {"bf16/adaptive", "bf16/non-adaptive", "fp32-lamb/adaptive", "fp32-lamb/non-adaptive"}

pytestmark = pytest.mark.slow


def test_smoke_writes_every_case(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "targets: only checked on GPU" in proc.stdout
    res = json.loads(out.read_text())
    assert res["smoke"] and res["commit"] and res["torch"] and res["deepspeed"] and res["date"]
    cases = {r["case"]: r for r in res["cases"]}
    assert set(cases) == CASES
    for r in cases.values():
        for path in ("bare", "trainer"):
            m = r[path]
            assert m["steps"] >= 1 and math.isfinite(m["clips_per_s"]) and m["clips_per_s"] > 0, (r["case"], path)
            split = m["split_ms"]
            assert set(split) == {"data", "fwd_bwd", "optimizer", "other"}
            assert split["fwd_bwd"] > 0 and split["optimizer"] > 0
            assert abs(sum(split.values()) - m["step_ms"]) <= 0.2 * m["step_ms"], (r["case"], path, split, m["step_ms"])
            assert split["other"] >= -0.2 * m["step_ms"]  # the timed parts do not exceed the step
            assert m["peak_mem_gib"] > 0
        assert r["targets"] == [] and r["mfu"] is None  # CPU: no peak FLOP/s, no targets
        assert r["precision"] == "fp32" and r["optimizer"] == ("lamb" if r["case"].startswith("fp32-lamb") else "adamw")
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.levels_per_block={r['levels_per_block']}"])
        assert r["flops_per_clip"] == training_flops_per_sample(cfg.model)
    for prec in ("bf16", "fp32-lamb"):
        ad, na = cases[f"{prec}/adaptive"], cases[f"{prec}/non-adaptive"]
        assert ad["levels_per_block"] == list(load_config(ROOT / "configs/tiny.yaml").model.levels_per_block)
        assert set(na["levels_per_block"]) == {3}
        assert na["flops_per_clip"] > ad["flops_per_clip"]
        assert na["memory_estimate_gib"] > ad["memory_estimate_gib"] > 0  # every block keeps every level


@pytest.mark.parametrize("option", ["--steps=0", "--micro-batch=0", "--warmup=-1", "--videos=0"])
def test_bad_counts_are_refused_not_replaced(option):
    """--steps 0 and --micro-batch 0 fell back to the defaults; --warmup -1 measured the warm-up step and recorded
    one step more than it measured."""
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--smoke", option], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"argument {option.split('=')[0]}: must be" in proc.stderr, proc.stderr[-2000:]

