"""What a user of a shared machine meets without permission (found by a probe run as an unprivileged user): a
source folder or video it cannot read, shards it cannot read, a run folder or output it cannot write, files it
shares with its group. Each is a clear error before the work, or is redone once readable; never a dataset
silently smaller, a checkpoint taken for damaged or work lost at the first save. ``user.acting()`` runs a block as
an ordinary user (nobody's uid where the tests run as root)."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline import DataConfig, make_shards, prepare_dataset
from data_pipeline.shardlist import check_readable
from data_pipeline.sources import SourceError
from data_pipeline.storage import Storage, StorageError
from hpdm import cli
from hpdm.checkpoint import Checkpointer
from hpdm.checkpoint_folder import save_safetensors
from hpdm.config import load_config
from hpdm.doctor_storage import check_data, check_run_dir
from hpdm.errors import CheckpointError, ConfigError, UsageError
from hpdm.export import check_output
from hpdm.run_lock import check_run_dir_writable


def _videos(tiny_manifest, src, classes=("A", "B"), per_class=2):
    clips = sorted(tiny_manifest.parent.glob("*.mp4"))
    for c, name in enumerate(classes):
        (src / name).mkdir(parents=True)
        for i in range(per_class):
            shutil.copy(clips[c * per_class + i], src / name / f"clip{i}.mp4")


@pytest.mark.parametrize("mode", [0o000, 0o311])  # nothing, or enter but not list
def test_a_class_folder_that_cannot_be_listed_is_refused_not_dropped(tiny_manifest, user, mode):
    """The folder was left out without a word: one class fewer, and the classes after it renumbered."""
    src, dest = user.dir / "src", user.dir / "shards"
    _videos(tiny_manifest, src)
    (src / "A").chmod(mode)
    with user.acting(), pytest.raises(SourceError, match=f"1 folder.* cannot be listed \\({src / 'A'}: Permission denied"):
        make_shards(str(src), str(dest), progress=False)
    assert not dest.exists()


def test_a_video_unreadable_when_shards_were_made_is_read_by_a_rerun(tiny_manifest, user):
    """A rerun after fixing the file's mode kept it out for good ('1 of 1 shards already written')."""
    src, dest = user.dir / "src", user.dir / "shards"
    _videos(tiny_manifest, src)
    dest.mkdir()
    dest.chmod(0o777)
    (src / "B" / "clip1.mp4").chmod(0o000)
    with user.acting():
        first = make_shards(str(src), str(dest), progress=False)
    assert first["num_samples"] == 3 and "Permission denied" in first["skipped"][0]["reason"]
    (src / "B" / "clip1.mp4").chmod(0o644)
    with user.acting():
        second = make_shards(str(src), str(dest), progress=False)
    assert second["num_samples"] == 4 and second["skipped"] == []
    assert json.loads((dest / "index.json").read_text())["num_samples"] == 4


def test_a_broken_video_is_not_tried_again(tiny_manifest, tmp_path, caplog):
    """Only files that could not be read are retried: a corrupt video would be decoded again by every rerun."""
    src, dest = tmp_path / "src", tmp_path / "shards"
    _videos(tiny_manifest, src, per_class=1)
    (src / "B" / "clip0.mp4").write_bytes(b"not a video")
    assert make_shards(str(src), str(dest), progress=False)["num_samples"] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        make_shards(str(src), str(dest), progress=False)
    assert "already written" in caplog.text and "writing it again" not in caplog.text


def test_shards_that_cannot_be_read_are_found_at_the_start(tiny_shards, user):
    """Training stopped when it reached the shard (hours in, and again at every resume); doctor said 'data ok'."""
    data = user.dir / "data"
    shutil.copytree(tiny_shards["many"], data)
    (data / "shard-000007.tar").chmod(0o000)
    cfg = load_config("configs/tiny.yaml", [f"data.shards={data}", "model.num_classes=4"])
    with user.acting():
        with pytest.raises(StorageError, match=r"1 of the 12 shards cannot be read by this user \(.*shard-000007.tar\)"):
            prepare_dataset(DataConfig(shards=str(data)), resolution=(8, 16, 16), num_classes=4)
        [(name, status, said)] = check_data(cfg)
    assert (name, status) == ("data", "FAIL") and "shard-000007.tar" in said


