"""Checkpoints under faults and mistakes: a missing or broken ``latest``, truncated files, planted pickles, an
incompatible config, two trainers in one run folder, a run that diverges (issue 14)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpdm.checkpoint import Checkpointer
from hpdm.config import config_differences, load_config
from hpdm.doctor import check_resume
from hpdm.doctor_storage import checkpoint_bytes
from hpdm.errors import CheckpointError, UsageError
from hpdm.export import export, load_generator

pytestmark = pytest.mark.slow
BASE = ["--config", "configs/tiny.yaml", "train.save_every=3", "train.log_every=1", "train.batch_size=4",
        "train.warmup_steps=2", "data.synthetic_videos=12", "data.shuffle_buffer=8", "diffusion.steps=2",
        "train.sample_at_end=false", "train.optimizer=adamw", "train.zero_stage=1"]
ROOT = Path(__file__).resolve().parents[1]


def _hpdm(*args, check=True):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _train(run, data, *extra, check=True):
    return _hpdm("train", *BASE, f"train.run_dir={run}", f"data.shards={data}", *extra, check=check)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A run with complete checkpoints at steps 3 and 6 (ZeRO-1, AdamW) and its data; copied by each test."""
    root = tmp_path_factory.mktemp("ckpt")
    _train(root / "run", root / "data", "train.steps=6")
    return root


@pytest.fixture
def run(template, tmp_path):
    shutil.copytree(template / "run", tmp_path / "run")
    return tmp_path / "run"


def _folder(run, step):
    return run / "checkpoints" / f"step_{step:08d}"


def test_missing_latest_resumes_from_newest_intact(run, caplog):
    (run / "checkpoints" / "latest").unlink()
    assert Checkpointer(run).latest() == _folder(run, 6)
    assert "latest is missing; using step_00000006" in caplog.text
    caplog.clear()  # said once: a source of train.init_from is looked up several times (it was said 3 times)
    assert Checkpointer(run).latest() == _folder(run, 6) and "latest is missing" not in caplog.text


@pytest.mark.parametrize("pointer, said", [
    (b"x" * 300, "names xxx"), (b"\xff\xfe\xfa", "names ?: unreadable"), (b"", "latest is empty"),
    (b"step_00000009", "step_00000009 does not exist"),
    (b"/elsewhere/run/checkpoints/step_00000009", "names /elsewhere/run/checkpoints/step_00000009: not a checkpoint folder"),
])
def test_a_garbled_latest_falls_back_to_the_newest_intact(run, caplog, pointer, said):
    """A long or undecodable `latest` was an OSError or UnicodeDecodeError traceback; an absolute path to another
    run's checkpoint was followed without a word."""
    (run / "checkpoints" / "latest").write_bytes(pointer)
    assert Checkpointer(run).latest() == _folder(run, 6)
    assert said in caplog.text and "using step_00000006" in caplog.text


@pytest.mark.parametrize("broken", ["ema.safetensors", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "state.json"])
def test_broken_newest_falls_back_and_names_the_file(run, caplog, broken):
    f = _folder(run, 6) / broken
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as by a full disk
    assert Checkpointer(run).latest() == _folder(run, 3)
    assert f"latest names step_00000006: {f}" in caplog.text and "using step_00000003, the newest intact" in caplog.text


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(run):
    for step in (3, 6):
        (_folder(run, step) / "ema.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        Checkpointer(run).latest()
    assert str(_folder(run, 3) / "ema.safetensors") in str(e.value) and str(_folder(run, 6) / "ema.safetensors") in str(e.value)


def test_a_checkpoint_file_this_user_cannot_read_is_an_error_not_damage(run, user):
    """An unreadable file (another user's run, a mode taken away) was taken for damage: training fell back to the
    older checkpoint, set the newest aside and trained its steps again; sample and export took the older weights.
    Every file of a checkpoint has the mode that DeepSpeed's own get (safetensors made its files 0600)."""
    folder = _folder(run, 6)
    modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes
    shared = user.dir / "run"
    shutil.copytree(run, shared)
    for p in [shared, *shared.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    ema = _folder(shared, 6) / "ema.safetensors"
    ema.chmod(0o000)
    with user.acting():
        with pytest.raises(CheckpointError, match=f"^{ema}: permission denied .*this user cannot read it"):
            Checkpointer(shared).latest()
        with pytest.raises(CheckpointError, match=f"^{ema}: permission denied"):
            load_generator(str(shared))
    assert (shared / "checkpoints" / "latest").read_text() == "step_00000006" and _folder(shared, 6).is_dir()
    assert not (shared / "checkpoints" / "set-aside").exists()


def test_export_never_writes_into_a_checkpoint(run):
    """`hpdm export RUN RUN/checkpoints/step_6/ema.safetensors` once replaced that checkpoint's own EMA weights, after
    which it no longer verified and resuming fell back to step 3. A path inside any checkpoint is refused, before
    anything is read; beside the checkpoints the file is written whole (through a temporary name)."""
    ema = _folder(run, 6) / "ema.safetensors"
    before = ema.read_bytes()
    outs = {ema: 6, _folder(run, 3) / "model.safetensors": 3, _folder(run, 6) / "new" / "m.safetensors": 6}
    for out, step in outs.items():
        holder = re.escape(str(_folder(run, step).resolve()))
        with pytest.raises(UsageError, match=f"is inside the checkpoint {holder},"):
            export(run, out)
    assert ema.read_bytes() == before and Checkpointer(run).latest() == _folder(run, 6)
    assert not (_folder(run, 3) / "model.safetensors").exists() and not (_folder(run, 6) / "new").exists()
    with pytest.raises(UsageError, match="is a folder: give the file to write"):
        export(run, run)
    assert export(run, run / "model.safetensors") == run / "model.safetensors"
    assert load_generator(run / "model.safetensors")[0].model == load_generator(run)[0].model
    assert not list(run.glob("*.part"))


def test_doctor_sizes_a_checkpoint_as_it_is_written(template):
    """`hpdm doctor`'s disk check: the estimate of one checkpoint against what the run wrote (fp32, ZeRO-1). It
    counted 16 bytes a parameter and was a third under: no raw weights and no fp32 partitions of ZeRO."""
    folder = template / "run" / "checkpoints" / "step_00000006"
    written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    cfg = load_config("configs/tiny.yaml", [*BASE[2:], f"train.run_dir={template / 'run'}"])
    assert checkpoint_bytes(cfg) == pytest.approx(written, rel=0.05)


def test_config_differences_name_the_keys():
    saved = {"model": {"latent_dim": 256, "patch": [4, 8, 8], "kernels": "auto"}, "diffusion": {"p_mean": -1.2, "steps": 128}}
    now = {"model": {"latent_dim": 128, "patch": (4, 8, 8), "kernels": "reference"}, "diffusion": {"p_mean": -1.2, "steps": 32}}
    assert config_differences(saved, now) == ["model.latent_dim: 256 -> 128"]  # sampling-only keys may change


def test_resume_after_lost_latest_and_truncated_newest(run, template):
    """The newest checkpoint is broken and latest is gone: the run resumes from step 3, keeps the broken step 6
    aside (byte for byte), and metrics.jsonl holds each step once."""
    (run / "checkpoints" / "latest").unlink()
    ema = _folder(run, 6) / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:1000])
    broken = {p.relative_to(_folder(run, 6)): p.read_bytes() for p in _folder(run, 6).rglob("*") if p.is_file()}
    out = _train(run, template / "data", "train.steps=7").stderr
    assert "resumed from" in out and "(step 3, 12 samples)" in out
    assert "ema.safetensors has 1000 bytes" in out, out[-3000:]
    aside = run / "checkpoints" / "set-aside" / "step_00000006"
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == broken
    assert (run / "checkpoints" / "latest").read_text() == "step_00000007"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8)), steps


@pytest.mark.parametrize("change, said", [
    ("model.latent_dim=128", "model.latent_dim: 64 -> 128"),
    # the checkpoint's optimizer state is laid out for these: DeepSpeed's load failed deep inside (a KeyError, an
    # AttributeError, a missing file)
    ("train.optimizer=lamb", "train.optimizer: adamw -> lamb"),
    ("train.precision=bf16", "train.precision: fp32 -> bf16"),
    ("train.zero_stage=3", "train.zero_stage: 1 -> 3"),
])
def test_incompatible_resume_is_refused_before_anything_is_written(run, template, change, said):
    config = (run / "config.yaml").read_bytes()
    proc = _train(run, template / "data", "train.steps=9", change, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert said in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "config.yaml").read_bytes() == config
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    # doctor says the same beforehand (it passed such a run folder)
    cfg = load_config("configs/tiny.yaml", [*BASE[2:], f"train.run_dir={run}", change])
    assert check_resume(cfg) == [("resume", "FAIL", f"cannot resume step_00000006 with this config: {said}")]
    assert check_resume(load_config("configs/tiny.yaml", [*BASE[2:], f"train.run_dir={run}"]))[0][:2] == ("resume", "ok")


def test_a_resume_takes_the_configured_lr_and_zero_stage_2(run, template):
    """A changed train.lr was silently ignored on resume: the checkpoint's optimizer and schedule restored the old
    one. ZeRO-2 loads a ZeRO-1 checkpoint (same optimizer partitions). An init_from given to a resume is unused,
    and the record keeps what the run started from (it recorded the unused source, in config.yaml and exports)."""
    out = _train(run, template / "data", "train.steps=8", "train.lr=0.0005", "train.zero_stage=2",
                 f"train.init_from={_folder(run, 3)}").stderr
    assert "resuming with train.lr: 0.002 -> 0.0005" in out
    assert "WARNING hpdm.trainer: train.init_from is not used: this run resumes from its checkpoint step_00000006 (it " \
           "started from scratch)" in out
    assert json.loads((_folder(run, 8) / "state.json").read_text())["config"]["train"]["init_from"] == ""
    assert "init_from: ''" in (run / "config.yaml").read_text()
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lrs[6] == pytest.approx(0.002) and lrs[7] == lrs[8] == pytest.approx(0.0005)
    # a longer cosine schedule moves the learning rate of the next step, which was not said
    out = _train(run, template / "data", "train.steps=10", "train.lr=0.0005", "train.zero_stage=2",
                 "train.decay=cosine").stderr
    assert "resuming with the learning rate of step 9: 0.0005 -> 7.32e-05 (train.steps: 8 -> 10, train.decay: none -> " \
           "cosine)" in out, out[-3000:]


def test_no_pickle_runs_code_on_any_path(template, tmp_path):
    """Payloads in every torch file kind of an ordinary and a universal checkpoint: resume, convert and the raw
    weights refuse each, naming the file, and no payload runs; intact checkpoints still load."""
    shutil.copytree(template / "run", tmp_path / "run")
    _hpdm("convert-checkpoint", str(tmp_path / "run"))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "planted_pickles.py"), str(tmp_path / "run"),
                           "step_00000006"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 13, proc.stdout[-2000:] + proc.stderr[-3000:]
    for r in rows:
        assert not r["ran"], r
        if "intact" in r["case"]:
            assert r["error"] is None, r
        else:
            name = r["case"].split()[-1]
            assert r["error"].startswith("CheckpointError") and f"{name}: refused" in r["error"], r


def test_second_trainer_is_refused_and_a_killed_ones_lock_is_not_stale(run, template):
    """The template's train.lock is left from a finished run; a running trainer holds it; once killed with
    SIGKILL, the next run starts."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen([sys.executable, "-m", "hpdm.cli", "train", *BASE, f"train.run_dir={run}",
                              f"data.shards={template / 'data'}", "train.steps=500", "train.save_every=1000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while f"pid {first.pid} " not in (run / "train.lock").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = _train(run, template / "data", "train.steps=7", check=False)
        assert second.returncode == 2 and f"is in use by another `hpdm train` (pid {first.pid} on" in second.stderr, second.stderr[-2000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert "(step 6, 24 samples)" in _train(run, template / "data", "train.steps=7").stderr


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, template):
    run = tmp_path / "run"
    proc = _train(run, template / "data", "train.steps=8", "train.save_every=1", "train.lr=1e30", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("hpdm train: error: training diverged by step 2: the loss is not finite; the last finite "
                           "loss was") and "at step 1" in line and "train.lr" in line, line
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    assert not (run / "checkpoints" / "step_00000002").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("a bug")])
def test_a_failed_conversion_leaves_no_hidden_folder(run, monkeypatch, error):
    """A conversion that failed (a full disk) left checkpoints/.step_N_universal.tmp, which training ignores and
    nothing removed: the disk stayed full after the user freed what they could see."""
    import hpdm.convert

    def fail(ds_to_universal, ckpt, tmp):
        tmp.mkdir()
        (tmp / "mp_rank_00_model_states.pt").write_bytes(b"half")
        raise error

    monkeypatch.setattr(hpdm.convert, "_convert", fail)
    with pytest.raises(CheckpointError if isinstance(error, OSError) else ValueError) as exc:
        hpdm.convert.convert_to_universal(run)
    if isinstance(error, OSError):
        assert str(exc.value) == (f"converting {_folder(run, 6)}: no space left on device on its filesystem (the universal "
                                  "checkpoint needs about as much again as step_00000006); step_00000006 is as it was")
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".") or "universal" in p.name]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"


def test_a_new_seed_on_resume_draws_new_noise(run, template, tmp_path):
    """train.seed changed on resume reshuffled the data but the noise went on from the checkpoint's generator,
    whatever the seed, while config.yaml recorded the new one."""
    from safetensors import safe_open

    shutil.copytree(run, tmp_path / "same")
    out = _train(run, template / "data", "train.steps=7", "train.seed=5").stderr
    assert "train.seed 0 -> 5: noise, noise levels and pyramid boxes are drawn from the new seed" in out
    assert "train.seed" not in _train(tmp_path / "same", template / "data", "train.steps=7").stderr

    def rng(r):
        with safe_open(str(_folder(r, 7) / "rank_00000.safetensors"), framework="pt") as f:
            return f.get_tensor("rng")

    assert not torch.equal(rng(run), rng(tmp_path / "same"))


def test_a_checkpoint_of_another_world_size_is_said_once(run, monkeypatch):
    """Every rank printed the convert-checkpoint advice, which every rank meets."""
    import hpdm.checkpoint as checkpoint
    from hpdm.errors import RankFailed

    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_world_size", lambda: 2)
    for rank, error in ((0, CheckpointError), (1, RankFailed)):
        monkeypatch.setattr(checkpoint, "_rank", lambda r=rank: r)
        with pytest.raises(error, match="was written by 1 process and this run has 2: run `hpdm convert-checkpoint"):
            Checkpointer(run).load(None, None, _folder(run, 6))
