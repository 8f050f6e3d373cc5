"""End to end: `hpdm train` on synthetic shards with a real DeepSpeed engine, a checkpoint, a sample, a resume."""
import json
import os
import shutil
import signal
import subprocess
import sys

import av
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hpdm.optim import lr_factor

FAULTS = os.pathsep.join(filter(None, [os.path.join(os.path.dirname(__file__), "faults"), os.environ.get("PYTHONPATH")]))
OVERRIDES = ["train.steps=6", "train.save_every=3", "train.log_every=1", "train.batch_size=4", "train.warmup_steps=2",
             "data.synthetic_videos=12", "data.shuffle_buffer=8", "diffusion.steps=2"]


def _train(run_dir, data_dir, *extra, wandb="disabled"):
    cmd = [sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml", f"train.run_dir={run_dir}",
           f"data.shards={data_dir}", *OVERRIDES, *extra]
    env = {**os.environ, "WANDB_MODE": wandb, "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_checkpoint_sample_and_resume(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    out = _train(run, data, "train.decay=cosine", wandb="offline")
    assert (data / "index.json").is_file(), "the synthetic dataset was not written"
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    state = json.loads((ckpts / "step_00000006" / "state.json").read_text())
    assert state["step"] == 6 and state["samples"] == 24 and state["config"]["train"]["steps"] == 6
    with safe_open(str(ckpts / "step_00000006" / "rank_00000.safetensors"), framework="pt") as f:
        assert "epoch" in json.loads(f.metadata()["loader"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    # the learning rate each step trained with (it logged the next step's: 0 at the last step of a cosine run)
    assert [r["lr"] for r in logged] == pytest.approx([0.002 * lr_factor(s, 2, 6, "cosine") for s in range(6)])
    assert logged[0]["lr"] == pytest.approx(0.001) and logged[-1]["lr"] > 0
    assert [r["step"] for r in rows if "synthetic/one_shape" in r] == [6]  # the measure of the samples at the end
    assert all(r["loss"] > 0 and r["time/step_s"] > 0 and "loss/level2" in r for r in logged)
    ema = load_file(str(ckpts / "step_00000006" / "ema.safetensors"))
    assert "tokenize.weight" in ema and len(ema) > 50
    with av.open(str(run / "samples" / "step_00000006.mp4")) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 32 and frames[0].shape == (128, 128, 3)  # the tiny config's full resolution
    assert list(run.glob("wandb/offline-run-*")), "no offline wandb run was written"
    assert "done: step 6, 24 clips" in out

    # A stop during the end samples (the mp4 is written last) or a preemption at the last step left them unwritten,
    # and a rerun said "already complete" without them. Temporaries of writers killed at a rename (and of a killed
    # conversion) were never removed.
    end = run / "samples" / "step_00000006.mp4"
    end.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f"progress.png.tmp{dead}", f"checkpoints/latest.tmp{dead}", f"config.yaml.tmp{os.getpid()}"):
        (run / name).write_text("half")
    (ckpts / f".step_00000006_universal.tmp{dead}").mkdir()
    out = _train(run, data, "train.decay=cosine")
    assert "writing the end-of-run samples of step 6, which a stop left unwritten" in out and end.is_file()
    assert "already complete: step 6, 24 clips" in out
    assert sorted(p.name for p in [*run.glob("*.tmp*"), *ckpts.glob("*.tmp*")]) == [f"config.yaml.tmp{os.getpid()}"]
    written = end.stat().st_mtime_ns  # a live process's temporary stays; a complete run with its samples: nothing
    assert "writing the end-of-run" not in _train(run, data, "train.decay=cosine") and end.stat().st_mtime_ns == written

    # a resume at another batch size: the progress bar counts what is left at the new one (it ended at 67 %)
    out = _train(run, data, "train.steps=8", "train.batch_size=8", "train.sample_at_end=false")
    assert "resumed from" in out and "(step 6, 24 samples)" in out
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert json.loads((ckpts / "step_00000008" / "state.json").read_text())["samples"] == 40
    assert "100%" in out and "40/40" in out
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003", "step_00000006", "step_00000008"]


def test_a_signal_while_starting_stops_before_the_first_step(tmp_path, sig="SIGUSR1"):
    """SIGUSR1 (SLURM's warning before the time limit) before the handler was installed killed the trainer
    silently (exit -10); SIGTERM and Ctrl-C take the same handler."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": FAULTS, "HPDM_FAULT_SIGNAL": sig}
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml",
                           f"train.run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'data'}", *OVERRIDES],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and f"preempted (signal {getattr(signal, sig).value}) while starting: exiting before " \
        "the first step" in proc.stderr, proc.stderr[-3000:]
    assert "preempted: step 0" in proc.stdout and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    """A full disk during a save: one line naming the checkpoint that is intact (it was a traceback: safetensors'
    and torch.save's errors are no OSError), and a resume from it. A save whose last step, pointing `latest` at
    it, fails leaves no complete folder that `latest` does not name (the next resume set such a folder aside)."""
    run, data = tmp_path / "run", tmp_path / "data"
    _train(run, data, "train.sample_at_end=false")
    ckpts = run / "checkpoints"

    def fail_at(name, *overrides):
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": FAULTS, "HPDM_FAULT_SAVE": name}
        proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml",
                               f"train.run_dir={run}", f"data.shards={data}", *OVERRIDES, *overrides],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr.strip().splitlines()[-1]

    # rank 0's write of the step-9 EMA file fails after DeepSpeed has written its shards
    cmd_overrides = ("train.steps=9", "train.sample_at_end=false")
    error = fail_at("step_00000009/ema.safetensors", *cmd_overrides)
    assert error.startswith(f"hpdm train: error: saving {ckpts / 'step_00000009'}: no space left on device (Error while "
                            "serializing") and "the last complete checkpoint, step_00000006, is as it was" in error, error
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert any((ckpts / "step_00000009").glob("*optim_states.pt")) and not (ckpts / "step_00000009" / "state.json").exists()

    out = _train(run, data, *cmd_overrides)
    assert "(step 6, 24 samples)" in out
    assert (ckpts / "latest").read_text() == "step_00000009"
    assert json.loads((ckpts / "step_00000009" / "state.json").read_text())["step"] == 9

    error = fail_at("checkpoints/latest", "train.steps=12", "train.sample_at_end=false")
    assert "step_00000012: no space left on device" in error and "step_00000009, is as it was" in error, error
    assert (ckpts / "latest").read_text() == "step_00000009" and not (ckpts / "step_00000012" / "state.json").exists()
    out = _train(run, data, "train.steps=12", "train.sample_at_end=false")
    assert "(step 9, 36 samples)" in out and not (ckpts / "set-aside").exists()
    assert (ckpts / "latest").read_text() == "step_00000012"


@pytest.mark.slow
def test_export_round_trip(tmp_path):
    import torch

    from hpdm.export import load_generator
    from hpdm.pyramid import boxes_from_offsets, sample_offsets

    run, data = tmp_path / "run", tmp_path / "data"
    _train(run, data, "train.sample_at_end=false")
    out = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "export", str(run), str(out), "--raw"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ema = load_file(str(run / "checkpoints" / "step_00000006" / "ema.safetensors"))
    cfg, model = load_generator(out)
    _, from_run = load_generator(run)
    _, raw = load_generator(out, raw=True)
    assert cfg.model.patch == (8, 32, 32)
    for name, p in model.named_parameters():
        assert torch.equal(p, ema[name]) and torch.equal(p, dict(from_run.named_parameters())[name])
    assert any(not torch.equal(p, ema[n]) for n, p in raw.named_parameters()), "raw weights equal the EMA"
    boxes = boxes_from_offsets(sample_offsets(1, 3, cfg.model.patch), cfg.model.patch)
    x = torch.randn(1, 3, 3, *cfg.model.patch)
    args = (x, torch.zeros(1, 3), boxes, torch.tensor([1]))
    torch.testing.assert_close(model(*args), from_run(*args), rtol=0, atol=0)


def test_checkpoint_mirrored_to_s3_and_resumed_from_it(tmp_path, s3_server, monkeypatch):
    s3_server.env(monkeypatch)
    run, data = tmp_path / "run", tmp_path / "data"
    uri = f"s3://{s3_server.bucket}/checkpoints/{tmp_path.name}"
    _train(run, data, f"train.checkpoint_uri={uri}", "train.sample_at_end=false", "train.keep_checkpoints=1")
    from data_pipeline.storage import Storage

    storage = Storage()
    assert storage.read_bytes(f"{uri}/latest") == b"step_00000006"
    names = {u.rsplit("/", 1)[1] for u in storage.list(f"{uri}/step_00000006")}
    assert {"state.json", "ema.safetensors", "rank_00000.safetensors", "mp_rank_00_model_states.pt"} <= names
    # step 3 is pruned there too (SeaweedFS keeps the emptied folder itself; S3 has no folders)
    assert [u for u in storage.list(f"{uri}/step_00000003") if not u.endswith("/")] == []

    # another run folder given the same prefix took this run over (its weights, optimizer and data position)
    other = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml",
                            f"train.run_dir={tmp_path / 'other'}", f"data.shards={data}", *OVERRIDES,
                            f"train.checkpoint_uri={uri}", "train.steps=7"], capture_output=True, text=True,
                           env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert other.returncode == 2 and f"holds the checkpoints of the run in {run} (latest step_00000006), not of " \
        f"train.run_dir {tmp_path / 'other'}" in other.stderr, other.stderr[-2000:]
    assert not list((tmp_path / "other").glob("checkpoints/step_*")) and storage.read_bytes(f"{uri}/latest") == b"step_00000006"
    shutil.rmtree(run / "checkpoints")  # a new node: nothing local
    out = _train(run, data, f"train.checkpoint_uri={uri}", "train.steps=7", "train.sample_at_end=false")
    assert "(step 6, 24 samples)" in out
    assert storage.read_bytes(f"{uri}/latest") == b"step_00000007"


def test_no_upload_beside_another_runs_checkpoints(tmp_path, s3_server, monkeypatch):
    """Two runs started on one prefix before either had saved: the first save of the second would mix its files
    into the other's step folders. The upload is refused; the local checkpoint stays complete."""
    import json as json_

    from data_pipeline.storage import Storage
    from hpdm.checkpoint import Checkpointer
    from hpdm.errors import CheckpointError

    s3_server.env(monkeypatch)
    uri, storage = f"s3://{s3_server.bucket}/checkpoints/{tmp_path.name}", Storage()
    storage.write_bytes(f"{uri}/step_00000003/state.json", json_.dumps({"config": {"train": {"run_dir": "/elsewhere"}}}).encode())
    storage.write_bytes(f"{uri}/latest", b"step_00000003")
    ours = tmp_path / "run" / "checkpoints" / "step_00000003"
    ours.mkdir(parents=True)
    (ours / "state.json").write_text("{}")
    (ours / "ema.safetensors").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match=rf"{ours} is complete locally, but uploading .* holds the checkpoints of "
                                              rf"the run in /elsewhere \(latest step_00000003\), not of train.run_dir"):
        Checkpointer(tmp_path / "run", remote=uri, storage=storage)._upload(ours, 0)
    assert not storage.exists(f"{uri}/step_00000003/ema.safetensors")  # nothing of ours went there


def test_old_remote_checkpoints_that_cannot_be_deleted_do_not_stop_the_run(tmp_path, s3_server, monkeypatch, caplog):
    """Credentials that may write but no longer delete: the checkpoint was uploaded and `latest` set, then pruning
    the old one failed and stopped the run as 'uploading it failed'."""
    import json as json_

    from data_pipeline.storage import Storage
    from hpdm.checkpoint import Checkpointer

    s3_server.env(monkeypatch)
    uri, storage = f"s3://{s3_server.bucket}/checkpoints/{tmp_path.name}", Storage(outage=0)
    ckpt = Checkpointer(tmp_path / "run", keep=1, remote=uri, storage=storage)
    for step in (1, 2):
        folder = ckpt.root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json_.dumps({"config": {"train": {"run_dir": str(tmp_path / "run")}}}))
        ckpt.set_latest(folder.name)
        if step == 2:
            def denied(*args, **kwargs):
                raise PermissionError("Access Denied")

            monkeypatch.setattr(storage.s3, "rm", denied)
        with caplog.at_level("WARNING"):
            ckpt._upload(folder, 0)
    assert storage.read_bytes(f"{uri}/latest") == b"step_00000002" and storage.exists(f"{uri}/step_00000002/state.json")
    assert "checkpoint step_00000002 uploaded, but older remote checkpoints could not be deleted" in caplog.text
    assert storage.exists(f"{uri}/step_00000001/state.json")  # kept until a later save can delete it


def test_failed_upload_leaves_a_complete_local_checkpoint(tmp_path, s3_server, monkeypatch):
    s3_server.env(monkeypatch)
    run, data = tmp_path / "run", tmp_path / "data"
    uri = f"s3://{s3_server.bucket}/checkpoints/{tmp_path.name}"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": FAULTS, "HPDM_FAULT_UPLOAD": "step_00000006/ema.safetensors"}
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml", f"train.run_dir={run}",
                           f"data.shards={data}", *OVERRIDES, f"train.checkpoint_uri={uri}", "train.sample_at_end=false"],
                          capture_output=True, text=True, env=env, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("hpdm train: error: checkpoint ") and "is complete locally" in last, last
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    from data_pipeline.storage import Storage

    assert Storage().read_bytes(f"{uri}/latest") == b"step_00000003"
    out = _train(run, data, f"train.checkpoint_uri={uri}", "train.steps=7", "train.sample_at_end=false")
    assert "(step 6, 24 samples)" in out
    assert Storage().read_bytes(f"{uri}/latest") == b"step_00000007"


