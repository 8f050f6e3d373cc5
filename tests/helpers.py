"""Small shared pieces for tests: a tiny model config, weight randomisation, running the ``hpdm`` command."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from hpdm.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(patch=(4, 16, 16), levels=3, patchify=(1, 4, 4), token_dim=32, latent_dim=32, num_latents=8,
                blocks=4, latent_layers=1, levels_per_block=(1, 2, 2, 3), head_dim=16, num_classes=5,
                data_mlp_ratio=2.0, mlp_ratio=2.0, kernels="reference", pixel_head=4)
    base.update(overrides)
    return ModelConfig(**base)


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (zero-initialised gates and projections included) with random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def run_hpdm(*args: str, timeout: float = 600) -> str:
    """Run the ``hpdm`` command (wandb off) as a user would; asserts that it succeeds and returns its output."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr
