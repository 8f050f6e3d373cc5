import pytest

from hpdm.cli import main
from hpdm.config import ConfigError, load_config


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
    (["train.optimizer=lamb", "train.zero_stage=1"], "train.optimizer"),
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


def test_cli_reports_config_error(capsys):
    assert main(["info", "--config", "configs/tiny.yaml", "model.head_dim=7"]) == 2
    assert "model.head_dim" in capsys.readouterr().err


def test_info_prints_counts_and_flops(capsys):
    assert main(["info", "--config", "configs/ucf101_hpdm_s.yaml"]) == 0
    out = capsys.readouterr().out
    total = int(next(line for line in out.splitlines() if line.startswith("total")).split()[-1].replace(",", ""))
    assert 160e6 < total < 196e6
    assert "GFLOP/sample" in out and "activation memory" in out