@pytest.mark.slow
def test_grad_norm_is_logged_at_every_zero_stage(tmp_path):
    """fp32 at ZeRO-0 (where DeepSpeed keeps no norm) logs the same gradient norm as ZeRO-1 computes."""
    norms = {}
    for stage in (0, 1):
        run = tmp_path / f"zero{stage}"
        _train(run, tmp_path / "data", "train.steps=2", "train.optimizer=lamb", "train.precision=fp32",
               f"train.zero_stage={stage}", "train.sample_at_end=false")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        norms[stage] = [r["grad_norm"] for r in rows if "grad_norm" in r]
    assert len(norms[0]) == 2 and all(0 < v < float("inf") for v in norms[0]), norms
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_bf16_at_zero0_warns_that_deepspeed_steps_it_tensor_by_tensor(tmp_path):
    """DeepSpeed's bf16 optimizer at ZeRO-0 synchronises once per gradient tensor (benchmarks/RESULTS.md): the run
    says so and names ZeRO-1, which test_level0_steps_train_level_0_alone_first runs without the warning."""
    out = _train(tmp_path / "run", tmp_path / "data", "train.steps=1", "train.precision=bf16", "train.zero_stage=0",
                 "train.sample_at_end=false")
    assert "bf16 at ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer checks each of the" in out
    assert "train.zero_stage=1 works on flat buffers" in out


