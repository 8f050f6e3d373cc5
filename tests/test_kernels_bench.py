"""``kernels.bench``: clear refusal without CUDA, and its CPU smoke mode writes a result row per case."""
import argparse
import json

import pytest
import torch

from kernels import bench


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_refuses_without_cuda(capsys):
    assert bench.run(_args()) != 0
    assert "CUDA" in capsys.readouterr().out


def test_cpu_smoke_writes_json(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "bench.json"
    assert bench.run(_args("--device", "cpu", "--kernels", "gather", "--reps", "1", "--warmup", "0",
                           "--out", str(out))) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["gather"] and rows[0]["fused_ms"] > 0 and rows[0]["bytes"] > 0