def test_a_local_permission_error_says_owner_and_mode_not_bucket_policy():
    exc = PermissionError(13, "Permission denied", "/data/shard-000001.tar")
    said = str(Storage().explain(exc, "/data/shard-000001.tar", "opening"))
    assert "check the owner and mode of /data/shard-000001.tar" in said and "bucket" not in said


@pytest.mark.parametrize("part", ["checkpoints", "samples", "metrics.jsonl", "config.yaml"])
def test_a_run_folder_part_that_cannot_be_written_is_found_at_the_start(user, part):
    """A resume trained until its first sample or save and ended in a traceback there, losing those steps."""
    run = user.dir / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples").mkdir()
    for name in ("metrics.jsonl", "config.yaml"):
        (run / name).write_text("")
        (run / name).chmod(0o666)
    run.chmod(0o777)
    for p in (run / "checkpoints", run / "samples"):
        p.chmod(0o777)
    (run / part).chmod(0o555 if (run / part).is_dir() else 0o444)
    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={run}"])
    with user.acting():
        with pytest.raises(ConfigError, match=f"^train.run_dir: cannot write {run / part} \\(Permission denied\\)"):
            check_run_dir_writable(run)
        [(name, status, said)] = check_run_dir(cfg)
    assert (name, status) == ("run_dir", "FAIL") and str(run / part) in said


def test_a_checkpoint_that_cannot_be_written_says_so_and_keeps_the_last(user):
    """DeepSpeed said 'Parent directory .../step_N does not exist' in a traceback."""
    root = user.dir / "run" / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "latest").write_text("step_00000002")
    root.chmod(0o555)
    with user.acting(), pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*step_00000004 \(Permission "
                                                             r"denied\).*step_00000002, the last checkpoint, is as it was"):
        Checkpointer(root.parent)._clear(root / "step_00000004")


def test_old_checkpoints_that_cannot_be_deleted_are_warned_about(user, caplog):
    """They stayed without a word, one more on every save."""
    root = user.dir / "run" / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "state.json").write_text("{}")
    (root / "latest").write_text("step_00000004")
    for p in (root.parent, root, *root.iterdir()):
        p.chmod(0o777)
    (root / "step_00000001").chmod(0o555)  # its state.json cannot be removed
    with user.acting():
        Checkpointer(root.parent, keep=2)._prune()
    assert not (root / "step_00000002").exists() and (root / "step_00000001").exists()
    assert f"could not delete the old checkpoint {root / 'step_00000001'}" in caplog.text


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_safetensors_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """safetensors wrote every file 0600: a colleague in a group-shared run folder could not resume, sample or
    export it ('cannot be read (No such file or directory)')."""
    old = __import__("os").umask(umask)
    try:
        save_safetensors({"x": torch.ones(2)}, tmp_path / "w.safetensors", metadata={"k": "v"})
    finally:
        __import__("os").umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert torch.equal(load_file(tmp_path / "w.safetensors")["x"], torch.ones(2))


def test_an_output_folder_that_cannot_be_written_is_refused_before_sampling(user):
    """`hpdm sample --out EXISTING` sampled every video, then ended in a traceback when writing the first."""
    out = user.dir / "videos"
    out.mkdir()
    out.chmod(0o555)
    with user.acting(), pytest.raises(UsageError, match=f"--out: cannot write {out}: {out} is not writable by this user"):
        check_output("--out", out, "videos")


def test_any_other_permission_error_is_one_line_naming_the_path(tiny_manifest, user, capsys):
    """Everything not checked beforehand ended in a traceback (exit 1), e.g. a manifest that cannot be read."""
    manifest = user.dir / "manifest.jsonl"
    shutil.copy(tiny_manifest, manifest)
    manifest.chmod(0o000)
    with user.acting():
        status = cli.main(["make-shards", str(manifest), str(user.dir / "shards")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"hpdm make-shards: error: {manifest}: permission denied") and "owner and mode" in err
