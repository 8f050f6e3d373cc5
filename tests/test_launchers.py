"""launchers/: dry runs of the scripts, the files they write, and the SLURM signal path with fake srun/scontrol."""
import os
import re
import shlex
import shutil
import signal
import socket
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
# stands for `deepspeed`: runner -> launch -> 2 trainers, as the real launcher. SIGTERM kills the runner at once
# (runner.py installs no handler for a local launch); launch terminates its trainers and waits for them (launch.py
# sigkill_handler); the trainers checkpoint (1 s) and exit on SIGUSR1 or SIGTERM, like hpdm's trainer.
FAKE_DEEPSPEED = f"""#!{sys.executable}
import os, signal, subprocess, sys, time
role, out = os.environ.get("FAKE_ROLE", "runner"), os.environ["FAKE_OUT"]
if role != "trainer":
    env = {{**os.environ, "FAKE_ROLE": "launch" if role == "runner" else "trainer"}}
    procs = [subprocess.Popen([sys.executable, __file__], env={{**env, "FAKE_RANK": str(i)}}) for i in range(1 if role == "runner" else 2)]
    if role == "runner":
        sys.exit(max(p.wait() for p in procs))
    stopping = []
    signal.signal(signal.SIGTERM, lambda s, f: stopping.append(s))
    while any(p.poll() is None for p in procs):
        if len(stopping) == 1:
            stopping.append("sent")
            for p in procs:
                p.terminate()
        time.sleep(0.05)
    sys.exit(1 if stopping else max(p.returncode for p in procs))
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda s, f: got.append(s))
open(os.path.join(out, "ready" + os.environ["FAKE_RANK"]), "w").close()
while not got:
    time.sleep(0.02)
time.sleep(1)  # a checkpoint takes a while: more signals arrive meanwhile, and the launcher may be gone
open(os.path.join(out, "stopped" + os.environ["FAKE_RANK"]), "w").write(str(got[0]))
"""
# stands for `deepspeed` at its default log level, info: runner.py logs "cmd = <the whole command line>"
FAKE_LOGGING_DEEPSPEED = """#!/usr/bin/env bash
args="$*" level=info
while [[ $# -gt 1 ]]; do [[ $1 != --log_level ]] || level=$2; shift; done
[[ $level != info && $level != debug ]] || echo "runner.py: cmd = $args"
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


def _hosts(hostfile: Path) -> list[str]:
    """The host lines of a hostfile (multinode.sh's first line is its marker comment)."""
    lines = hostfile.read_text().splitlines()
    assert lines[0].startswith("#"), lines
    return lines[1:]


def _config(folder: Path, name: str = "configs/tiny.yaml") -> str:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("{}\n")
    return name


def _recorder(folder: Path, name: str) -> Path:
    """A program that writes its arguments to FOLDER/NAME.argv and its environment to FOLDER/NAME.env."""
    path = folder / name
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {shlex.quote(str(path))}.argv\n'
                    f'env -0 > {shlex.quote(str(path))}.env\n')
    path.chmod(0o755)
    return path


