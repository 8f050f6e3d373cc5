"""Every user mistake ends in one line, `hpdm <command>: error: <what and where>`, and exit status 2; a traceback
only for bugs or with --debug (issue 14, items 8 and 9). Runs the real command, as a user would."""
import errno
import io
import logging
import os
import subprocess
import sys

import pytest
import safetensors
import torch
import yaml
from safetensors.torch import save_file

import hpdm.cli
from hpdm.config import Config
from hpdm.model import HPDM
from tests.helpers import tiny_model_config
from tests.test_sampling import export_model


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A tiny exported generator (5 classes, 3 levels; random weights), a config with a YAML syntax error on line 3,
    a file that is neither safetensors nor TorchScript, and a folder without videos."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    cfg = Config(model=tiny_model_config())
    torch.manual_seed(0)
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model:\n  levels: 2\n   patch: [4, 16, 16]\n")
    junk = tmp / "junk.pt"
    junk.write_text("not a model\n")
    (tmp / "empty").mkdir()
    (tmp / "used").mkdir()
    (tmp / "used" / "video_00000.mp4").write_bytes(b"")
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    twice = tmp / "twice.yaml"
    twice.write_text("train:\n  lr: 0.1\ntrain: {steps: 3}\n")
    config = yaml.safe_dump(cfg.to_dict())
    save_file({"w": torch.zeros(2)}, str(tmp / "misfit.safetensors"), metadata={"config": config})
    save_file({"w": torch.zeros(2)}, str(tmp / "foreign.safetensors"), metadata={"config": "{format: [pt"})
    return {"gen": export_model(HPDM(cfg.model), cfg, tmp / "gen.safetensors"), "tmp": str(tmp),
            "bad_yaml": str(bad_yaml), "junk": str(junk), "empty": str(tmp / "empty"), "twice": str(twice)}


def hpdm_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpdm.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})