def test_level0_steps_train_level_0_alone_first(tmp_path):
    """``train.level0_steps``: the first steps log and train level 0 only (the context-fusion projections, which
    only finer levels use, stay at their zero initialisation); the steps after train every level. bf16 at ZeRO-1,
    where DeepSpeed meets parameters without gradients. Also ``train.profile_steps``."""
    run = tmp_path / "run"
    out = _train(run, tmp_path / "data", "train.steps=3", "train.save_every=2", "train.level0_steps=2",
                 "train.precision=bf16", "train.sample_at_end=false", "train.profile_steps=[1,3]")
    assert "training level 0 alone until step 2, then all 3 levels" in out
    assert "FP16_UnfusedOptimizer" not in out  # bf16 at ZeRO-1
    # train.profile_steps: a trace of steps 1 and 2 as the logs number them (it held steps 2 and 3), each a range
    # named for its step, and the table of the operators that took the most time
    trace = json.loads((run / "profile" / "trace_rank0_steps1-3.json").read_text())
    assert any(e.get("name") == "aten::conv3d" for e in trace["traceEvents"])
    assert sorted({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("step ")}) == ["step 1", "step 2"]
    ops = (run / "profile" / "ops_rank0_steps1-3.txt").read_text()
    assert "aten::mm" in ops and "aten::gelu_backward" in ops and "Self CPU time total" in ops  # fwd and bwd
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [sorted(k for k in r if k.startswith("loss")) for r in rows] == [["loss", "loss/level0"]] * 2 + [
        ["loss", "loss/level0", "loss/level1", "loss/level2"]]
    assert all(r["loss"] == r["loss/level0"] for r in rows[:2])
    assert rows[0]["tflops_per_gpu"] > 0

    def weights(step):
        return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "raw.safetensors"))
    first, second = weights(2), weights(3)
    fuse = [k for k in first if ".fuse." in k]
    assert fuse and all(first[k].abs().max() == 0 for k in fuse), "level 0 alone moved the fusion projections"
    assert any(second[k].abs().max() > 0 for k in fuse), "the finer levels did not train after level0_steps"


