"""End to end: `hpdm train` on synthetic shards with a real DeepSpeed engine, a checkpoint, a sample, a resume."""
import json
import os
import subprocess
import sys

import av
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

OVERRIDES = ["train.steps=6", "train.save_every=3", "train.log_every=1", "train.batch_size=4", "train.warmup_steps=2",
             "data.synthetic_videos=12", "data.shuffle_buffer=8", "diffusion.steps=2"]


def _train(run_dir, data_dir, *extra, wandb="disabled"):
    cmd = [sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml", f"train.run_dir={run_dir}",
           f"data.shards={data_dir}", *OVERRIDES, *extra]
    env = {**os.environ, "WANDB_MODE": wandb, "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_checkpoint_sample_and_resume(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    out = _train(run, data, wandb="offline")
    assert (data / "index.json").is_file(), "the synthetic dataset was not written"
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    state = json.loads((ckpts / "step_00000006" / "state.json").read_text())
    assert state["step"] == 6 and state["samples"] == 24 and state["config"]["train"]["steps"] == 6
    with safe_open(str(ckpts / "step_00000006" / "rank_00000.safetensors"), framework="pt") as f:
        assert "epoch" in json.loads(f.metadata()["loader"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["time/step_s"] > 0 and "loss/level2" in r for r in logged)
    ema = load_file(str(ckpts / "step_00000006" / "ema.safetensors"))
    assert "tokenize.weight" in ema and len(ema) > 50
    with av.open(str(run / "samples" / "step_00000006.mp4")) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)  # level 0 of the tiny config: 8x32x32
    assert list(run.glob("wandb/offline-run-*")), "no offline wandb run was written"
    assert "done: step 6, 24 clips" in out

    out = _train(run, data, "train.steps=8", "train.sample_at_end=false")
    assert "resumed from" in out and "(step 6, 24 samples)" in out
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert json.loads((ckpts / "step_00000008" / "state.json").read_text())["samples"] == 32
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003", "step_00000006", "step_00000008"]