SAMPLE = ("sample", "{gen}", "--out", "{tmp}/out")
FVD = ("eval-fvd", "--i3d", "{junk}", "--real", "{empty}")
CASES = {  # name: (arguments, what the error line must say after `hpdm <command>: error: `)
    "missing config": (("train", "--config", "{tmp}/none.yaml"), "{tmp}/none.yaml: no such config file"),
    "yaml syntax": (("train", "--config", "{bad_yaml}"), "{bad_yaml}:3: YAML syntax error: mapping values are not "
                                                           "allowed here (column 9)"),
    "save_every 0": (("train", "train.save_every=0"), "train.save_every: must be >= 1; got 0"),
    "bad override": (("train", "model.patch=[1,2"), "model.patch: override 'model.patch=[1,2' is not valid YAML"),
    "sigma_data 0": (("info", "diffusion.sigma_data=0"), "diffusion.sigma_data: must be > 0; got 0.0"),
    "checkpoint_uri gs": (("info", "train.checkpoint_uri=gs://b/c"),
                          "train.checkpoint_uri: must be an s3://bucket/prefix (or empty); got 'gs://b/c'"),
    "checkpoint_uri no bucket": (("info", "train.checkpoint_uri=s3://"),  # botocore's regexes, printed in full
                                 "train.checkpoint_uri: must be an s3://bucket/prefix (or empty); got 's3://'"),
    "patchify 0": (("info", "model.patchify=[0,4,4]"), "model.patchify: every entry must be >= 1; got [0, 4, 4]"),
    "no generator": (("sample", "{tmp}/nothing", "--out", "{tmp}/out"),
                     "{tmp}/nothing does not exist"),
    "not safetensors": (("sample", "{junk}", "--out", "{tmp}/out"), "{junk} is not a safetensors file"),
    "-n -3": ((*SAMPLE, "-n", "-3"), "-n: must be >= 1; got -3"),
    "--steps 0": ((*SAMPLE, "--steps", "0"), "--steps: every entry must be >= 1; got 0"),
    "--steps a,b": ((*SAMPLE, "--steps", "a,b"), "--steps: must be whole numbers separated by commas"),
    "--steps per level": ((*SAMPLE, "--steps", "4,2"), "--steps: give 1 value or 3 (one per level of the model)"),
    "--label 99": ((*SAMPLE, "--label", "99"), "--label: 99 is outside the model's classes 0..4"),
    "--overlap 2": ((*SAMPLE, "--overlap", "2"), "--overlap: must be half, full or a fraction in [0, 1); got '2'"),
    "--batch 0": ((*SAMPLE, "--batch", "0"), "--batch: must be >= 1; got 0"),
    "--tile-batch 0": ((*SAMPLE, "--tile-batch", "0"), "--tile-batch: must be >= 1; got 0"),
    "--guidance -1": ((*SAMPLE, "--guidance", "-1"), "--guidance: must be a finite number >= 0; got -1.0"),
    "--guidance nan": ((*SAMPLE, "--guidance", "nan"), "--guidance: must be a finite number >= 0; got nan"),
    "--fine-start inf": ((*SAMPLE, "--fine-start", "inf"), "--fine-start: must be a finite number >= 0 (0: finer "
                                                           "levels start from noise); got inf"),
    "--fps nan": ((*SAMPLE, "--fps", "nan"), "--fps: must be in [0.01, 1000]; got nan"),
    "--seed 2**60": ((*SAMPLE, "--seed", str(2**60)), f"--seed: must be in [0, 4294967296); got {2**60}"),
    "--out a file": (("sample", "{gen}", "--out", "{junk}"), "--out: {junk} is a file; give a folder for the videos"),
    "--out with videos": (("sample", "{gen}", "--out", "{tmp}/used"), "--out: {tmp}/used already holds videos "
                                                                       "(video_00000.mp4) of an unfinished `hpdm "
                                                                       "sample` (it has no cost.json), which new ones "
                                                                       "would join"),
    "--text-emb": ((*SAMPLE, "--text-emb", "{junk}"), "--text-emb: the model is conditioned on 'class', not on text"),
    "misfit weights": (("sample", "{tmp}/misfit.safetensors", "--out", "{tmp}/out"),
                       "{tmp}/misfit.safetensors: its weights do not fit the model of its own config"),
    "foreign file": (("sample", "{tmp}/foreign.safetensors", "--out", "{tmp}/out"),
                     "{tmp}/foreign.safetensors: its config metadata is not an hpdm config"),
    "export to a folder": (("export", "{tmp}/nothing", "{empty}"), "{empty} is a folder: give the file to write"),
    "train.seed 2**40": (("info", f"train.seed={2**40}"), f"train.seed: must be in [0, 4294967296); got {2**40}"),
    "--max-side -1": (("make-shards", "{empty}", "{tmp}/shards", "--max-side", "-1"),  # it shrank videos to 2x2
                      "argument --max-side: must be >= 0; got -1"),
    "--timeout 0": (("doctor", "--timeout", "0"), "argument --timeout: must be > 0; got 0"),  # false FAILs, aborts
    "--reps 0": (("bench-kernels", "--reps", "0"), "argument --reps: must be >= 1; got 0"),
    "run_dir a file": (("train", "train.run_dir={junk}"), "train.run_dir: {junk} is a file; give a folder for the run"),
    "run_dir is shards": (("train", "train.run_dir={tmp}/d", "data.shards={tmp}/d"),
                          "train.run_dir: {tmp}/d is data.shards or inside it; give the run a folder of its own"),
    "run_dir in shards": (("train", "train.run_dir={tmp}/d/run", "data.shards={tmp}/d"),  # wrote into the dataset
                          "train.run_dir: {tmp}/d/run is data.shards or inside it; give the run a folder of its own"),
    "mlp_ratio": (("info", "model.mlp_ratio=0.001"), "model.mlp_ratio: 0.001 x 64 leaves the MLP no hidden unit"),
    "eval --out folder": (("eval-synthetic", "{gen}", "--out", "{empty}"), "--out: {empty} is a folder; give the JSON "
                                                                           "file to write"),
    "--cache-dir file": ((*FVD, "--fake", "{empty}", "--cache-dir", "{junk}"), "--cache-dir: {junk} is a file"),
    "key twice": (("info", "--config", "{twice}"), "{twice}:3: YAML syntax error: found the key 'train' twice"),
    "--prompt": ((*SAMPLE, "--prompt", "a red square"), "--prompt/--prompt-file: the model is conditioned on 'class', "
                                                        "not on text"),
    "info --micro-batch 0": (("info", "--micro-batch", "0"), "--micro-batch: must be between 1 and 1,000,000; got 0"),
    # 10^14 allocated 2.4 PB for offsets, 10^19 overflowed: tracebacks
    "info --micro-batch 1e19": (("info", "--micro-batch", str(10**19)), "--micro-batch: must be between 1 and 1,000,000"),
    # the split a run would refuse was estimated without a word
    "info split": (("info", "--config", "configs/tiny_1level.yaml", "--processes", "2", "--micro-batch", "3"),
                   "train.batch_size: 16 is not a multiple of micro_batch (3) x processes (2)"),
    "info micro_batch": (("info", "--config", "configs/tiny_1level.yaml", "train.micro_batch=5"),
                         "train.batch_size: 16 is not a multiple of micro_batch (5) x processes (1)"),
    "eval-synthetic -n 0": (("eval-synthetic", "{gen}", "-n", "0"), "-n: must be >= 1; got 0"),
    "--steps ,,": (("eval-synthetic", "{gen}", "--steps", ",,"), "--steps: must be whole numbers"),  # was the default
    "eval --out dir/": (("eval-synthetic", "{gen}", "--out", "{tmp}/new/"), "--out: {tmp}/new/ names a folder"),  # a file 'new'
    "run/checkpoints": (("eval-synthetic", "{tmp}/run/checkpoints"), "{tmp}/run/checkpoints is neither a checkpoint "
                        "folder (with ema.safetensors) nor a run with checkpoints; give the run folder, {tmp}/run"),
    "export missing": (("export", "{tmp}/nothing", "{tmp}/g.safetensors"), "{tmp}/nothing does not exist"),
    "--i3d missing": (("eval-fvd", "--i3d", "{tmp}/i3d.pt", "--fake", "{empty}", "--real", "{empty}"),
                      "--i3d: detector file not found: {tmp}/i3d.pt"),
    "--i3d-sha256": ((*FVD, "--fake", "{empty}", "--i3d-sha256", "00ff"), "--i3d-sha256: {junk} has SHA-256 "),
    "no --fake": (FVD, "--fake/--generator: give exactly one"),
}


