"""No data is ever overwritten: the synthetic set is written only where nothing exists, make-shards only over its
own work; labels beyond model.num_classes and bad storage settings stop training start with a clear error."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import DataConfig, DataError, StorageError, make_shards, prepare_dataset, shards_write
from data_pipeline.seaweed import free_ports
from data_pipeline.storage import Storage

SYN = dict(synthetic=True, flip=False, synthetic_videos=4, num_workers=0)


def snapshot(root):
    """{relative path: sha256} of every file below ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def s3_snapshot(storage, prefix):
    return {u: storage.read_bytes(u) for u in storage.contents(prefix)}


@pytest.fixture
def user_shards(tiny_shards, tmp_path):
    """A folder of the user's 12 .tar shards without index.json or sidecars (a documented layout)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for tar in sorted(Path(tiny_shards["many"]).glob("*.tar")):
        shutil.copy(tar, folder / tar.name)
    return folder


def test_synthetic_never_writes_over_the_users_shards(user_shards):
    before = snapshot(user_shards)
    with pytest.raises(DataError, match=rf"data.shards {user_shards} holds 12 files, e.g. shard-000000.tar, but no "
                                        r"index.json; .*point data.shards at an empty folder or prefix .*set "
                                        r"data.synthetic=false to train on them"):
        prepare_dataset(DataConfig(shards=str(user_shards), **SYN), (4, 16, 16), num_classes=4)
    assert snapshot(user_shards) == before
    index = prepare_dataset(DataConfig(shards=str(user_shards), num_workers=0), (4, 16, 16), num_classes=4)
    assert [s["name"] for s in index["shards"]] == sorted(before)  # synthetic=false: trained on as they are
    pattern = f"{user_shards}/shard-{{000000..000011}}.tar"
    with pytest.raises(DataError, match=re.escape(f"data.shards {pattern}: data.synthetic=true writes a dataset to a "
                                                  "folder or prefix, not to .tar files")):
        prepare_dataset(DataConfig(shards=pattern, **SYN), (4, 16, 16), num_classes=4)
    (user_shards / "notes.txt").write_text("mine")
    (user_shards.parent / "file").write_text("mine too")
    for spec, found in ((user_shards, "13 files"), (user_shards.parent / "file", "1 file: file")):
        with pytest.raises(DataError, match=f"holds {found}"):
            prepare_dataset(DataConfig(shards=str(spec), **SYN), (4, 16, 16), num_classes=4)
    assert snapshot(user_shards) == before | {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_synthetic_finishes_its_own_interrupted_write_only(tmp_path):
    cfg = DataConfig(shards=str(tmp_path / "syn"), **SYN)
    (tmp_path / "syn" / ".hpdm-tmp-killed").mkdir(parents=True)  # all a write killed at its start leaves
    index = prepare_dataset(cfg, (4, 16, 16), num_classes=2)
    (tmp_path / "syn" / "index.json").unlink()  # as if killed before the index was written
    side = tmp_path / "syn" / "shard-000001.meta.json"
    side.write_text(json.dumps(json.loads(side.read_text()) | {"state": "writing"}))
    assert prepare_dataset(cfg, (4, 16, 16), num_classes=2) == index
    (tmp_path / "syn" / "index.json").unlink()
    before = snapshot(tmp_path / "syn")
    with pytest.raises(DataError, match="holds .* files, e.g. shard-000000.meta.json, but no index.json"):
        prepare_dataset(cfg, (4, 16, 16), num_classes=3)  # another synthetic set: not this one's to finish
    assert snapshot(tmp_path / "syn") == before


def test_scratch_folders_of_killed_writes_are_removed_and_no_others(tmp_path):
    """make-shards or embed-text killed mid-write left its scratch folder (up to a shard per worker) for good."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    names = {f".hpdm-tmp-{host}-{gone.stdout.strip()}-ab_1": False,  # its process is gone: removed
             f".hpdm-tmp-{host}-{os.getpid()}-cd2": True,  # a live process's (another write going on)
             f".hpdm-tmp-otherhost-{gone.stdout.strip()}-ef3": True,  # another node's process: cannot be checked
             ".hpdm-tmp-x1y2z3": True}  # named before processes were: cannot be checked
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard.tar").write_bytes(b"part")
    new = Path(Storage().local_tmpdir(str(tmp_path)))
    assert new.name.startswith(f".hpdm-tmp-{host}-{os.getpid()}-") and new.parent == tmp_path
    assert {n: (tmp_path / n).is_dir() for n in names} == names


