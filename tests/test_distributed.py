"""Distributed training on CPU with real DeepSpeed engines, 2 processes started by the `deepspeed` launcher."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
BASE = ["--config", "configs/tiny.yaml", "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2",
        "data.synthetic_videos=12", "data.shuffle_buffer=8", "diffusion.steps=2", "train.sample_at_end=false"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(procs: int, run: Path, data: Path, *overrides, launcher: list[str] | None = None) -> list[str]:
    """`hpdm train` in one process, or under the deepspeed launcher (``launcher`` replaces its default flags)."""
    args = ["hpdm.cli", "train", *BASE, f"train.run_dir={run}", f"data.shards={data}", *overrides]
    if procs == 1:
        return [sys.executable, "-m", *args]
    launcher = launcher or ["--num_gpus", str(procs), "--master_port", str(_port())]
    return [str(Path(sys.executable).parent / "deepspeed"), *launcher, "--module", *args]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _run(procs, run, data, *overrides) -> str:
    proc = subprocess.run(_cmd(procs, run, data, *overrides), capture_output=True, text=True, env=_env(), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _latest(run: Path) -> str:
    f = run / "checkpoints" / "latest"
    return f.read_text() if f.is_file() else ""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic shards written once for the module (by a one-step run)."""
    root = tmp_path_factory.mktemp("dist")
    _run(1, root / "warmup", root / "data", "train.steps=1")
    return root / "data"


def test_kill9_resume_gives_identical_losses(tmp_path, data):
    """ZeRO-2, 2 processes: kill -9 mid-run, restart with no flag, and the losses equal the uninterrupted run's."""
    overrides = ("train.steps=10", "train.save_every=2", "train.zero_stage=2")
    _run(2, tmp_path / "ref", data, *overrides)
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 11))

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(2, run, data, *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), start_new_session=True)
    deadline = time.monotonic() + 300
    while _latest(run) < "step_00000004" and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _latest(run)
    assert "step_00000004" <= killed_at < "step_00000010", f"the run was not interrupted mid-way ({killed_at})"

    out = _run(2, run, data, *overrides)
    resumed_from = int(killed_at.split("_")[1])
    assert f"(step {resumed_from}," in out
    after = {s: v for s, v in _losses(run).items() if s > resumed_from}  # the resumed run's lines come last
    assert sorted(after) == list(range(resumed_from + 1, 11))
    assert after == {s: reference[s] for s in after}, "losses after resuming differ from the uninterrupted run"