@pytest.mark.parametrize("name", CASES)
def test_user_mistake_is_one_line_and_exit_2(paths, name):
    args, says = CASES[name]
    proc = hpdm_cli(*(a.format(**paths) for a in args))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert last.startswith(f"hpdm {args[0]}: error: {says.format(**paths)}"), last
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where):
    args = ["--debug", "info", "model.blocks=0"] if where == "before" else ["info", "--debug", "model.blocks=0"]
    proc = hpdm_cli(*args)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "hpdm.errors.ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "hpdm info: error: model.blocks: must be >= 1; got 0"


def test_only_rank_0_prints_but_every_rank_exits_2():
    proc = hpdm_cli("info", "model.blocks=0", env={"RANK": "1"})
    assert proc.returncode == 2 and "error" not in proc.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(hpdm.cli, "cmd_info", bug)
    with pytest.raises(ZeroDivisionError):
        hpdm.cli.main(["info"])


def test_a_collective_broken_by_another_rank_is_one_line(monkeypatch, capsys):
    """When one process of a job stops with its error, the others' next collective fails; they printed gloo's
    traceback, which buried the one line that said why."""
    def collective(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:41877")

    monkeypatch.setattr(hpdm.cli, "cmd_info", collective)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert hpdm.cli.main(["info"]) == 2
    assert capsys.readouterr().err == ("hpdm info: error: rank 0: another process of the job stopped ([../third_party/gloo/"
                                       "gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:41877); "
                                       "its own error, printed by it, says why\n")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no peer to blame, the traceback stays
    with pytest.raises(RuntimeError):
        hpdm.cli.main(["info"])


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/shard-000003.tar"),
     "/data/shard-000003.tar: no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on device (Error while serializing: I/O error: No space left on device (os error 28))")])
def test_a_full_disk_is_one_line_and_its_log_errors_silent(monkeypatch, capsys, error, line):
    """A full disk printed a traceback from every command, and wandb's log files on it a traceback per log
    message (15,000 lines), burying the cause."""
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full(args):
        handler = logging.StreamHandler(FullDisk())
        logging.getLogger("wandb.test").addHandler(handler)
        try:
            logging.getLogger("wandb.test").warning("a message that cannot be written")
        finally:
            logging.getLogger("wandb.test").removeHandler(handler)
        raise error

    monkeypatch.setattr(hpdm.cli, "cmd_info", full)
    monkeypatch.setattr(logging, "raiseExceptions", True)  # Python's default, which main changes
    assert hpdm.cli.main(["info"]) == 2
    assert capsys.readouterr().err == f"hpdm info: error: {line}; free space, then run the same command again\n"


def test_a_full_disk_is_told_from_writers_that_do_not_say_so(tmp_path, monkeypatch):
    """torch.save's error on a full disk names neither ENOSPC nor the disk ('unexpected pos'): the free space where
    it wrote decides. write_atomic's errors name the file the user knows, not its temporary name."""
    import shutil
    from collections import namedtuple

    from data_pipeline import local_files

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3095296 vs 3095184")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    assert local_files.disk_full(torch_error, tmp_path / "run" / "checkpoints")  # the nearest existing folder
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 0, 1 << 30))
    assert not local_files.disk_full(torch_error, tmp_path) and not local_files.disk_full(torch_error)
    target = tmp_path / "state.json"
    (tmp_path / f"state.json.tmp{os.getpid()}").mkdir()  # the temporary name cannot be written
    with pytest.raises(IsADirectoryError) as exc:
        local_files.write_atomic(target, "{}")
    assert exc.value.filename == str(target)
