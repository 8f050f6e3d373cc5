"""launchers/: dry runs of the scripts, the files they write, and the SLURM signal path with fake srun/scontrol."""
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ROOT / "launchers"
SCRIPTS = ["multinode.sh", "single_node.sh", "slurm.sbatch", "slurm_node.sh"]
SECRET = "hpdm-launcher-secret-value"

FAKE_SRUN = '#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n'
FAKE_SCONTROL = ('#!/usr/bin/env bash\necho "$*" >> "$FAKE_LOG"\n'
                 '[[ \"$1 $2\" != \"show hostnames\" ]] || printf "gpu01\\ngpu02\\ngpu03\\n"\n')
# stands for `deepspeed`: runner -> launch -> 2 trainers, as the real launcher; trainers stop on SIGUSR1
FAKE_DEEPSPEED = f"""#!{sys.executable}
import os, signal, subprocess, sys, time
role, out = os.environ.get("FAKE_ROLE", "runner"), os.environ["FAKE_OUT"]
if role != "trainer":
    env = {{**os.environ, "FAKE_ROLE": "launch" if role == "runner" else "trainer"}}
    procs = [subprocess.Popen([sys.executable, __file__], env={{**env, "FAKE_RANK": str(i)}}) for i in range(1 if role == "runner" else 2)]
    sys.exit(max(p.wait() for p in procs))
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
open(os.path.join(out, "ready" + os.environ["FAKE_RANK"]), "w").close()
while not got:
    time.sleep(0.02)
open(os.path.join(out, "stopped" + os.environ["FAKE_RANK"]), "w").write(str(got[0]))
time.sleep(0.5)  # a checkpoint takes a while: a second (forwarded) SIGUSR1 arrives before the exit
"""


def _bin(tmp_path: Path, **scripts: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def _env(tmp_path: Path, bindir: Path | None = None, **extra) -> dict:
    """A clean environment (nothing inherited to forward by accident) plus ``extra``."""
    path = f"{bindir}:/usr/bin:/bin" if bindir else "/usr/bin:/bin"
    return {"PATH": path, "HOME": str(tmp_path), "TMPDIR": str(tmp_path), **extra}


def _run(cmd, env, cwd, ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def _command(stdout: str) -> list[str]:
    return shlex.split(stdout.strip().splitlines()[-1])


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_scripts_parse_and_are_strict():
    for name in SCRIPTS:
        text = (LAUNCHERS / name).read_text()
        assert "set -euo pipefail" in text and "Usage:" in text, name
        assert subprocess.run(["bash", "-n", str(LAUNCHERS / name)], capture_output=True).returncode == 0, name
        assert os.access(LAUNCHERS / name, os.X_OK), f"{name} is not executable"
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "error", *[str(LAUNCHERS / n) for n in SCRIPTS]], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_multinode_dry_run_writes_hostfile_and_private_env(tmp_path):
    forwarded = {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ib0,eth0", "AWS_ACCESS_KEY_ID": "AKIDHPDM",
                 "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": "http://s3.local:9000", "WANDB_API_KEY": "wb-key",
                 "HPDM_ATTENTION": "sdpa", "PYTHONPATH": "/opt/x", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    env = _env(tmp_path, DRY_RUN="1", UNRELATED="nope", SLURM_JOB_ID="1", WANDB_NOTES="two\nlines", **forwarded)
    proc = _run([str(LAUNCHERS / "multinode.sh"), "--hosts", "node1,node2 node3", "--gpus", "4", "--master-addr",
                 "10.0.0.1", "-p", "29555", "-c", "configs/x.yaml", "train.steps=5", "model.levels=2"], env, tmp_path)
    assert (tmp_path / "hostfile").read_text() == "node1 slots=4\nnode2 slots=4\nnode3 slots=4\n"
    env_file = tmp_path / ".deepspeed_env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert all("=" in line for line in lines), "the deepspeed launcher splits every line at '='"
    assert dict(line.split("=", 1) for line in lines) == forwarded
    assert "WANDB_NOTES" in proc.stderr  # named as not forwarded (multi-line)
    cmd = _command(proc.stdout)
    assert cmd[0] == "deepspeed" and _after(cmd, "--hostfile") == "hostfile" and _after(cmd, "--master_addr") == "10.0.0.1"
    assert _after(cmd, "--master_port") == "29555" and _after(cmd, "--log_level") == "warning"
    assert cmd[cmd.index("--module"):] == ["--module", "hpdm.cli", "train", "--config", "configs/x.yaml", "train.steps=5",
                                           "model.levels=2"]
    assert SECRET not in proc.stdout + proc.stderr and "AWS_SECRET_ACCESS_KEY" in proc.stdout


def test_multinode_hostfile_env_hosts_and_errors(tmp_path):
    hostfile = tmp_path / "my_hosts"
    hostfile.write_text("gpuA slots=8\ngpuB slots=8\n")
    proc = _run([str(LAUNCHERS / "multinode.sh"), "-f", str(hostfile)], _env(tmp_path, DRY_RUN="1"), tmp_path)
    cmd = _command(proc.stdout)
    assert _after(cmd, "--hostfile") == str(hostfile) and _after(cmd, "--master_addr") == "gpuA"
    assert _after(cmd, "--master_port") == "29500" and not (tmp_path / "hostfile").exists()
    assert (tmp_path / ".deepspeed_env").read_text() == ""

    proc = _run([str(LAUNCHERS / "multinode.sh"), "-g", "2"], _env(tmp_path, DRY_RUN="1", HOSTS="h1 h2"), tmp_path)
    assert (tmp_path / "hostfile").read_text() == "h1 slots=2\nh2 slots=2\n" and _after(_command(proc.stdout), "--master_addr") == "h1"

    proc = _run([str(LAUNCHERS / "multinode.sh"), "-g", "2"], _env(tmp_path, DRY_RUN="1"), tmp_path, ok=False)
    assert proc.returncode == 2 and "no hosts" in proc.stderr
    bindir = _bin(tmp_path, **{"nvidia-smi": "#!/bin/sh\nexit 9\n"})
    proc = _run([str(LAUNCHERS / "multinode.sh"), "-H", "h1"], _env(tmp_path, bindir, DRY_RUN="1"), tmp_path, ok=False)
    assert "pass --gpus N" in proc.stderr


def test_single_node_dry_run(tmp_path):
    no_gpu = _bin(tmp_path, **{"nvidia-smi": "#!/bin/sh\nexit 9\n"})
    proc = _run([str(LAUNCHERS / "single_node.sh"), "train.steps=2"], _env(tmp_path, no_gpu, DRY_RUN="1"), ROOT)
    assert _command(proc.stdout) == ["deepspeed", "--num_gpus", "2", "--master_port", "29500", "--module", "hpdm.cli",
                                     "train", "--config", "configs/tiny.yaml", "train.steps=2"]
    assert "no NVIDIA GPU" in proc.stderr

    four = _bin(tmp_path, **{"nvidia-smi": "#!/bin/sh\nprintf 'GPU 0\\nGPU 1\\nGPU 2\\nGPU 3\\n'\n"})
    proc = _run([str(LAUNCHERS / "single_node.sh"), "-c", "configs/ucf101_hpdm_s.yaml", "-p", "29600"],
                _env(tmp_path, four, DRY_RUN="1"), ROOT)
    cmd = _command(proc.stdout)
    assert _after(cmd, "--num_gpus") == "4" and _after(cmd, "--master_port") == "29600" and cmd[-1] == "configs/ucf101_hpdm_s.yaml"
    assert "no NVIDIA GPU" not in proc.stderr


def _slurm_env(tmp_path, **extra) -> dict:
    bindir = _bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    return _env(tmp_path, bindir, FAKE_LOG=str(tmp_path / "scontrol.log"), SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT),
                SLURM_JOB_NODELIST="gpu[01-03]", SLURM_JOB_NUM_NODES="3", SLURM_NODEID="1", SLURM_GPUS_ON_NODE="8", **extra)


def test_slurm_node_command(tmp_path):
    proc = _run(["bash", str(LAUNCHERS / "slurm_node.sh"), "-c", "configs/ucf101_hpdm_l.yaml", "train.steps=9"],
                _slurm_env(tmp_path, DRY_RUN="1"), ROOT)
    cmd = _command(proc.stdout)
    hostfile = tmp_path / "hpdm-hostfile-4242-1"
    assert cmd[:12] == ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--master_addr", "gpu01",
                        "--master_port", "24242", "--module", "hpdm.cli"]
    assert cmd[12:] == ["train", "--config", "configs/ucf101_hpdm_l.yaml", "train.steps=9"]
    assert hostfile.read_text() == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\n"

    env = _slurm_env(tmp_path, DRY_RUN="1")
    del env["SLURM_NODEID"]
    proc = _run(["bash", str(LAUNCHERS / "slurm_node.sh")], env, ROOT, ok=False)
    assert "SLURM_NODEID is not set" in proc.stderr


