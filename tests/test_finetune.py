"""Fine-tuning from a low-resolution generator: a multi-level model whose level 0 is the old model."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hpdm.config import Config, ConfigError, load_config
from hpdm.finetune import init_from_generator
from hpdm.model import HPDM
from hpdm.pyramid import boxes_from_offsets, sample_offsets
from tests.helpers import randomize, tiny_model_config
from tests.test_sampling import export_model


def _single_level(patch=(4, 16, 16)):
    return tiny_model_config(patch=patch, levels=1, levels_per_block=(1, 1, 1, 1))


def test_new_levels_keep_the_old_level0_output(tmp_path):
    old_cfg = Config(model=_single_level())
    old = randomize(HPDM(old_cfg.model)).eval()
    path = export_model(old, old_cfg, tmp_path / "lowres.safetensors")
    torch.manual_seed(1)
    new = HPDM(tiny_model_config()).eval()  # 3 levels, same patch and blocks
    fresh = init_from_generator(new, path)
    assert fresh and all(".fuse." in k for k in fresh)
    assert all(new.state_dict()[k].abs().sum() == 0 for k in fresh)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, *new.cfg.patch, generator=g)
    boxes = boxes_from_offsets(sample_offsets(2, 3, new.cfg.patch, g), new.cfg.patch)
    c, labels = torch.randn(2, 3, generator=g), torch.tensor([2, -1])
    with torch.no_grad():
        out = new(x, c, boxes, labels)
        # The 3-level model batches the levels together, so the CPU's matmul blocking may change the last bits:
        # equal up to float32 rounding, not bit for bit.
        torch.testing.assert_close(out[:, :1], old(x[:, :1], c[:, :1], boxes[:, :1], labels), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(out).all()


def test_incompatible_generators_are_refused(tmp_path):
    cfg = Config(model=_single_level(patch=(4, 8, 8)))
    path = export_model(HPDM(cfg.model), cfg, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="train.init_from.*patch"):
        init_from_generator(HPDM(tiny_model_config()), path)
    cfg = Config(model=_single_level())
    cfg.model.token_dim = 64
    path = export_model(HPDM(cfg.model), cfg, tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match="shapes differ"):
        init_from_generator(HPDM(tiny_model_config()), path)
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config("configs/tiny.yaml", [f"train.init_from={tmp_path / 'missing.safetensors'}"])


@pytest.mark.slow
def test_train_starts_from_the_low_resolution_generator(tmp_path):
    base = load_config("configs/tiny.yaml")
    old_cfg = Config(model=base.model.__class__(**{**vars(base.model), "levels": 1, "levels_per_block": (1, 1, 1, 1)}))
    old = randomize(HPDM(old_cfg.model), std=0.2)
    path = export_model(old, old_cfg, tmp_path / "lowres.safetensors")
    cmd = [sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml", f"train.run_dir={tmp_path / 'run'}",
           f"data.shards={tmp_path / 'data'}", "train.steps=1", "train.batch_size=4", "data.synthetic_videos=8",
           "train.sample_at_end=false", f"train.init_from={path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ema = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000001" / "ema.safetensors"))
    # one small step from the old weights: far closer to them than the old weights' own scale (0.2)
    assert (ema["tokenize.weight"] - old.tokenize.weight).abs().max() < 0.02