def _recorded(path: Path) -> tuple[list[str], dict]:
    argv = path.with_name(path.name + ".argv").read_bytes().decode().split("\0")[:-1]
    env = path.with_name(path.name + ".env").read_bytes().decode().split("\0")[:-1]
    return argv, dict(item.split("=", 1) for item in env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    _config(tmp_path, "configs/x.yaml")
    proc = _run([str(LAUNCHERS / "multinode.sh"), "--hosts", "node1,node2 node3", "--gpus", "4", "--master-addr",
                 "10.0.0.1", "-p", "29555", "-c", "configs/x.yaml", "train.steps=5", "model.levels=2"], env, tmp_path)
    assert _hosts(tmp_path / "hostfile") == ["node1 slots=4", "node2 slots=4", "node3 slots=4"]
    env_file = tmp_path / ".deepspeed_env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert all("=" in line for line in lines), "the deepspeed launcher splits every line at '='"
    assert lines[0] == "HPDM_LAUNCHER=multinode.sh"  # the marker: the script rewrites only a file that has it
    assert dict(line.split("=", 1) for line in lines[1:]) == forwarded
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
    _config(tmp_path)
    proc = _run([str(LAUNCHERS / "multinode.sh"), "-f", str(hostfile)], _env(tmp_path, DRY_RUN="1"), tmp_path)
    cmd = _command(proc.stdout)
    assert _after(cmd, "--hostfile") == str(hostfile) and _after(cmd, "--master_addr") == "gpuA"
    assert _after(cmd, "--master_port") == "29500" and not (tmp_path / "hostfile").exists()
    assert (tmp_path / ".deepspeed_env").read_text() == "HPDM_LAUNCHER=multinode.sh\n"

    proc = _run([str(LAUNCHERS / "multinode.sh"), "-g", "2"], _env(tmp_path, DRY_RUN="1", HOSTS="h1 h2"), tmp_path)
    assert _hosts(tmp_path / "hostfile") == ["h1 slots=2", "h2 slots=2"] and _after(_command(proc.stdout), "--master_addr") == "h1"

    proc = _run([str(LAUNCHERS / "multinode.sh"), "-g", "2"], _env(tmp_path, DRY_RUN="1"), tmp_path, ok=False)
    assert proc.returncode == 2 and "no hosts" in proc.stderr
    bindir = _bin(tmp_path, **{"nvidia-smi": "#!/bin/sh\nexit 9\n"})
    proc = _run([str(LAUNCHERS / "multinode.sh"), "-H", "h1"], _env(tmp_path, bindir, DRY_RUN="1"), tmp_path, ok=False)
    assert "pass --gpus N" in proc.stderr


def test_single_node_dry_run(tmp_path):
    no_gpu = _bin(tmp_path, **{"nvidia-smi": "#!/bin/sh\nexit 9\n"})
    proc = _run([str(LAUNCHERS / "single_node.sh"), "train.steps=2"], _env(tmp_path, no_gpu, DRY_RUN="1"), ROOT)
    assert _command(proc.stdout) == ["deepspeed", "--num_gpus", "2", "--master_port", "29500", "--log_level", "warning",
                                     "--module", "hpdm.cli", "train", "--config", "configs/tiny.yaml", "train.steps=2"]
    assert "no NVIDIA GPU" in proc.stderr

    four = _bin(tmp_path, **{"nvidia-smi": "#!/bin/sh\nprintf 'GPU 0\\nGPU 1\\nGPU 2\\nGPU 3\\n'\n"})
    proc = _run([str(LAUNCHERS / "single_node.sh"), "-c", "configs/ucf101_hpdm_s.yaml", "-p", "29600"],
                _env(tmp_path, four, DRY_RUN="1"), ROOT)
    cmd = _command(proc.stdout)
    assert _after(cmd, "--num_gpus") == "4" and _after(cmd, "--master_port") == "29600" and cmd[-1] == "configs/ucf101_hpdm_s.yaml"
    assert "no NVIDIA GPU" not in proc.stderr


def _slurm_env(tmp_path, **extra) -> dict:
    bindir = _bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    return _env(tmp_path, bindir, **{"FAKE_LOG": str(tmp_path / "scontrol.log"), "SLURM_JOB_ID": "4242",
                                     "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_JOB_NUM_NODES": "3",
                                     "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "8", **extra})


def test_slurm_node_command(tmp_path):
    proc = _run(["bash", str(LAUNCHERS / "slurm_node.sh"), "-c", "configs/ucf101_hpdm_l.yaml", "train.steps=9"],
                _slurm_env(tmp_path, DRY_RUN="1"), ROOT)
    cmd = _command(proc.stdout)
    hostfile = tmp_path / "hpdm-hostfile-4242-1"
    assert cmd[:14] == ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--master_addr", "gpu01",
                        "--master_port", "24242", "--log_level", "warning", "--module", "hpdm.cli"]
    assert cmd[14:] == ["train", "--config", "configs/ucf101_hpdm_l.yaml", "train.steps=9"]
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


def _fake_processes(out: Path) -> list[int]:
    """The live processes of one fake job: those with its FAKE_OUT in their environment (a zombie shows none)."""
    mark, found = f"FAKE_OUT={out}".encode() + b"\0", []
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit() and mark in (proc_dir / "environ").read_bytes():
                found.append(int(proc_dir.name))
        except OSError:
            pass
    return found


@pytest.fixture
def fake_job(tmp_path):
    """start(script) runs launchers/SCRIPT with the fake srun/scontrol/deepspeed until both fake trainers are ready;
    whatever of the job is left at the end is killed."""
    out = tmp_path / "out"

    def start(script: str, **extra_env):
        out.mkdir()
        bindir = _bin(tmp_path, deepspeed=FAKE_DEEPSPEED)
        env = _slurm_env(tmp_path, FAKE_OUT=str(out), DEEPSPEED=str(bindir / "deepspeed"), **extra_env)
        with open(tmp_path / "job.log", "w") as log:  # not a pipe: the trainers would hold it open
            proc = subprocess.Popen(["bash", str(LAUNCHERS / script)], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = tmp_path / "job.log"
        deadline = time.monotonic() + 30
        while len(list(out.glob("ready*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(list(out.glob("ready*"))) < 2:
            pytest.fail(f"the fake trainers did not start: {_finish(proc, 1)}")
        return proc, out

    yield start
    for pid in _fake_processes(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc, timeout: float = 30) -> str:
    """The job's output once its script exits; after ``timeout`` s its whole process group is killed."""
    try:
        proc.wait(timeout=timeout)
        return proc.log.read_text()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.log.read_text() + "\n(killed: it did not exit)"


def _signal_step(pid: int, sig: int) -> None:
    """Signal ``pid`` and all its descendants at once, as SLURM signals every process of a job step."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass


def test_sbatch_usr1_reaches_the_trainers_and_requeues(tmp_path, fake_job):
    """SLURM's B:USR1 reaches only the batch shell: it must travel srun -> node script -> the trainers, not kill
    the launcher, and the job must be requeued after the trainers exit."""
    proc, out = fake_job("slurm.sbatch")
    os.kill(proc.pid, signal.SIGUSR1)
    text = _finish(proc)
    assert proc.returncode == 0, text
    assert sorted(p.read_text() for p in out.glob("stopped*")) == [str(int(signal.SIGUSR1))] * 2
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text() and "requeueing job 4242" in text


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_node_script_waits_for_the_trainers_when_the_whole_step_is_signalled(fake_job, sig):
    """SLURM may signal every process of the step (scancel, preemption, time limit). SIGUSR1: the launcher ignores
    it and the trainers stop. SIGTERM kills DeepSpeed's runner at once, which orphans the trainers while they save
    their checkpoint: the node script must still ask them to stop and exit only after they have, because SLURM
    kills what is left of the step when the task's main process exits."""
    proc, out = fake_job("slurm_node.sh")
    _signal_step(proc.pid, sig)
    text = _finish(proc)
    assert sorted(p.name for p in out.glob("stopped*")) == ["stopped0", "stopped1"], text
    assert _fake_processes(out) == [], f"training processes outlived the node script:\n{text}"
    assert "to checkpoint and stop" in text
    if sig == signal.SIGUSR1:
        assert proc.returncode == 0, text


def test_node_script_waits_for_the_trainers_only_stop_wait_seconds(fake_job):
    proc, out = fake_job("slurm_node.sh", STOP_WAIT="0")
    _signal_step(proc.pid, signal.SIGTERM)
    text = _finish(proc)
    assert proc.returncode == 1 and "still running after 0 s: killing them" in text, text
    time.sleep(0.2)
    assert _fake_processes(out) == [] and not list(out.glob("stopped*")), text


MULTINODE, SINGLE_NODE, SLURM_NODE = (str(LAUNCHERS / n) for n in ("multinode.sh", "single_node.sh", "slurm_node.sh"))


def test_multinode_pdsh_command_gives_the_remote_side_every_argument_and_value_unchanged(tmp_path):
    """DeepSpeed's pdsh launcher joins the arguments and the exports into one command line for the remote shell,
    quoting only some of them, and pdsh replaces %n, %h, %u and %% in it. Build that command with DeepSpeed's own
    code from what multinode.sh passes, run it through bash as the remote side would, and compare what arrives."""
    ds_runner = pytest.importorskip("deepspeed.launcher.runner")
    from deepspeed.launcher.multinode_runner import PDSHRunner

    overrides = ['train.deepspeed={"zero_optimization":{"overlap_comm":true,"reduce_bucket_size":500000}}',
                 "train.wandb_project=bob's-runs", 'data.caption=say "hi" to $USER, `id`; *.mp4 \\ 100%n %% {a,b}',
                 "data.glob=*.mp4", "x=$1", "y=a  b\tc", 'z=\\"', "e=", "t=~/x", "p=50%", "q=%h"]
    forwarded = {"NCCL_SOCKET_IFNAME": "ib0,eth0", "WANDB_NOTES": "bob's run, 50% done", "HPDM_TAG": "a b",
                 "AWS_SECRET_ACCESS_KEY": "ab/c+d=e"}
    unsafe = {"WANDB_RUN_GROUP": "$1", "HPDM_CMD": "`touch pwned`", "NCCL_ALGO": 'a"b', "AWS_PROFILE": "c\\d",
              "TORCH_X": "run-%n"}
    config = _config(tmp_path, "configs/my run.yaml")
    deepspeed, python = _recorder(tmp_path, "deepspeed"), _recorder(tmp_path, "python")
    bindir = _bin(tmp_path, pdsh="#!/bin/sh\nexit 9\n")
    env = _env(tmp_path, bindir, DEEPSPEED=str(deepspeed), HPDM_PAD=" padded ", **forwarded, **unsafe)
    proc = _run([MULTINODE, "-H", "h1 h2", "-g", "1", "-c", config, *overrides], env, tmp_path)
    for name, value in unsafe.items():
        assert f"not forwarding {name}" in proc.stderr and value not in proc.stdout + proc.stderr
    assert "HPDM_PAD" in proc.stderr and "padded" not in proc.stderr  # warned: DeepSpeed strips the spaces

    argv, runner_env = _recorded(deepspeed)
    args = ds_runner.parse_args(argv)
    assert args.launcher == "pdsh" and args.force_multi and args.log_level == "warning"
    resources = ds_runner.fetch_hostfile(str(tmp_path / args.hostfile))  # the marker comment line is skipped
    assert list(resources) == ["h1", "h2"]
    runner = PDSHRunner(args, "d29ybGQ=")
    # runner.py main(): the variables DeepSpeed exports by itself (EXPORT_ENVS, and NCCL from the CUDA accelerator),
    # then every .deepspeed_env line split at its first '='
    for key, value in runner_env.items():
        if any(key.startswith(prefix) for prefix in ds_runner.EXPORT_ENVS + ["NCCL"]):
            runner.add_export(key, value)
    for line in (tmp_path / ".deepspeed_env").read_text().splitlines(keepends=True):
        runner.add_export(*line.split("=", maxsplit=1))
    cmd, _, _ = runner.get_cmd({}, resources)
    remote = " ".join(cmd[cmd.index("-w") + 2:])  # pdsh runs the rest of its arguments, joined, through ssh
    # pdsh's ssh module replaces %h, %u, %n and %% (pdsh src/common/pipecmd.c, pipecmd_format_arg)
    remote = re.sub("%(.)", lambda m: {"h": "h1", "u": "me", "n": "0", "%": "%"}.get(m[1], m[0]), remote, flags=re.S)
    remote = remote.replace(sys.executable, str(python), 1)
    subprocess.run(["bash", "-c", remote], env=_env(tmp_path), cwd=tmp_path, check=True, timeout=30)

    remote_argv, remote_env = _recorded(python)
    assert "--node_rank=0" in remote_argv
    assert remote_argv[remote_argv.index("hpdm.cli") + 1:] == ["train", "--config", config, *overrides]
    assert {key: remote_env.get(key) for key in forwarded} == forwarded and remote_env["HPDM_PAD"] == "padded"
    assert not set(unsafe) & set(remote_env) and not (tmp_path / "pwned").exists()


def test_multinode_hosts_may_be_separated_by_newlines(tmp_path):
    _config(tmp_path)
    _run([MULTINODE, "-g", "2"], _env(tmp_path, DRY_RUN="1", HOSTS="h1\nh2, h3\n\n"), tmp_path)
    assert _hosts(tmp_path / "hostfile") == ["h1 slots=2", "h2 slots=2", "h3 slots=2"]
    _run([MULTINODE, "-g", "1", "-H", "h4\nh5"], _env(tmp_path, DRY_RUN="1"), tmp_path)
    assert _hosts(tmp_path / "hostfile") == ["h4 slots=1", "h5 slots=1"]


def test_multinode_never_overwrites_files_it_did_not_write(tmp_path):
    _config(tmp_path)
    env, argv = _env(tmp_path, DRY_RUN="1", NCCL_DEBUG="INFO"), [MULTINODE, "-H", "h1 h2", "-g", "1"]
    _run(argv, env, tmp_path)
    _run(argv, env, tmp_path)  # its own files are rewritten
    mine = "MY_TOKEN=abc\n"
    (tmp_path / ".deepspeed_env").write_text(mine)
    proc = _run(argv, env, tmp_path, ok=False)
    assert proc.returncode == 2 and ".deepspeed_env" in proc.stderr and "move it" in proc.stderr
    assert (tmp_path / ".deepspeed_env").read_text() == mine
    (tmp_path / ".deepspeed_env").unlink()
    (tmp_path / "hostfile").write_text("h7 slots=8\n")
    proc = _run(argv, env, tmp_path, ok=False)
    assert proc.returncode == 2 and "hostfile" in proc.stderr and "--hostfile hostfile" in proc.stderr
    assert (tmp_path / "hostfile").read_text() == "h7 slots=8\n"
    _run([MULTINODE, "--hostfile", "hostfile"], env, tmp_path)


@pytest.mark.parametrize("text, error", [
    ("# only\n\n   \n# comments\n", "lists no host"),
    ("h1 slots=2\n\nh1 slots=2\n", "line 3: h1 is listed twice"),
    ("h1 slots=0\n", "line 1: h1 has slots=0"),
    ("# hosts\nh1\n", "line 2: expected 'HOST slots=N'"),
    ("h1 slots=four\n", "line 1: expected 'HOST slots=N'"),
])
def test_multinode_hostfile_mistakes_are_one_line_errors(tmp_path, text, error):
    _config(tmp_path)
    (tmp_path / "hosts").write_text(text)
    proc = _run([MULTINODE, "-f", "hosts"], _env(tmp_path, DRY_RUN="1"), tmp_path, ok=False)
    assert proc.returncode == 2 and error in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_multinode_refuses_duplicate_hosts_gpus_with_a_hostfile_and_a_read_only_folder(tmp_path):
    _config(tmp_path)
    proc = _run([MULTINODE, "-g", "1", "-H", "h1 h2,h1"], _env(tmp_path, DRY_RUN="1"), tmp_path, ok=False)
    assert proc.returncode == 2 and "more than once: h1" in proc.stderr
    (tmp_path / "hosts").write_text("h1 slots=8\n")
    proc = _run([MULTINODE, "-f", "hosts", "-g", "4"], _env(tmp_path, DRY_RUN="1"), tmp_path, ok=False)
    assert proc.returncode == 2 and "--gpus" in proc.stderr and "slots" in proc.stderr

    readonly = tmp_path / "readonly"
    _config(readonly)
    readonly.chmod(0o555)
    as_other = []
    if os.geteuid() == 0:  # root may write anywhere: run the script as nobody
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        as_other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        tmp_path.chmod(0o755)
    proc = _run([*as_other, "bash", MULTINODE, "-H", "h1", "-g", "1"], _env(tmp_path, DRY_RUN="1"), readonly, ok=False)
    assert proc.returncode == 2 and f"cannot write hostfile and .deepspeed_env in {readonly}" in proc.stderr


def test_deepspeed_args_are_split_like_a_shell_without_running_anything(tmp_path):
    _config(tmp_path)
    args = """--launcher openmpi --launcher_args "-x FOO=1 --bind-to none" --x '$(touch pwned)'"""
    env = _env(tmp_path, DRY_RUN="1", DEEPSPEED_ARGS=args)
    proc = _run([MULTINODE, "-H", "h1 h2", "-g", "1", "a=it's"], env, tmp_path)
    cmd = _command(proc.stdout)
    assert _after(cmd, "--launcher_args") == "-x FOO=1 --bind-to none" and _after(cmd, "--x") == "$(touch pwned)"
    assert "--force_multi" not in cmd and cmd[-1] == "a=it's"  # no pdsh, no quoting for a remote shell
    assert not (tmp_path / "pwned").exists()
    env["DEEPSPEED_ARGS"] = "--launcher_args 'oops"
    proc = _run([MULTINODE, "-H", "h1", "-g", "1"], env, tmp_path, ok=False)
    assert proc.returncode == 2 and "DEEPSPEED_ARGS" in proc.stderr


def test_single_node_and_slurm_node_keep_the_command_line_out_of_the_log(tmp_path):
    """At its default log level DeepSpeed logs the command line: a credential in an override would be in the job log."""
    secret = f"data.endpoint_url=http://KEY:{SECRET}@s3.local"
    bindir = _bin(tmp_path, deepspeed=FAKE_LOGGING_DEEPSPEED)
    env = _env(tmp_path, bindir, DEEPSPEED=str(bindir / "deepspeed"))
    proc = _run([SINGLE_NODE, "-g", "1", "-p", str(_free_port()), secret], env, ROOT)
    assert SECRET not in proc.stdout + proc.stderr
    proc = _run(["bash", SLURM_NODE, secret], _slurm_env(tmp_path, DEEPSPEED=str(bindir / "deepspeed")), ROOT)
    assert SECRET not in proc.stdout + proc.stderr


def test_ports_are_checked(tmp_path):
    dry = _env(tmp_path, DRY_RUN="1")
    _config(tmp_path)
    for port in ("0", "99999", "80a"):
        for argv, cwd in (([SINGLE_NODE, "-g", "1", "-p", port], ROOT),
                          ([MULTINODE, "-H", "h1", "-g", "1", "-p", port], tmp_path)):
            proc = _run(argv, dry, cwd, ok=False)
            assert proc.returncode == 2 and "1-65535" in proc.stderr, proc.stderr
        proc = _run(["bash", SLURM_NODE], _slurm_env(tmp_path, DRY_RUN="1", MASTER_PORT=port), ROOT, ok=False)
        assert proc.returncode == 2 and "MASTER_PORT" in proc.stderr and "1-65535" in proc.stderr

    deepspeed = _recorder(tmp_path, "deepspeed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        proc = _run([SINGLE_NODE, "-g", "1", "-p", port], _env(tmp_path, DEEPSPEED=str(deepspeed)), ROOT, ok=False)
    assert proc.returncode == 2 and f"port {port} is in use" in proc.stderr and "--master-port" in proc.stderr
    assert not deepspeed.with_name("deepspeed.argv").exists()
    _run([SINGLE_NODE, "-g", "1", "-p", str(_free_port())], _env(tmp_path, DEEPSPEED=str(deepspeed)), ROOT)
    assert _recorded(deepspeed)[0][:2] == ["--num_gpus", "1"]


def test_missing_values_missing_config_and_node_ids_are_one_line_errors(tmp_path):
    dry = _env(tmp_path, DRY_RUN="1")
    for argv in ([SINGLE_NODE, "-c"], [SINGLE_NODE, "-g", "1", "--master-port"], [MULTINODE, "-H", "h1", "--hostfile"],
                 [MULTINODE, "-g"], [MULTINODE, "-a"], [MULTINODE, "-p"], [MULTINODE, "-c"], [MULTINODE, "-H"]):
        proc = _run(argv, dry, tmp_path, ok=False)
        assert proc.returncode == 2 and f"{argv[-1]} needs a value" in proc.stderr and "unbound" not in proc.stderr
    proc = _run(["bash", SLURM_NODE, "--config"], _slurm_env(tmp_path, DRY_RUN="1"), ROOT, ok=False)
    assert proc.returncode == 2 and "--config needs a value" in proc.stderr

    for argv, env in (([SINGLE_NODE, "-g", "1", "-c", "nope.yaml"], dry),
                      ([MULTINODE, "-H", "h1", "-g", "1", "-c", "nope.yaml"], dry),
                      (["bash", SLURM_NODE, "-c", "nope.yaml"], _slurm_env(tmp_path, DRY_RUN="1"))):
        proc = _run(argv, env, ROOT, ok=False)
        assert proc.returncode == 2 and "config file nope.yaml not found" in proc.stderr, proc.stderr

    proc = _run(["bash", SLURM_NODE], _slurm_env(tmp_path, DRY_RUN="1", SLURM_NODEID="3"), ROOT, ok=False)
    assert proc.returncode == 2 and "SLURM_NODEID=3" in proc.stderr and "ids 0 to 2" in proc.stderr


def test_sbatch_script_outside_slurm(tmp_path):
    proc = _run(["bash", str(LAUNCHERS / "slurm.sbatch"), "--help"], _env(tmp_path), tmp_path)
    assert "Usage: sbatch" in proc.stdout and "SBATCH" not in proc.stdout
    proc = _run(["bash", str(LAUNCHERS / "slurm.sbatch"), "train.steps=1"], _env(tmp_path), tmp_path, ok=False)
    assert proc.returncode == 2 and "submit it with sbatch" in proc.stderr and "unbound" not in proc.stderr


def test_multinode_refuses_a_folder_that_deepspeeds_pdsh_command_would_break(tmp_path):
    """DeepSpeed's pdsh runner puts the working folder into the remote command unquoted (`cd FOLDER; ...`)."""
    spaced = tmp_path / "my runs"
    _config(spaced)
    proc = _run([MULTINODE, "-g", "1", "-H", "h1 h2"], _env(tmp_path, DRY_RUN="1"), spaced, ok=False)
    assert proc.returncode == 2 and f"('{spaced}')" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (spaced / "hostfile").exists() and not (spaced / ".deepspeed_env").exists()
    # another launcher passes the folder its own way
    _run([MULTINODE, "-g", "1", "-H", "h1 h2"], _env(tmp_path, DRY_RUN="1", DEEPSPEED_ARGS="--launcher openmpi"), spaced)
