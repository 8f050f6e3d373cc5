"""The kernels compile for an H100 (sm_90) even on a machine without a GPU (catches code-generation errors)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len([l for l in lines if " OK " in l]) == 7
    kernel = {l.split()[0]: l for l in lines if " OK " in l}
    for name in ("fusion-forward", "token-conv", "token-conv-wgrad"):  # 16-byte loads along the channel dimension
        assert "ld.global.v4" in kernel[name], kernel[name]
    for name in ("gather", "gather-per-dim"):  # the clip is read in 4-byte words, never byte by byte
        assert "ld.global.b32" in kernel[name] and ".b8" not in kernel[name], kernel[name]
    for name in ("fusion-forward", "fusion-backward"):  # the w-axis resampling runs on the matrix units
        assert "HMMA" in kernel[name], kernel[name]
    assert not any("LDL" in l or "STL" in l for l in kernel.values()), lines  # no register spills
