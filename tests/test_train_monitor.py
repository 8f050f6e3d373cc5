"""Learning made visible (issue 10): sample grids and the synthetic measure during `hpdm train`, the progress
plot, `hpdm eval-synthetic`, and the raw weights of a run or checkpoint folder from the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hpdm.export import load_generator
from tests.helpers import run_hpdm

ENV = {**os.environ, "WANDB_MODE": "disabled"}


@pytest.mark.slow
def test_samples_measure_and_raw_weights_of_a_run(tmp_path):
    run = tmp_path / "run"
    run_hpdm("train", "--config", "configs/tiny.yaml", f"train.run_dir={run}", f"data.shards={tmp_path / 'data'}",
          "train.steps=4", "train.save_every=2", "train.log_every=1", "train.batch_size=4", "train.sample_every=2",
          "train.sample_videos=2", "data.synthetic_videos=8", "data.shuffle_buffer=4", "diffusion.steps=2")
    # a grid every 2 steps (the last with the end-of-training video): 2 videos x 3 levels rows of 128x128 frames
    for step in (2, 4):
        grid = np.asarray(Image.open(run / "samples" / f"step_{step:08d}.png"))
        assert grid.shape[0] == 2 * 3 * 128 and grid.shape[2] == 3
    assert (run / "samples" / "step_00000004.mp4").is_file()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in logged if "synthetic/class_correct" in r]
    assert [r["step"] for r in measured] == [2, 4]
    assert all(0.0 <= r["synthetic/one_shape"] <= 1.0 and len([k for k in r if "coarse_to_fine" in k]) == 2 for r in measured)
    assert Image.open(run / "progress.png").size[0] > 500

    # Raw and EMA weights differ after 4 steps (EMA half-life 2000 clips), and both load from run and checkpoint folders.
    ckpt = run / "checkpoints" / "step_00000004"
    raw = load_file(str(ckpt / "raw.safetensors"))
    _, ema_net = load_generator(run)
    _, raw_net = load_generator(run, raw=True)
    _, raw_ckpt_net = load_generator(ckpt, raw=True)
    assert torch.equal(raw_net.tokenize.weight, raw["tokenize.weight"])
    assert torch.equal(raw_ckpt_net.tokenize.weight, raw["tokenize.weight"])
    assert not torch.equal(ema_net.tokenize.weight, raw["tokenize.weight"])

    out = run_hpdm("eval-synthetic", str(run), "--raw", "-n", "2", "--steps", "2", "--out", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["videos"] == 2 and len(result["levels"]) == 3 and len(result["coarse_to_fine_rms"]) == 2
    assert f"class_correct: {result['class_correct']:.3f}" in out
    run_hpdm("sample", str(ckpt), "--raw", "-n", "1", "--steps", "2", "--out", str(tmp_path / "videos"))
    assert list((tmp_path / "videos").glob("*.mp4"))

    # --out replaces an earlier result, and nothing else (it replaced the generator, metrics.jsonl, config.yaml)
    run_hpdm("eval-synthetic", str(run), "-n", "1", "--steps", "2", "--out", str(tmp_path / "eval.json"))
    assert json.loads((tmp_path / "eval.json").read_text())["videos"] == 1
    history = (run / "metrics.jsonl").read_text()
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "eval-synthetic", str(run), "-n", "1", "--out",
                           str(run / "metrics.jsonl")], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "is not an earlier result of this command" in proc.stderr, proc.stderr[-2000:]
    assert (run / "metrics.jsonl").read_text() == history

    # trained on the same shards without data.synthetic: measured, with a warning that the score assumes the set
    other = tmp_path / "other"
    run_hpdm("train", "--config", "configs/tiny.yaml", f"train.run_dir={other}", f"data.shards={tmp_path / 'data'}",
             "data.synthetic=false", "train.steps=2", "train.batch_size=4", "train.sample_at_end=false",
             "data.shuffle_buffer=4")
    assert Image.open(other / "progress.png").size[0] > 300  # drawn at the end, also without samples
    out = run_hpdm("eval-synthetic", str(other), "-n", "1", "--steps", "2")
    assert "was trained with data.synthetic false" in out and "class_correct: " in out