@pytest.mark.parametrize("procs, sig", [(1, signal.SIGTERM), (2, signal.SIGTERM), (1, signal.SIGINT)])
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, data, procs, sig):
    """One process reads its own flag, two all-reduce theirs; a terminal's Ctrl-C (SIGINT to the process group, the
    loader's worker included) checkpoints like a scheduler's SIGTERM (it ended in a traceback, unsaved)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(procs, run, data, "train.steps=200", "train.save_every=1000", "train.zero_stage=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, sig)  # as a cluster scheduler (or a terminal) does: every process of the job
    out, _ = proc.communicate(timeout=120)
    assert "preempted: step" in out and "Traceback" not in out, out[-3000:]
    stopped = int(out.split("preempted: step ")[1].split(",")[0])
    assert 2 <= stopped < 200
    assert _latest(run) == f"step_{stopped:08d}"
    state = json.loads((run / "checkpoints" / _latest(run) / "state.json").read_text())
    assert state["step"] == stopped and state["samples"] == 4 * stopped


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_world_size_change_2_to_1_to_2(tmp_path, data):
    run = tmp_path / "run"
    shm = _shm_buffers()
    _run(2, run, data, "train.steps=4", "train.save_every=2", "train.zero_stage=2")
    before = load_file(str(run / "checkpoints" / "step_00000004" / "ema.safetensors"))
    unconverted = subprocess.run(_cmd(1, run, data, "train.steps=6", "train.save_every=2", "train.zero_stage=2"),
                                 capture_output=True, text=True, env=_env(), timeout=600)
    assert unconverted.returncode == 2 and unconverted.stderr.strip().splitlines()[-1].endswith(
        f"was written by 2 processes and this run has 1: run `hpdm convert-checkpoint {run}` first"), unconverted.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "hpdm.cli", "convert-checkpoint", str(run)], capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _latest(run) == "step_00000004_universal"

    out = _run(1, run, data, "train.steps=6", "train.save_every=2", "train.zero_stage=2")
    assert "resumed from" in out and "step_00000004_universal (step 4, 16 samples)" in out
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["world_size"] == 1 and state["samples"] == 24
    after = load_file(str(run / "checkpoints" / "step_00000006" / "ema.safetensors"))
    assert before.keys() == after.keys() and not torch.equal(before["tokenize.weight"], after["tokenize.weight"])

    assert subprocess.run([sys.executable, "-m", "hpdm.cli", "convert-checkpoint", str(run)], env=_env(),
                          capture_output=True, timeout=300).returncode == 0
    out = _run(2, run, data, "train.steps=8", "train.save_every=2", "train.zero_stage=2")
    assert "step_00000006_universal (step 6, 24 samples)" in out
    assert json.loads((run / "checkpoints" / "step_00000008" / "state.json").read_text())["world_size"] == 2
    # Converting an older checkpoint leaves the newer latest alone (it became latest, and the next resume went back)
    older = subprocess.run([sys.executable, "-m", "hpdm.cli", "convert-checkpoint", str(run / "checkpoints" / "step_00000006")],
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert older.returncode == 0 and "the run's latest stays step_00000008" in older.stdout, older.stderr[-2000:]
    assert _latest(run) == "step_00000008"
    # DeepSpeed's shared-memory all-reduce op, if built, leaves 66 MB per rank in /dev/shm after every run
    assert _shm_buffers() == shm


def test_zero0_checkpoint_resumes_at_another_world_size_as_it_is(tmp_path, data):
    """ZeRO-0 keeps the whole optimizer state in one file, which DeepSpeed's ds_to_universal cannot convert (it wants
    per-rank *_optim_states.pt): such runs were sent to a conversion that ended in a traceback. They resume at any
    number of processes as they are, the optimizer state included, and convert-checkpoint says so."""
    run = tmp_path / "run"
    _run(1, run, data, "train.steps=2", "train.save_every=2", "train.zero_stage=0", "train.optimizer=adamw")
    out = _run(2, run, data, "train.steps=4", "train.save_every=2", "train.zero_stage=0", "train.optimizer=adamw")
    assert "step_00000002 (step 2, 8 samples)" in out, out[-3000:]
    step4 = run / "checkpoints" / "step_00000004"
    assert json.loads((step4 / "state.json").read_text())["world_size"] == 2
    saved = torch.load(step4 / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {4.0}  # AdamW's state went on
    convert = subprocess.run([sys.executable, "-m", "hpdm.cli", "convert-checkpoint", str(run)], capture_output=True,
                             text=True, env=_env(), timeout=300)
    assert convert.returncode == 2 and convert.stderr.strip().endswith(
        f"{step4} needs no conversion: it holds the whole optimizer state (ZeRO-0), which any number of processes "
        "resumes from"), convert.stderr[-2000:]


def test_two_node_launch_on_loopback(tmp_path, data):
    """Two per-node launches (node ranks 0 and 1, one process each) form one job over 127.0.0.1."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(_port())
    procs = []
    for node in ("0", "1"):
        launcher = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", node, "--master_addr", "127.0.0.1",
                    "--master_port", port]
        cmd = _cmd(2, tmp_path / "run", data, "train.steps=3", "train.zero_stage=3", launcher=launcher)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "dist_world_size=2" in outs[0] and "done: step 3" in outs[0]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["world_size"] == 2
    assert len(list((tmp_path / "run" / "checkpoints" / "step_00000003").glob("zero_pp_rank_*_model_states.pt"))) == 2


def test_zero3_ema_equals_single_process(tmp_path):
    script = Path(__file__).parent / "scripts" / "ema_run.py"
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")], capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    two = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(_port()), str(script),
                          str(tmp_path / "two.safetensors")], capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(a[k], load_file(str(tmp_path / "one.safetensors.init"))[k]))
    assert moved > len(a) // 2, "the EMA barely moved: the comparison would prove nothing"


