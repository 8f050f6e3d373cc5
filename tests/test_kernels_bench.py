"""``kernels.bench``: clear refusal without CUDA, and its CPU smoke mode writes a result row per case."""
import argparse
import json

import pytest
import torch

from hpdm.cli import main
from kernels import bench


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_refuses_without_cuda(capsys):
    assert main(["bench-kernels"]) == 2
    assert capsys.readouterr().err.startswith("hpdm bench-kernels: error: --device: cuda, but no CUDA GPU was found")


def test_cpu_smoke_writes_json(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "bench.json"
    assert bench.run(_args("--device", "cpu", "--kernels", "gather,conv", "--reps", "1", "--warmup", "0",
                           "--out", str(out))) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["gather", "conv"]
    assert all(r["fused_ms"] > 0 and r["eager_ms"] > 0 and r["bytes"] > 0 for r in rows)


def test_an_unknown_kernel_is_refused(capsys):
    assert main(["bench-kernels", "--device", "cpu", "--kernels", "gather,convolution"]) == 2
    assert capsys.readouterr().err == ("hpdm bench-kernels: error: --kernels: unknown convolution; choose from gather, "
                                       "fusion, conv\n")
    assert main(["bench-kernels", "--device", "cpu", "--kernels", ","]) == 2  # said "unknown ;"
    assert capsys.readouterr().err.endswith("--kernels: none given; choose from gather, fusion, conv\n")


def test_an_out_that_the_plot_would_replace_is_refused(tmp_path, capsys):
    """The plot goes to OUT with .png: `--out x.png` wrote the results, then replaced them with the plot."""
    assert main(["bench-kernels", "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
    assert "--out: " in capsys.readouterr().err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("kernel,module,name", [("gather", "patch_gather", "gather_pyramid_reference"),
                                                ("fusion", "context_fusion", "context_fusion_reference"),
                                                ("conv", "token_conv", "token_conv_reference")])
def test_compile_baseline_swaps_the_reference_in_its_own_module(kernel, module, name):
    """The torch.compile baseline replaces the reference that the dispatcher calls, and puts it back (the fusion
    one once failed: `import kernels.context_fusion` gives the function of that name, not the module)."""
    import importlib  # noqa: PLC0415

    module = importlib.import_module(f"kernels.{module}")
    orig = getattr(module, name)
    with bench._compiled_reference(kernel):
        assert getattr(module, name) is not orig
    assert getattr(module, name) is orig


def test_progress_is_printed_per_case(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.run(_args("--device", "cpu", "--kernels", "gather", "--reps", "1", "--warmup", "0",
                           "--out", str(tmp_path / "b.json"))) == 0
    out = capsys.readouterr().out
    n = len(json.loads((tmp_path / "b.json").read_text())["rows"])
    assert [line.split("]")[0] for line in out.splitlines() if line.startswith("[")] == [f"[{i}/{n}" for i in range(1, n + 1)]
    assert sum(line.startswith("  fused ") for line in out.splitlines()) == n
