"""Run configs: YAML and overrides, errors that name the key (or file and line), ranges of every numeric field,
the default config."""
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import hpdm.cli
from data_pipeline.config import DataConfig
from hpdm.cli import main
from hpdm.config import ConfigError, DiffusionConfig, ModelConfig, TrainConfig, load_config
from hpdm.model import HPDM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides,key", [
    (["model.latent_dimm=3"], "model.latent_dimm"),
    (["trainn.lr=3"], "trainn"),
    (["train.lr=fast"], "train.lr"),
    (["train.steps=1.5"], "train.steps"),
    (["model.coords=1"], "model.coords"),
    (["model.patch=[1,2]"], "model.patch"),
    (["model.patchify=[1,5,4]"], "model.patchify"),
    (["model.cond=image"], "model.cond"),
    (["train.optimizer=sgd"], "train.optimizer"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["model.blocks=5"], "model.levels_per_block"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert err.value.key == key and str(err.value).startswith(key)


def test_yaml_unknown_nested_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  levels: 2\n  levles_per_block: [1, 2]\n")
    with pytest.raises(ConfigError, match="model.levles_per_block: unknown key"):
        load_config(f)


def test_overrides_apply_and_types_convert():
    cfg = load_config("configs/ucf101_hpdm_s.yaml", ["train.lr=1e-3", "model.levels=2", "model.levels_per_block=[1,1,2,2,2,2]",
                                                     "train.deepspeed={zero_optimization: {stage: 2}}"])
    assert cfg.train.lr == 1e-3 and cfg.model.levels == 2 and cfg.model.levels_per_block == (1, 1, 2, 2, 2, 2)
    assert cfg.model.resolution == (32, 128, 128)
    assert cfg.train.deepspeed == {"zero_optimization": {"stage": 2}}
    assert isinstance(cfg.model.patch, tuple) and cfg.train.batch_size == 768
    # an override given twice: the last counts (a script's overrides, then the user's)
    assert load_config("configs/tiny.yaml", ["train.steps=10", "train.lr=0.5", "train.steps=20"]).train.steps == 20


def test_cli_reports_config_error(capsys):
    assert main(["info", "--config", "configs/tiny.yaml", "model.head_dim=7"]) == 2
    assert capsys.readouterr().err == ("hpdm info: error: model.head_dim: must divide model.latent_dim (64) and "
                                       "model.token_dim (64); got 7\n")


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path}/none.yaml: no such config file$"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  levels: 2\n  patch: [1, 2\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert err.value.key == f"{bad}:4"  # where the parser noticed; the message names where the list began
    assert "YAML syntax error" in str(err.value) and "starts on line 3" in str(err.value)
    bad.write_text("model:\n  levels: 2\n   x: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml:3: YAML syntax error: mapping values are not allowed here"):
        load_config(bad)
    bad.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match="bad.yaml: must hold a mapping of sections .*; got a list"):
        load_config(bad)