def test_sbatch_header_and_dry_run(tmp_path):
    header = [line for line in (LAUNCHERS / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--requeue", "--ntasks-per-node=1", "--signal=B:USR1@", "--open-mode=append"):
        assert any(option in line for line in header), option
    proc = _run(["bash", str(LAUNCHERS / "slurm.sbatch"), "train.steps=3"], _slurm_env(tmp_path, DRY_RUN="1"), tmp_path)
    cmd = _command(proc.stdout)
    assert _after(cmd, "--no_ssh") == "--node_rank" and _after(cmd, "--master_addr") == "gpu01" and cmd[-1] == "train.steps=3"
    assert "master gpu01:24242" in proc.stdout
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()


def _start_fake_job(tmp_path, script: str):
    out = tmp_path / "out"
    out.mkdir()
    bindir = _bin(tmp_path, deepspeed=FAKE_DEEPSPEED)
    env = _slurm_env(tmp_path, FAKE_OUT=str(out), DEEPSPEED=str(bindir / "deepspeed"))
    proc = subprocess.Popen(["bash", str(LAUNCHERS / script)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while len(list(out.glob("ready*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(list(out.glob("ready*"))) < 2:
        pytest.fail(f"the fake trainers did not start: {_finish(proc, 1)}")
    return proc, out


def _finish(proc, timeout: float = 30) -> str:
    """The job's output once it exits; after ``timeout`` s its whole process group is killed."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0] + "\n(killed: it did not exit)"


def test_sbatch_usr1_reaches_the_trainers_and_requeues(tmp_path):
    """SLURM's B:USR1 reaches only the batch shell: it must travel srun -> node script -> the trainers, not kill
    the launcher, and the job must be requeued after the trainers exit."""
    proc, out = _start_fake_job(tmp_path, "slurm.sbatch")
    os.kill(proc.pid, signal.SIGUSR1)
    text = _finish(proc)
    assert proc.returncode == 0, text
    assert sorted(p.read_text() for p in out.glob("stopped*")) == [str(int(signal.SIGUSR1))] * 2
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text() and "requeueing job 4242" in text


def test_node_script_survives_usr1_sent_to_every_process(tmp_path):
    """A signal sent to every process of the step (as SLURM may) stops the trainers; the launcher ignores it."""
    proc, out = _start_fake_job(tmp_path, "slurm_node.sh")
    os.killpg(proc.pid, signal.SIGUSR1)
    text = _finish(proc)
    assert proc.returncode == 0, text
    assert len(list(out.glob("stopped*"))) == 2