@pytest.mark.parametrize("plant", ["other_file", "tar_without_sidecar", "foreign_index", "bad_sidecar"])
def test_make_shards_writes_only_over_its_own_work(tiny_manifest, tiny_shards, tmp_path, plant):
    dest = tmp_path / "ds"
    shutil.copytree(tiny_shards["one"], dest)
    named = {"other_file": "notes.txt", "tar_without_sidecar": "shard-000007.tar", "foreign_index": "index.json",
             "bad_sidecar": "shard-000000.meta.json"}[plant]
    (dest / named).write_text("the user's")
    before = snapshot(dest)
    with pytest.raises(DataError, match=rf"{dest}/{named}: .*write to an empty folder or prefix"):
        make_shards(str(tiny_manifest), str(dest), shard_size_mb=1e-6, progress=False)
    assert snapshot(dest) == before


def test_s3_prefixes_of_the_user_are_refused_and_own_work_resumed(s3_server, monkeypatch, tiny_manifest, tiny_shards):
    s3_server.env(monkeypatch)
    storage = Storage()
    base = f"s3://{s3_server.bucket}/safety"
    for name in ("shard-000000.tar", "shard-000001.tar"):
        storage.upload(f"{tiny_shards['many']}/{name}", f"{base}/user/{name}")
    storage.write_bytes(f"{base}/user/readme.txt", b"mine")
    before = s3_snapshot(storage, f"{base}/user")
    with pytest.raises(DataError, match=rf"{base}/user holds 3 files, e.g. readme.txt, but no index.json"):
        prepare_dataset(DataConfig(shards=f"{base}/user", **SYN), (4, 16, 16), num_classes=2)
    with pytest.raises(DataError, match=rf"{base}/user/readme.txt: make-shards did not write this"):
        make_shards(str(tiny_manifest), f"{base}/user", progress=False)
    assert s3_snapshot(storage, f"{base}/user") == before
    storage.write_bytes(f"{base}/syn2/x", b"a sibling prefix")  # s3://b/safety/syn2 is not under s3://b/safety/syn
    storage.write_bytes(f"{base}/syn.txt", b"nor is s3://b/safety/syn.txt")
    index = prepare_dataset(DataConfig(shards=f"{base}/syn", **SYN), (4, 16, 16), num_classes=2)
    assert index["num_samples"] == 4 and storage.read_bytes(f"{base}/syn2/x") == b"a sibling prefix"
    assert storage.read_bytes(f"{base}/syn.txt") == b"nor is s3://b/safety/syn.txt"
    make_shards(str(tiny_manifest), f"{base}/mk", shard_size_mb=0.02, progress=False)
    writes = []
    monkeypatch.setattr(shards_write, "write_shard", lambda *a, **k: writes.append(a[2]))
    assert make_shards(str(tiny_manifest), f"{base}/mk", shard_size_mb=0.02, progress=False)["num_samples"] == 12
    assert writes == []  # a rerun over its own finished work writes no shard again