@pytest.mark.parametrize("overrides,message", [
    (["model.patch=[1,2"], "model.patch: override 'model.patch=[1,2' is not valid YAML: expected ',' or ']'"),
    (["train.deepspeed={a: 1"], "train.deepspeed: override 'train.deepspeed={a: 1' is not valid YAML"),
    (["train.deepspeed=3", "train.deepspeed.x=1"],
     "train.deepspeed: set to a value by one override and to keys by 'train.deepspeed.x=1'"),
    (["train.lr"], "train.lr: overrides must look like section.key=value"),
    # a whole section from an override: `model=` once reset the model to the defaults without a word
    (["model="], "model=: overrides must look like section.key=value"),
    (["train.steps=1:30"], "train.steps: must be an integer; got '1:30'"),  # YAML 1.1's 90
    (['train.run_dir=""'], "train.run_dir: is empty; give the run a folder of its own"),  # was the current folder
    (["train.profile_steps=[2,500]"], "train.profile_steps: ends at step 500, after train.steps=300"),
])
def test_override_errors_name_the_override(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert str(err.value).startswith(message)


def test_yaml_numbers_and_paths_read_as_written(tmp_path, monkeypatch):
    """YAML 1.1 (PyYAML's) reads 010 as octal 8; `~` in a path made a folder named `~`; an empty section or file
    gave the default config (an 11 GiB model) without a word."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("configs/tiny.yaml", ["train.steps=010", "train.seed=0o17", "train.run_dir=~/runs/x"])
    assert cfg.train.steps == 10 and cfg.train.seed == 15 and cfg.train.run_dir == f"{tmp_path}/runs/x"
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml: is empty; give sections"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "section.yaml").write_text("model:\n  # levels: 2\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="^model: is empty; give its keys, or leave the section out"):
        load_config(tmp_path / "section.yaml")


# Numeric fields where 0 or -1 is a legitimate value, and what it means. Every other 0 and -1 must be refused.
VALID_ZERO_OR_MINUS_ONE = {
    ("model.token_conv", 0): "no token convolution",
    ("model.pixel_head", 0): "no pixel head",
    ("model.cond_dropout", 0): "never drop the condition (no guidance training)",
    ("diffusion.p_mean", 0): "mean of ln(sigma): any real number",
    ("diffusion.p_mean", -1): "mean of ln(sigma): any real number",
    ("diffusion.guidance", 0): "the unconditional prediction alone",
    ("diffusion.s_churn", 0): "deterministic level-0 sampler",
    ("diffusion.fine_start", 0): "finer levels start from noise",
    ("train.micro_batch", 0): "batch_size / processes, no accumulation",
    ("train.betas", 0): "beta1 = 0: no momentum",
    ("train.weight_decay", 0): "no weight decay",
    ("train.warmup_steps", 0): "no warm-up",
    ("train.grad_clip", 0): "no gradient clipping (DeepSpeed's 0)",
    ("train.ema_halflife", 0): "the EMA follows the raw weights",
    ("train.zero_stage", 0): "no ZeRO",
    ("train.seed", 0): "a seed",
    ("train.max_skipped_steps", 0): "stop at the first skipped optimizer step",
    ("train.profile_steps", 0): "[0, end): profile from the first step",
    ("train.sample_every", 0): "no samples while training",
    ("train.level0_steps", 0): "every level from the first step",
    ("data.num_workers", 0): "load in the training process",
    ("data.shuffle_buffer", 0): "no shuffling",
    ("data.fps", 0): "keep the native frame rate",
    ("data.max_skip_fraction", 0): "no bad sample tolerated",
    ("data.skip_check_after", 0): "apply max_skip_fraction from the first sample",
    ("data.io_retries", 0): "no retries",
    ("data.io_backoff", 0): "retry at once",
    ("data.image_batch_fraction", 0): "no still images in a batch (without data.image_shards)",
}
SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig, "data": DataConfig}
BASE = load_config("configs/tiny.yaml")


def _numeric_cases():
    """(key, value, override) for 0 and -1 in every int or float field (the first entry of a tuple of them)."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            number = tp in (int, float) or typing.get_origin(tp) is tuple and typing.get_args(tp)[0] in (int, float)
            if not number:
                continue
            current = getattr(getattr(BASE, section), f.name)
            for v in (0, -1):
                value = [v, *current[1:]] if isinstance(current, tuple) else v
                yield f"{section}.{f.name}", v, f"{section}.{f.name}={value}"


NUMERIC_CASES = list(_numeric_cases())


@pytest.mark.parametrize("key,value,override", NUMERIC_CASES, ids=[c[2] for c in NUMERIC_CASES])
def test_every_numeric_field_is_range_checked(key, value, override):
    if (key, value) in VALID_ZERO_OR_MINUS_ONE:
        load_config("configs/tiny.yaml", [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert err.value.key == key
    assert str(value) in str(err.value).rpartition("got ")[2], str(err.value)  # the value is named too


def test_the_allow_list_names_only_real_cases():
    assert set(VALID_ZERO_OR_MINUS_ONE) <= {(k, v) for k, v, _ in NUMERIC_CASES}


def test_default_config_is_found_from_any_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "info"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "video 32x128x128" in proc.stdout  # configs/tiny.yaml's model
    assert f"using {hpdm.cli.DEFAULT_CONFIG}" in proc.stderr


def test_a_foreign_kernels_package_is_named_at_import(tmp_path):
    """Hugging Face's `kernels` (required by transformers >= 5.25) shadowing hpdm's gets the fix, not a TypeError."""
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("CUDAProperties = object\n")
    proc = subprocess.run([sys.executable, "-c", "import hpdm.model"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, timeout=300)
    assert proc.returncode == 1
    assert f"ImportError: `import kernels` finds {foreign / '__init__.py'}, not hpdm's fused kernels" in proc.stderr
    assert "pip uninstall kernels" in proc.stderr


def test_without_the_default_config_file_config_is_required(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hpdm.cli, "DEFAULT_CONFIG", tmp_path / "configs" / "tiny.yaml")
    assert main(["train"]) == 2
    assert capsys.readouterr().err == (f"hpdm train: error: --config: not given, and the default {tmp_path}/configs/"
                                       "tiny.yaml does not exist (this installation of hpdm has no configs/ folder); "
                                       "pass --config FILE\n")


def test_info_prints_counts_and_flops(capsys):
    assert main(["info", "--config", "configs/ucf101_hpdm_s.yaml"]) == 0
    out = capsys.readouterr().out
    total = int(next(line for line in out.splitlines() if line.startswith("total")).split()[-1].replace(",", ""))
    assert 160e6 < total < 196e6
    assert "GFLOP/sample" in out and "activation memory" in out
    # memory at the micro-batch a run takes (was micro-batch 1 whatever the config said)
    assert "memory estimate per process, micro-batch 4 (train.micro_batch)" in out
    assert main(["info", "--config", "configs/ucf101_hpdm_s.yaml", "train.micro_batch=0", "--processes", "64"]) == 0
    assert "micro-batch 12 (64 processes)" in capsys.readouterr().out
    assert main(["info", "--config", "configs/ucf101_hpdm_s.yaml", "--processes", "8", "--micro-batch", "8"]) == 0
    assert "micro-batch 8 (--micro-batch, 8 processes)" in capsys.readouterr().out
    assert main(["info", "--config", "configs/tiny_1level.yaml", "--micro-batch", "1000000"]) == 0  # meta tensors only
    assert "micro-batch 1000000 (--micro-batch)" in capsys.readouterr().out
    assert main(["info", "--config", "configs/ucf101_hpdm_s.yaml", "train.micro_batch=0"]) == 0
    assert "micro-batch 1 (train.micro_batch is unset, so a run takes train.batch_size / processes (768 / P)" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_builds(path):
    """Each config in configs/ validates and builds its model (on the meta device: no memory for HPDM-T2V)."""
    cfg = load_config(path)
    with torch.device("meta"):
        net = HPDM(cfg.model)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_a_runs_recorded_config_continues_that_run_from_anywhere(tmp_path, monkeypatch, caplog):
    """`hpdm train --config RUN/config.yaml` trained the original folder of a copied run (its recorded run_dir),
    and from another working folder started afresh in a new folder (a relative run_dir and data.shards)."""
    from hpdm.config import save_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.run_dir=runs/a", "data.shards=data/x"])
    assert cfg.train.run_dir == str(tmp_path / "runs" / "a") and cfg.data.shards == str(tmp_path / "data" / "x")
    assert load_config(ROOT / "configs" / "tiny.yaml", ["data.shards=s3://b/x"]).data.shards == "s3://b/x"
    (tmp_path / "copy").mkdir()
    save_config(cfg, tmp_path / "copy" / "config.yaml")  # the record of runs/a, copied to copy/
    monkeypatch.chdir(tmp_path / "copy")
    with caplog.at_level("WARNING"):
        moved = load_config("config.yaml")
    assert moved.train.run_dir == str(tmp_path / "copy") and moved.data.shards == str(tmp_path / "data" / "x")
    assert f"is the record of the run in {tmp_path / 'copy'}, which this continues" in caplog.text
    assert load_config("config.yaml", ["train.run_dir=../b"]).train.run_dir == str(tmp_path / "b")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("# my own\ntrain:\n  run_dir: ../runs/c\n")  # not a record
    assert load_config(tmp_path / "mine" / "config.yaml").train.run_dir == str(tmp_path / "runs" / "c")


def test_the_key_reference_is_current_and_says_what_every_key_does():
    """docs/config.md is written from the dataclasses and their comments: a key added, removed, renamed or given
    another default without regenerating it fails here, and so does a key without a comment saying what it does."""
    from hpdm.config_reference import reference

    text = reference()
    assert (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text() == text, \
        "docs/config.md is stale: python -m hpdm.config_reference > docs/config.md"
    rows = [r.split(" | ") for r in text.splitlines() if r.startswith("| `")]
    keys = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert {r[0].strip("| `") for r in rows} == keys
    assert not [r[0] for r in rows if not r[3].strip(" |")], "keys without a meaning"

