"""The top rung of the learning ladder (issue 10): `hpdm train` on the synthetic set, from mp4 shards through
DeepSpeed to EMA samples, learns what the clips show. Judged by `hpdm eval-synthetic` on fresh samples, not by
the loss. About 12 minutes on 2 CPU cores."""
import json

import pytest

from tests.helpers import run_hpdm


@pytest.mark.slow
def test_tiny_one_level_model_learns_the_synthetic_set(tmp_path):
    run = tmp_path / "run"
    # 3000 steps (the demo's 2500 plus the steps in which the class's direction of motion is learnt; 2000: 0.5)
    run_hpdm("train", "--config", "configs/tiny_1level.yaml", f"train.run_dir={run}", f"data.shards={tmp_path / 'data'}",
             "train.steps=3000", timeout=1800)
    run_hpdm("eval-synthetic", str(run), "-n", "32", "--batch", "16", "--out", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}))
    # One shape of the right colour in nearly every frame (an untrained model: 0; issue 10's specks: 0), moving
    # the class's way: measured 0.94 / 1.0 / 0.91, class_correct 0.58 (kind, square or circle of 7 pixels, the
    # weak part) with the config's guidance 4; without guidance direction was 0.53 and class_correct 0.37.
    assert result["one_shape"] >= 0.8 and result["colour"] >= 0.9 and result["direction"] >= 0.75, result
    assert result["class_correct"] >= 0.4, result
    # The measure logged during training agrees that learning happened, and rose over training.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [r["synthetic/one_shape"] for r in logged if "synthetic/one_shape" in r]
    assert len(measured) == 3 and measured[-1] > measured[0], measured
