"""Long commands interrupted and run again (found by a probe that sent Ctrl-C, SIGTERM and kill -9 at random
moments): what they leave is never taken for finished work, an interrupt is one line, and no worker outlives
the command."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import DataConfig, make_shards, prepare_dataset, shards_write
from data_pipeline.local_files import write_atomic
from data_pipeline.storage import Storage
from data_pipeline.stream import DataError
from hpdm.config import load_config
from hpdm.doctor_storage import check_data
from hpdm.errors import UsageError
from hpdm.generate import check_out

ROOT = Path(__file__).resolve().parents[1]


def _many_videos(tiny_manifest, src, copies):
    """``copies`` x the 12 tiny clips in class folders: a few seconds of --reencode all work."""
    for i, clip in enumerate(sorted(tiny_manifest.parent.glob("*.mp4")) * copies):
        (src / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, src / f"c{i % 3}" / f"v{i:04d}.mp4")


def test_shards_of_an_unfinished_make_shards_are_not_trained_on(tiny_manifest, tmp_path):
    """A first make-shards run killed before its index: training took the .tar files written so far as the
    dataset (7 of 22 shards), and doctor only warned that sample counts were unknown."""
    data = tmp_path / "data"
    make_shards(str(tiny_manifest), str(data), shard_size_mb=1e-6, progress=False)
    (data / "index.json").unlink()  # what a kill before the end leaves: shards and sidecars, no index
    said = f"{data}: `hpdm make-shards` into it did not finish .*run the same make-shards command again"
    with pytest.raises(DataError, match=said):
        prepare_dataset(DataConfig(shards=str(data)), resolution=(8, 16, 16), num_classes=4)
    cfg = load_config("configs/tiny.yaml", [f"data.shards={data}", "model.num_classes=4", "data.synthetic=false"])
    [(name, status, text)] = check_data(cfg)
    assert (name, status) == ("data", "FAIL") and "did not finish" in text


def test_an_interrupted_rerun_takes_the_old_index_away(tiny_manifest, tmp_path, monkeypatch):
    """A rerun after the sources changed, interrupted, left the old index.json over a mix of new and old shards
    (19 videos twice, an entry that no longer matched its tar); doctor said ok and training ran."""
    src = tmp_path / "src"
    _many_videos(tiny_manifest, src, 1)
    data = tmp_path / "data"
    make_shards(str(src), str(data), shard_size_mb=1e-6, progress=False)
    (src / "c0" / "v0000.mp4").unlink()  # every shard after the first now holds other videos
    real, written = shards_write.write_shard, []

    def interrupted(*args):
        if written:
            raise KeyboardInterrupt
        written.append(real(*args))
        return written[-1]

    monkeypatch.setattr(shards_write, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_shards(str(src), str(data), shard_size_mb=1e-6, progress=False)
    assert written and not (data / "index.json").exists()
    with pytest.raises(DataError, match="did not finish"):
        prepare_dataset(DataConfig(shards=str(data)), resolution=(8, 16, 16), num_classes=3)
    monkeypatch.setattr(shards_write, "write_shard", real)
    index = make_shards(str(src), str(data), shard_size_mb=1e-6, progress=False)
    keys = [k for s in index["shards"] for k in json.loads((data / s["name"].replace(".tar", ".meta.json")).read_text())["keys"]]
    assert index["num_samples"] == 11 == len(keys) == len(set(keys))


def _start_make_shards(tiny_manifest, tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    _many_videos(tiny_manifest, src, 100)  # 1,200 videos re-encoded, one per shard: about 15 s, far longer than
    # the test waits (with 120 a fast machine finished before the signal)
    proc = subprocess.Popen([sys.executable, "-m", "hpdm.cli", "make-shards", str(src), str(dest), "--workers", "2",
                             "--reencode", "all", "--shard-size-mb", "0.000001"], cwd=ROOT, start_new_session=True,
                            # as from a terminal: a shell's background job (CI under nohup ... &) ignores Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(dest.glob("shard-*.tar")):  # working: both workers started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc, dest


def _group_gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_ctrl_c_stops_make_shards_at_once_in_one_line(tiny_manifest, tmp_path):
    """A Ctrl-C printed a traceback per process and, with workers, went on until every shard was written."""
    proc, dest = _start_make_shards(tiny_manifest, tmp_path)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "hpdm make-shards: interrupted", err
    assert "Traceback" not in err and _group_gone(proc.pid, 30)
    assert len(list(dest.glob("shard-*.tar"))) < 1200 and not (dest / "index.json").exists()


@pytest.mark.slow
def test_make_shards_workers_end_with_their_parent(tiny_manifest, tmp_path):
    """SIGTERM or kill -9 to the command alone (a scheduler, the OOM killer) left its workers writing on, then
    waiting forever."""
    proc, dest = _start_make_shards(tiny_manifest, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _group_gone(proc.pid, 30)  # the workers are in its process group


WORKERS_OF_A_TRAINER = """
import os, sys, time
from data_pipeline.pool import worker_pool
from hpdm.distributed import Preemption

preemption = Preemption()  # as the trainer installs it before writing the synthetic set
with worker_pool(2) as pool:
    futures = [pool.submit(time.sleep, 60) for _ in range(2)]
    time.sleep(1)
    print(" ".join(str(p) for p in pool._processes), flush=True)
    time.sleep(60)
"""


def test_pool_workers_end_with_a_killed_trainer():
    """The workers inherited the trainer's preemption handler, so the SIGTERM sent at their parent's death only
    set a flag: a trainer killed while writing the synthetic set left them alive, ignoring SIGTERM, for good."""
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_OF_A_TRAINER], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        assert _group_gone(proc.pid, 10), "the pool's workers outlived their killed parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def test_preemption_names_the_first_signal():
    """DeepSpeed's launcher follows a Ctrl-C with SIGTERM to its children: the run said "signal 15"."""
    from hpdm.distributed import Preemption

    preemption = Preemption()
    try:
        preemption._handle(signal.SIGINT, None)
        preemption._handle(signal.SIGTERM, None)
        assert preemption.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still stops at once
            preemption._handle(signal.SIGINT, None)
    finally:
        preemption.close()


def test_temporaries_of_killed_writers_are_removed_and_no_others(tmp_path):
    """A kill at the moment write_atomic renames (or during a conversion) left NAME.tmpPID for good."""
    from data_pipeline.local_files import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f"latest.tmp{dead}", f"metrics.jsonl.tmp{os.getpid()}", "notes.tmp", "step_00000004"):
        (tmp_path / name).write_text("x")
    (tmp_path / f".step_00000004_universal.tmp{dead}").mkdir()
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"metrics.jsonl.tmp{os.getpid()}", "notes.tmp", "step_00000004"]


def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    """state.json (the mark of a complete checkpoint), eval results, sampled videos and the run's config were
    written in place: a kill mid-write left them truncated (a run that would not restart, a result lost)."""
    path = tmp_path / "result.json"
    write_atomic(path, '{"old": 1}')

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    monkeypatch.undo()
    Storage().write_bytes(str(path), b'{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2}


def test_sample_names_an_unfinished_run_in_its_out_folder(tmp_path):
    out = tmp_path / "videos"
    out.mkdir()
    (out / "video_00000.mp4").write_bytes(b"")
    with pytest.raises(UsageError, match=r"of an unfinished `hpdm sample` \(it has no cost.json\).*or remove that one"):
        check_out(out)
    (out / "cost.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds the output of a sample") as finished:
        check_out(out)
    assert "unfinished" not in str(finished.value)