def test_zero3_resumes_and_its_raw_weights_before_and_after_conversion(tmp_path, data):
    """A ZeRO-3 run resumes with the losses of an uninterrupted one (the token convolution's weights, read from a
    module that never ran, broke ZeRO-3's prefetch trace at the second step after a resume), and again after
    conversion at another world size; ZeRO-3 partitions DeepSpeed's own model state, and `hpdm export --raw`
    still gives the whole raw weights."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    zero3 = ("train.save_every=2", "train.optimizer=adamw", "train.zero_stage=3")
    _run(2, whole, data, "train.steps=4", *zero3)
    _run(2, run, data, "train.steps=2", *zero3)
    _run(2, run, data, "train.steps=4", *zero3)
    assert _losses(run) == _losses(whole) and len(_losses(run)) == 4
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    exported = {}
    for when in ("before", "after"):
        if when == "after":
            assert subprocess.run([sys.executable, "-m", "hpdm.cli", "convert-checkpoint", str(run)], env=_env(),
                                  capture_output=True, timeout=300).returncode == 0
            assert _latest(run) == "step_00000002_universal"
        out = tmp_path / f"{when}.safetensors"
        proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "export", str(run), str(out), "--raw"],
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        exported[when] = load_file(str(out))
    raw = {k[4:]: v for k, v in exported["before"].items() if k.startswith("raw.")}
    ema = {k: v for k, v in exported["before"].items() if not k.startswith("raw.")}
    assert raw.keys() == ema.keys() and all(raw[k].shape == ema[k].shape and raw[k].numel() > 0 for k in raw)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "the raw weights equal the EMA"
    assert all(torch.equal(v, exported["after"][k]) for k, v in exported["before"].items())
    assert "done: step 4" in _run(1, run, data, "train.steps=4", *zero3)  # the universal checkpoint, 2 -> 1 process


def _run_alone(script: str, **env) -> subprocess.CompletedProcess:
    """Run a Python script as a plain single process: no launcher variables, so init_distributed starts alone."""
    env = {**_env(), **env}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def test_cpu_start_builds_no_deepspeed_op(tmp_path):
    """DeepSpeed's CPU backend would compile its shared-memory all-reduce op with g++ on the first start in an
    environment (36 s on 2 cores); training never uses it, so init_distributed starts without it."""
    script = ("import deepspeed.comm.comm as c\nfrom hpdm.distributed import init_distributed\n"
              "print(init_distributed()[:2], c.cdb.shm_comm_op)")
    proc = _run_alone(script, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(0, 1) None"), proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing compiled


def test_gloo_group_is_destroyed_before_interpreter_shutdown():
    """Left to interpreter shutdown, a gloo worker thread aborted 2 of 30 two-process runs on exit (-6, "terminate
    called without an active exception"); init_distributed destroys the group at exit, before earlier-registered
    handlers run (atexit runs them last in, first out), and lets the workers finish (tests/test_lamb.py's runs)."""
    script = ("import atexit, torch.distributed as dist\nfrom hpdm.distributed import init_distributed\n"
              "atexit.register(lambda: print('at exit, initialized:', dist.is_initialized()))\n"
              "init_distributed()\nprint('initialized:', dist.is_initialized())")
    proc = _run_alone(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["initialized: True", "at exit, initialized: False"], proc.stdout


def test_a_finished_command_destroys_the_process_group_and_a_failed_one_keeps_it():
    """`hpdm` destroys the process groups after a command that returned (every rank got there; PyTorch asks for it
    at a normal exit, and NCCL warns without it), but not after a user error, where the ranks may be at different
    points."""
    script = ("import torch.distributed as dist\nfrom hpdm.cli import main\n"
              "from hpdm.distributed import init_distributed\ninit_distributed()\n"
              "info = ['info', '--config', 'configs/tiny.yaml']\n"
              "print('after an error:', main([*info, 'model.head_dim=7']), dist.is_initialized())\n"
              "print('after a finished command:', main(info), dist.is_initialized())")
    proc = _run_alone(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("after")]
    assert lines == ["after an error: 2 True", "after a finished command: 0 False"], proc.stdout


@pytest.mark.parametrize("given, missing", [
    ({}, "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are"),  # RANK left from another job
    ({"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29645"}, "LOCAL_RANK is"),  # a Kubeflow pod's
])
def test_rank_without_the_other_launcher_variables_is_named(tmp_path, given, missing):
    """RANK without the other variables of a launcher: DeepSpeed went looking for MPI (a traceback about mpi4py);
    now one line names what is missing, before anything is written."""
    env = {k: v for k, v in _env().items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny.yaml",
                           f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env={**env, "RANK": "0", **given}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"hpdm train: error: RANK is set but {missing} not: start with the deepspeed launcher or torchrun, or unset "
        "RANK and LOCAL_RANK left from another job"), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
