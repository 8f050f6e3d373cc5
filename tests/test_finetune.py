"""Fine-tuning from a low-resolution generator: a multi-level model whose level 0 is the old model."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hpdm.config import Config, ConfigError, DiffusionConfig, load_config
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
    fresh = init_from_generator(new, path, DiffusionConfig(), None)
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
        init_from_generator(HPDM(tiny_model_config()), path, DiffusionConfig(), None)
    cfg = Config(model=_single_level())
    cfg.model.token_dim = 64
    path = export_model(HPDM(cfg.model), cfg, tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match="shapes differ"):
        init_from_generator(HPDM(tiny_model_config()), path, DiffusionConfig(), None)


def test_sources_that_cannot_be_used_name_the_key(tmp_path, monkeypatch):
    """A resume, which does not read the source, failed when it had been moved ('no such file'); load errors named
    only a path, as if about the run; an s3:// source was 'no such file or folder'."""
    missing = tmp_path / "missing.safetensors"
    assert load_config("configs/tiny.yaml", [f"train.init_from={missing}"]).train.init_from == str(missing)
    new = HPDM(tiny_model_config())
    with pytest.raises(ConfigError, match=f"^train.init_from: no such file or folder: {missing}$"):
        init_from_generator(new, missing, DiffusionConfig(), None)
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ConfigError, match=f"^train.init_from: {tmp_path / 'foreign.safetensors'}.*no config metadata"):
        init_from_generator(new, tmp_path / "foreign.safetensors", DiffusionConfig(), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"^train.init_from: {tmp_path / 'empty'} is neither a checkpoint folder"):
        init_from_generator(new, tmp_path / "empty", DiffusionConfig(), None)
    with pytest.raises(ConfigError, match="^train.init_from: must be a local file or folder; download s3://b/m.safe"):
        load_config("configs/tiny.yaml", ["train.init_from=s3://b/m.safetensors"])
    monkeypatch.chdir(tmp_path)  # a relative source is recorded as found, so a resume from another folder means the same file
    assert load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                       ["train.init_from=lowres.safetensors"]).train.init_from == str(tmp_path / "lowres.safetensors")


def test_another_text_encoder_is_refused_and_another_sigma_data_said(tmp_path, caplog):
    """A text model fine-tuned on another encoder's embeddings started without a word (resume and sample refuse
    exactly this); a changed sigma_data silently changed what level 0 computes."""
    cfg = Config(model=_single_level())
    model = HPDM(cfg.model)
    path = tmp_path / "lowres.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                        "text_encoder": json.dumps({"encoder": "t5-a", "digest": "aaaa"})})
    with pytest.raises(ConfigError, match=r"^train.init_from: .* another text encoder: t5-a \(digest aaaa\) -> t5-b"):
        init_from_generator(HPDM(tiny_model_config()), path, DiffusionConfig(), {"encoder": "t5-b", "digest": "bbbb"})
    caplog.set_level(logging.INFO, logger="hpdm.finetune")
    fresh = init_from_generator(HPDM(tiny_model_config()), path, DiffusionConfig(sigma_data=1.0), None)
    assert "diffusion.sigma_data 0.5, this run has 1" in caplog.text
    assert f"tensors copied from the EMA weights of {path} (1 to 3 levels); {len(fresh)} new, zero-initialised" in caplog.text


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
