"""The top rung of the learning ladder (issue 10): `hpdm train` on the synthetic set, from mp4 shards through
DeepSpeed to EMA samples, learns what the clips show. Judged by `hpdm eval-synthetic` on fresh samples, not by
the loss. About 8 minutes on 2 CPU cores."""
import json

import pytest

from tests.helpers import run_hpdm


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 8.4 minutes measured alone on 2 cores, over the default 900 s
def test_tiny_one_level_model_learns_the_synthetic_set(tmp_path):
    run = tmp_path / "run"
    # 3000 steps: the demo's 2000 plus a margin (measured on 64 videos: class_correct 0.81 at 2000, 0.93 at 3000).
    # No loader worker: on 2 cores one competes with the two compute threads (622 s instead of 698 s; 0.96 of 32).
    run_hpdm("train", "--config", "configs/tiny_1level.yaml", f"train.run_dir={run}",
             f"data.shards={tmp_path / 'data'}", "train.steps=3000", "data.num_workers=0", timeout=2100)
    run_hpdm("eval-synthetic", str(run), "-n", "32", "--batch", "16", "--out", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}))
    # One shape of the right colour in nearly every frame (an untrained model: 0; issue 10's specks: 0), of the
    # class's kind and moving the class's way: issue 10's target is class_correct >= 0.8. Measured on 64 videos
    # with the config's pixel head and guidance 4: one_shape 0.96, kind 0.97, direction 1.0, class_correct 0.93;
    # without the pixel head kind was 0.73 and class_correct 0.68.
    assert result["one_shape"] >= 0.85 and result["colour"] >= 0.95, result
    assert result["kind"] >= 0.85 and result["direction"] >= 0.85, result
    assert result["class_correct"] >= 0.8, result
    # The measure logged during training agrees that learning happened, and rose over training.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [r["synthetic/one_shape"] for r in logged if "synthetic/one_shape" in r]
    assert len(measured) == 3 and measured[-1] > measured[0], measured