def test_labels_beyond_num_classes_are_refused_when_the_index_is_read(tiny_shards, tmp_path):
    cfg = DataConfig(shards=tiny_shards["one"], num_workers=0)
    assert prepare_dataset(cfg, (4, 16, 16), num_classes=4)["max_label"] == 3
    with pytest.raises(DataError, match=rf"data.shards {tiny_shards['one']}: labels go up to 3 but "
                                        r"model.num_classes is 3; set model.num_classes to at least 4"):
        prepare_dataset(cfg, (4, 16, 16), num_classes=3)
    old = tmp_path / "old"
    shutil.copytree(tiny_shards["one"], old)
    index = json.loads((old / "index.json").read_text())
    del index["max_label"]  # written by an older make-shards: nothing to check against
    (old / "index.json").write_text(json.dumps(index))
    assert prepare_dataset(DataConfig(shards=str(old), num_workers=0), (4, 16, 16), num_classes=3)["num_samples"] == 12
    (old / "index.json").write_text(json.dumps(index | {"class_names": list("abcde")}))
    with pytest.raises(DataError, match="the index names 5 classes but model.num_classes is 3"):
        prepare_dataset(DataConfig(shards=str(old), num_workers=0), (4, 16, 16), num_classes=3)
    (old / "index.json").write_text(json.dumps(index | {"max_label": 3, "class_names": list("abcdefgh")}))
    with pytest.raises(DataError, match="labels go up to 3 and the index names 8 classes but model.num_classes is 3; "
                                        "set model.num_classes to at least 8"):  # it said 4, and then 8
        prepare_dataset(DataConfig(shards=str(old), num_workers=0), (4, 16, 16), num_classes=3)
    images = DataConfig(shards=tiny_shards["one"], image_shards=str(old), num_workers=0)  # checked at the start too
    with pytest.raises(DataError, match=rf"^data.image_shards {old}: the index names 8 classes but model.num_classes is 4"):
        prepare_dataset(images, (4, 16, 16), num_classes=4)
    (old / "index.json").write_text(json.dumps(index | {"max_label": -1, "class_names": []}))  # unlabelled videos
    assert prepare_dataset(DataConfig(shards=str(old), num_workers=0), (4, 16, 16), num_classes=3)["max_label"] == -1
    with pytest.raises(DataError, match="no video has a label, but model.cond is class, which would train every clip "
                                        "unconditionally; label the videos .* or set model.cond=none"):
        prepare_dataset(DataConfig(shards=str(old), num_workers=0), (4, 16, 16), num_classes=3, labelled=True)
    (old / "index.json").write_text('{"shards": [')
    with pytest.raises(DataError, match=rf"{old}/index.json: not a valid index"):
        prepare_dataset(DataConfig(shards=str(old), num_workers=0), (4, 16, 16), num_classes=3)


@pytest.mark.parametrize("shards, error", [
    ([{"name": "shard-000000.tar", "samples": "12"}], r"shard entry 0 is .*\"12\".*not \{\"name\": FILE"),
    (["shard-000000.tar"], r"shard entry 0 is \"shard-000000.tar\", not"),
    ([{"samples": 12}], r"shard entry 0 is"),
    ([], r"the index lists no shards"),
])
def test_an_index_that_does_not_say_what_it_must_is_refused(tiny_shards, tmp_path, shards, error):
    """Entries of the wrong type once surfaced as a TypeError in a loader worker, in the middle of training."""
    shutil.copytree(tiny_shards["one"], tmp_path / "d")
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    (tmp_path / "d" / "index.json").write_text(json.dumps(index | {"shards": shards}))
    with pytest.raises(DataError, match=rf"{tmp_path}/d/index.json: {error}"):
        prepare_dataset(DataConfig(shards=str(tmp_path / "d"), num_workers=0), (4, 16, 16), num_classes=4)


def test_data_shards_naming_the_index_file_says_to_name_its_folder(tiny_shards):
    with pytest.raises(DataError, match=r"index.json: data.shards names the index file; give the folder"):
        prepare_dataset(DataConfig(shards=f"{tiny_shards['one']}/index.json", num_workers=0), (4, 16, 16), 4)


def test_storage_errors_at_training_start_name_the_url(s3_server, monkeypatch):
    s3_server.env(monkeypatch)
    prefix = f"s3://{s3_server.bucket}/nothing-here"
    cases = [
        (DataConfig(shards="s3://no-such-bucket/ds"), "bucket 'no-such-bucket' does not exist at http://127.0.0.1"),
        (DataConfig(shards="s3://no-such-bucket/shard-{0..3}.tar"), "s3://no-such-bucket/shard-0.tar: bucket 'no-such"),
        (DataConfig(shards=prefix), rf"{prefix}: no index.json and no .tar shards \(nothing is there\); write some"),
        (DataConfig(shards=f"{prefix}/shard-{{000000..000003}}.tar"), re.escape(
            f"data.shards {prefix}/shard-{{000000..000003}}.tar: its first shard {prefix}/shard-000000.tar does not exist")),
    ]
    for cfg, message in cases:
        with pytest.raises(StorageError, match=message):
            prepare_dataset(cfg, (4, 16, 16), num_classes=2)
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    t = time.perf_counter()
    with pytest.raises(StorageError, match=rf"{prefix}/index.json: cannot reach the storage endpoint {dead} .*check the "
                                           r"endpoint URL"):
        prepare_dataset(DataConfig(shards=prefix, endpoint_url=dead), (4, 16, 16), num_classes=2)  # default retries
    assert time.perf_counter() - t < 10
    s3_server.env(monkeypatch, creds=None)
    with pytest.raises(StorageError, match=rf"{prefix}/index.json: no AWS credentials found"):
        prepare_dataset(DataConfig(shards=prefix), (4, 16, 16), num_classes=2)