def _fake_checkpoint(folder, run, step):
    """A checkpoint folder that `problems` finds intact: state.json with the sizes of its safetensors files."""
    import json as json_

    from safetensors.torch import save_file

    from hpdm.checkpoint_folder import file_sizes

    folder.mkdir(parents=True)
    for name in ("ema.safetensors", "rank_00000.safetensors"):
        save_file({"w": torch.full((4,), float(step))}, str(folder / name))
    state = {"step": step, "samples": 4 * step, "config": {"train": {"run_dir": str(run)}}, "files": file_sizes(folder)}
    (folder / "state.json").write_text(json_.dumps(state))


def test_a_damaged_remote_checkpoint_is_passed_over_for_an_older_intact_one(tmp_path, s3_server, monkeypatch, caplog):
    """A new node resumed from a remote checkpoint with a missing file (or a garbled state.json) marked complete
    (then 'no intact checkpoint'), although intact older ones were there; a garbled state.json was a traceback."""
    from data_pipeline.storage import Storage
    from hpdm.checkpoint import Checkpointer
    from hpdm.checkpoint_folder import read_state
    from hpdm.errors import CheckpointError

    s3_server.env(monkeypatch)
    uri, storage, run = f"s3://{s3_server.bucket}/checkpoints/{tmp_path.name}", Storage(), tmp_path / "run"
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path / "made" / f"step_{step:08d}", run, step)
        for f in sorted((tmp_path / "made" / f"step_{step:08d}").iterdir()):
            storage.upload(str(f), f"{uri}/step_{step:08d}/{f.name}")
    storage.write_bytes(f"{uri}/latest", b"step_00000003")  # step 4: an upload that did not finish
    storage.s3.rm_file(f"{uri}/step_00000004/state.json"[5:])
    storage.s3.rm_file(f"{uri}/step_00000003/ema.safetensors"[5:])
    storage.write_bytes(f"{uri}/step_00000002/state.json", b'{"step": 2, "config": {"tr')  # cut short
    with caplog.at_level("WARNING"):
        got = Checkpointer(run, remote=uri, storage=storage).latest()
    assert got == run / "checkpoints" / "step_00000001" and read_state(got)["step"] == 1
    assert "step_00000003 is damaged" in caplog.text and "ema.safetensors is missing" in caplog.text
    assert "step_00000002 is damaged" in caplog.text and "not an hpdm checkpoint state" in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]  # no damaged copy kept

    # a damaged copy here of an intact remote one: set aside (kept), and the remote one fetched
    (run / "checkpoints" / "step_00000001" / "ema.safetensors").write_bytes(b"garbage")
    storage.write_bytes(f"{uri}/latest", b"step_00000001")
    got = Checkpointer(run, remote=uri, storage=storage).latest()
    assert got == run / "checkpoints" / "step_00000001" and not Checkpointer(run).newest_local() == ""
    assert (run / "checkpoints" / "set-aside" / "step_00000001" / "ema.safetensors").read_bytes() == b"garbage"

    # nothing intact anywhere: an error, not a fresh start over them
    storage.s3.rm_file(f"{uri}/step_00000001/ema.safetensors"[5:])
    storage.write_bytes(f"{uri}/latest", b"step_00000003")
    shutil.rmtree(run / "checkpoints")  # a new node
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .* or train.checkpoint_uri .*ema.safetensors is missing"):
        Checkpointer(run, remote=uri, storage=storage).latest()
