"""Guards of the training loop: divergence, labels outside the model's classes, settings it cannot use."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline import DataError
from hpdm.checkpoint import Checkpointer
from hpdm.config import ConfigError, is_recorded_config, load_config, save_config
from hpdm.divergence import DivergenceGuard
from hpdm.errors import DivergenceError
from hpdm.trainer import _cond, _prepare


def test_nonfinite_loss_is_reported_at_the_next_check_with_the_last_finite_loss():
    guard = DivergenceGuard(max_skipped=5, device=torch.device("cpu"))
    guard.step(torch.tensor([0.5, 0.4]), skipped_steps=0, step=1)
    guard.check(1, 0.45)
    guard.step(torch.tensor([float("nan"), 0.4]), skipped_steps=0, step=2)
    guard.step(torch.tensor([0.5, 0.4]), skipped_steps=0, step=3)  # counted on the device, not lost
    with pytest.raises(DivergenceError, match=r"by step 3: the loss is not finite; the last finite loss was 0.45 at step 1"):
        guard.check(3)


def test_a_streak_of_skipped_steps_stops_but_isolated_skips_do_not():
    guard = DivergenceGuard(max_skipped=2, device=torch.device("cpu"), skipped_before=7)
    finite = torch.tensor([0.5])
    for step, skipped in enumerate([8, 8, 9, 10, 10], start=1):  # skips at steps 1, 3, 4: at most 2 in a row
        guard.step(finite, skipped, step)
    assert guard.skipped_total == 3
    guard.step(finite, 11, 6)
    guard.step(finite, 12, 7)
    with pytest.raises(DivergenceError, match="skipped the last 3 optimizer steps"):
        guard.step(finite, 13, 8)


def test_labels_beyond_num_classes_name_both_numbers():
    cfg = load_config("configs/tiny.yaml", ["model.num_classes=5"])
    assert _cond(cfg, {"label": torch.tensor([0, 4, -1])}, "cpu").labels.tolist() == [0, 4, -1]  # -1: unlabelled
    with pytest.raises(DataError, match=r"label 7 but model.num_classes is 5"):
        _cond(cfg, {"label": torch.tensor([1, 7])}, "cpu")


def test_a_run_dir_that_cannot_be_made_or_written_names_the_key(tmp_path):
    """A run_dir under a file was a NotADirectoryError traceback, a read-only one an OSError from the lock."""
    (tmp_path / "afile").write_text("the user's file")
    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path / 'afile' / 'run'}"])
    with pytest.raises(ConfigError, match=r"^train.run_dir: cannot create .*afile/run: Not a directory"):
        _prepare(cfg, Checkpointer(cfg.train.run_dir))
    assert (tmp_path / "afile").read_text() == "the user's file"
    (tmp_path / "run" / "train.lock").mkdir(parents=True)  # the lock cannot be written: was an OSError traceback
    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^train.run_dir: cannot write .*train.lock: Is a directory"):
        _prepare(cfg, Checkpointer(cfg.train.run_dir))


@pytest.mark.parametrize("inside", ["checkpoints/step_00000002", "checkpoints/step_00000002/sub", "checkpoints"])
def test_a_run_dir_inside_another_runs_checkpoints_is_refused(tmp_path, inside):
    """It was taken: a new run trained from scratch inside the checkpoint (meant as "resume from here"), and the
    parent run's pruning deleted it with the checkpoint later."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    (ckpt.parent / "latest").write_text(ckpt.name)
    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path / 'run' / inside}"])
    with pytest.raises(ConfigError, match=f"^train.run_dir: .* the checkpoint.*; to continue that run, give its folder: "
                                          f"train.run_dir={tmp_path / 'run'}$"):
        _prepare(cfg, Checkpointer(cfg.train.run_dir))
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json"] and not (ckpt / "sub").exists()


@pytest.mark.parametrize("warmup,warned", [(100, True), (99, False)])
def test_a_warmup_that_never_ends_is_warned_about(tmp_path, caplog, warmup, warned):
    """train.warmup_steps >= train.steps (e.g. the default 10,000 in a short run) trained at a fraction of train.lr."""
    (tmp_path / "afile").write_text("")  # stops _prepare right after its checks of the config
    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path / 'afile' / 'run'}", "train.steps=100",
                                            f"train.warmup_steps={warmup}"])
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match="^train.run_dir"):
        _prepare(cfg, Checkpointer(cfg.train.run_dir))
    assert ("train.warmup_steps (100) is not below train.steps (100): the learning rate never reaches" in caplog.text
            ) == warned, caplog.text


@pytest.mark.parametrize("overrides,said", [
    (["model.cond=class", "data.text_encoder=/models/t5"], "data.text_encoder has no effect on a model with "
                                                           "model.cond=class (set model.cond=text to train on captions)"),
    (["data.text_embeddings=emb"], "data.text_embeddings has no effect on a model with model.cond=class"),
    (["train.level0_steps=100"], "train.level0_steps (100) is not below train.steps (100): the finer levels never train"),
])
def test_settings_without_effect_are_warned_about(tmp_path, caplog, overrides, said):
    """Accepted in silence: captions of a class model (model.cond's default), a level-0 phase as long as the run."""
    (tmp_path / "afile").write_text("")  # stops _prepare right after its checks of the config
    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path / 'afile' / 'run'}", "train.steps=100",
                                            *overrides])
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match="^train.run_dir"):
        _prepare(cfg, Checkpointer(cfg.train.run_dir))
    assert said in caplog.text


def test_a_config_of_the_users_in_the_run_folder_is_never_overwritten(tmp_path):
    """`--config RUN/config.yaml` was replaced by the resolved config: comments gone, one-off overrides baked in."""
    run, ours = tmp_path / "run", Path("configs/tiny_1level.yaml")
    run.mkdir()
    shutil.copy(ours, run / "config.yaml")
    cfg = load_config(str(run / "config.yaml"), [f"train.run_dir={run}", "train.steps=1"])
    with pytest.raises(ConfigError, match=r"^train.run_dir: .*config.yaml was not written by `hpdm train`"):
        _prepare(cfg, Checkpointer(cfg.train.run_dir))
    assert (run / "config.yaml").read_text() == ours.read_text()
    save_config(cfg, run / "config.yaml")  # what training records there, it may rewrite at the next start
    assert is_recorded_config(run / "config.yaml")
    assert load_config(str(run / "config.yaml"), []).to_dict() == cfg.to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # recorded before the header
    assert is_recorded_config(run / "config.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("override, said", [
    ("model.kernels=fused", "model.kernels: fused needs a CUDA GPU (or TRITON_INTERPRET=1); use auto or reference"),
    # a typo inside train.deepspeed ended in pydantic's traceback
    ("train.deepspeed={zero_optimization: {stagee: 2}}", "train.deepspeed: DeepSpeed refuses DeepSpeedZeroConfig: stagee: "),
])
def test_settings_training_cannot_use_are_one_line_errors(tmp_path, override, said):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny_1level.yaml",
                           f"train.run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'data'}",
                           "data.synthetic_videos=8", "train.steps=1", override], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and f"hpdm train: error: {said}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_wandb_that_cannot_start_is_a_one_line_error(tmp_path):
    """WANDB_MODE=online without a login ended in wandb's UsageError traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny_1level.yaml",
                           f"train.run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'data'}",
                           "data.synthetic_videos=8", "train.steps=1", "data.num_workers=0"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "hpdm train: error: wandb (WANDB_MODE=online) did not start: " in proc.stderr, proc.stderr[-3000:]
    assert "WANDB_MODE=offline" in proc.stderr and "Traceback" not in proc.stderr


def test_a_profile_window_that_a_resume_enters_traces_the_rest_of_it(tmp_path, caplog):
    """A run resumed inside train.profile_steps traced nothing, and one resumed after it did not say so."""
    from hpdm.profiler import StepProfiler

    prof = StepProfiler((2, 5), tmp_path, 0, torch.device("cpu"), first=3)  # steps 2-4 wanted, 1-3 done
    for step in range(4, 7):  # called before each step, numbered as in the logs
        prof.at(step)
        torch.ones(8).sum()
    trace = json.loads((tmp_path / "trace_rank0_steps4-5.json").read_text())["traceEvents"]
    assert {e["name"] for e in trace if e.get("name", "").startswith("step ")} == {"step 4"}
    assert (tmp_path / "ops_rank0_steps4-5.txt").is_file()
    with caplog.at_level("WARNING"):
        late = StepProfiler((2, 5), tmp_path / "late", 0, torch.device("cpu"), first=4)
        late.at(5)
        late.finish()
    assert "train.profile_steps [2, 5] lies before step 5, where this run resumes" in caplog.text
    assert not (tmp_path / "late").exists()


def test_wandb_mode_is_checked_up_front_and_a_new_start_is_a_new_wandb_run(tmp_path, monkeypatch):
    from hpdm.errors import UserError
    from hpdm.metrics import Metrics, wandb_mode

    for bad in ("off", "OFFLINE", "dryrun please"):
        monkeypatch.setenv("WANDB_MODE", bad)
        with pytest.raises(UserError, match=rf"WANDB_MODE='{bad}' is not a wandb mode: use one of offline, online"):
            wandb_mode()
    monkeypatch.setenv("WANDB_MODE", "")  # set but empty, as scripts leave it: the default (wandb refused it)
    assert wandb_mode() == "offline"

    def run_id(folder: str, resumed_at: int) -> str:
        Metrics({"train": {}}, tmp_path / folder, "hpdm-test", 0, resumed_at=resumed_at).close()
        return (tmp_path / folder / "wandb_run_id").read_text().split()[0]

    (tmp_path / "run").mkdir()
    ids = [run_id("run", resumed_at) for resumed_at in (0, 0, 8)]  # a start, a start over (no checkpoint), a resume
    assert ids[0] != ids[1] == ids[2]  # wandb drops steps below those it has: a start over must not reuse the run
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # to branch an experiment: a wandb run of its own
    os.replace(tmp_path / "run", tmp_path / "moved")  # a moved run folder is the same run
    copy = run_id("copy", 8)
    assert copy not in ids and run_id("copy", 8) == copy and run_id("moved", 8) == ids[2]


def test_a_resume_drops_the_samples_of_the_steps_it_trains_again(tmp_path, monkeypatch):
    """After a kill, samples/ kept grids of steps rolled back, whose metrics lines were dropped."""
    from hpdm.metrics import Metrics

    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "samples").mkdir()
    names = ["step_00000004.png", "step_00000008.png", "step_00000008.mp4", "notes.txt"]
    for name in names:
        (tmp_path / "samples" / name).write_text("x")
    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n{"step": 8, "loss": 0.5}\n')
    Metrics({}, tmp_path, "p", rank=0, resumed_at=5).close()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["notes.txt", "step_00000004.png"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 4, "loss": 1.0}\n'


def test_closing_the_metrics_of_a_failed_run_keeps_its_error(tmp_path, monkeypatch, caplog):
    """After a failure (a full disk), wandb's finish (or the file's close) raised in the trainer's clean-up and
    replaced the error that said which checkpoint was intact. Both are closed, whatever fails first."""
    from hpdm.metrics import Metrics

    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls = []

    class Failing:
        dir = str(tmp_path)

        def close(self):
            calls.append("file")
            raise OSError(28, "No space left on device")

        def finish(self, exit_code=0):
            calls.append(("wandb", exit_code))
            raise OSError(28, "No space left on device")

    for failed in (True, False):
        metrics = Metrics({"train": {}}, tmp_path, "hpdm-test", 0)
        metrics.file.close()
        metrics.file, metrics.run = Failing(), Failing()
        calls.clear()
        if failed:
            metrics.close(failed=True)
            assert "wandb was not closed cleanly" in caplog.text
        else:
            with pytest.raises(OSError):
                metrics.close()
        assert calls == ["file", ("wandb", int(failed))]


def test_mfu_takes_the_peak_of_the_card_not_of_its_chip():
    """Every H100 and H200 got the SXM module's peak: MFU on PCIe and NVL cards read 16-24 % low; an L40 had none."""
    from hpdm.metrics import peak_flops

    cuda = torch.device("cuda")
    assert peak_flops(cuda, "bf16", "NVIDIA H100 80GB HBM3") == peak_flops(cuda, "bf16", "NVIDIA H200") == 989e12
    assert peak_flops(cuda, "bf16", "NVIDIA H100 PCIe") == 756e12 and peak_flops(cuda, "fp32", "NVIDIA H100 PCIe") == 378e12
    assert peak_flops(cuda, "bf16", "NVIDIA H100 NVL") == peak_flops(cuda, "bf16", "NVIDIA H200 NVL") == 835e12
    assert peak_flops(cuda, "bf16", "NVIDIA L40") == 181e12 and peak_flops(cuda, "bf16", "NVIDIA L40S") == 362e12
    assert peak_flops(cuda, "bf16", "NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops(cuda, "bf16", "NVIDIA A10") == 125e12
    assert peak_flops(cuda, "bf16", "NVIDIA RTX 6000 Ada Generation") is None
    assert peak_flops(torch.device("cpu"), "bf16") is None

