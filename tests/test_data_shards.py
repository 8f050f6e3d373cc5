"""make-shards: sources (UCF-style folders, JSONL/CSV manifests), the index, resume, re-encoding, the CLI,
and the synthetic dataset written through the same path."""
import argparse
import errno
import io
import json
import os
import tarfile
from fractions import Fraction

import av
import numpy as np
import pytest

from data_pipeline import DataConfig, DataError, build_loader, make_shards, prepare_dataset
from data_pipeline import cli, shards_write
from data_pipeline.sources import SourceError, load_sources
from data_pipeline.synthetic import render


def _write_avi(path, frames=12, h=24, w=32, container="avi"):
    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream("mpeg4", rate=Fraction(25))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in render(1, frames, h, w, seed=5):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


@pytest.fixture(scope="module")
def ucf_folder(tmp_path_factory, tiny_manifest):
    root = tmp_path_factory.mktemp("ucf")
    for cls, names in (("Biking", ["v_Biking_g01_c01", "v_Biking_g01_c02"]), ("Archery", ["v_Archery_g01_c01"])):
        (root / cls).mkdir()
        for n in names:
            _write_avi(root / cls / f"{n}.avi")
    return root


def _members(tar):
    with tarfile.open(tar) as tf:
        return tf.getnames()


def test_ucf_folder_gives_classes_and_keeps_original_avi_bytes(ucf_folder, tmp_path):
    index = make_shards(str(ucf_folder), str(tmp_path / "ds"), progress=False)
    assert index["class_names"] == ["Archery", "Biking"] and index["num_samples"] == 3
    names = _members(tmp_path / "ds" / index["shards"][0]["name"])
    assert "Biking/v_Biking_g01_c01.avi" in names and "Biking/v_Biking_g01_c01.json" in names
    with tarfile.open(tmp_path / "ds" / "shard-000000.tar") as tf:
        meta = json.load(tf.extractfile("Archery/v_Archery_g01_c01.json"))
        stored = tf.extractfile("Archery/v_Archery_g01_c01.avi").read()
    assert stored == (ucf_folder / "Archery" / "v_Archery_g01_c01.avi").read_bytes()
    assert (meta["label"], meta["class"], meta["frames"], meta["width"], meta["height"]) == (0, "Archery", 12, 32, 24)
    assert meta["fps"] == 25.0 and meta["duration"] == pytest.approx(12 / 25)
    batch = next(iter(build_loader(DataConfig(shards=str(tmp_path / "ds"), num_workers=0), frames=8, size=(16, 16),
                                   batch_size=3, train=False)))
    assert sorted(batch["label"].tolist()) == [0, 1, 1] and batch["video"].shape == (3, 8, 16, 16, 3)


def test_reencode_non_mp4_and_cap_the_long_side(ucf_folder, tmp_path):
    index = make_shards(str(ucf_folder), str(tmp_path / "ds"), reencode="non-mp4", max_side=16, progress=False)
    with tarfile.open(tmp_path / "ds" / index["shards"][0]["name"]) as tf:
        meta = json.load(tf.extractfile("Biking/v_Biking_g01_c02.json"))
        assert "Biking/v_Biking_g01_c02.mp4" in tf.getnames()
    assert (meta["width"], meta["height"], meta["frames"], meta["codec"]) == (16, 12, 12, "h264")


def test_reencoded_mp4_keeps_its_frame_rate_and_trains(tiny_manifest, tmp_path):
    """Re-encoding an mp4 (here its long side capped) keeps frame i at i / fps: decoded frames' own timestamps,
    in the source container's time base, once put every frame at 0 and stored this 24 fps clip as 576 fps, which
    the loader then skipped as too short."""
    make_shards(str(tiny_manifest), str(tmp_path / "ds"), reencode="all", max_side=24, progress=False)
    with tarfile.open(tmp_path / "ds" / "shard-000000.tar") as tf:
        name = next(n for n in tf.getnames() if n.endswith(".mp4"))
        data, meta = tf.extractfile(name).read(), json.load(tf.extractfile(name[:-4] + ".json"))
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        seconds = [float(f.pts * stream.time_base) for f in c.decode(stream)]
    assert (meta["fps"], meta["frames"], meta["width"], meta["height"]) == (24.0, 24, 24, 16), meta
    assert seconds == pytest.approx([i / 24 for i in range(24)])
    loader = build_loader(DataConfig(shards=str(tmp_path / "ds"), num_workers=0), frames=16, size=(16, 16),
                          batch_size=12, train=False)
    assert [b["video"].shape for b in loader] == [(12, 16, 16, 16, 3)] and loader.stats["skipped"] == 0


def test_manifests_csv_and_jsonl(tmp_path, tiny_manifest):
    rows = [json.loads(line) for line in open(tiny_manifest)]
    csv_path = tmp_path / "m.csv"
    with open(csv_path, "w") as f:
        f.write("path,label,caption\n")
        for r in rows[:3]:
            f.write(f"{tiny_manifest.parent / r['path']},{['cat', 'dog'][r['label'] % 2]},\"{r['caption']}, ok\"\n")
    items, classes = load_sources(str(csv_path))
    assert classes == ["cat", "dog"] and [i.label for i in items] == [0, 1, 0]
    assert items[0].caption.endswith(", ok")
    items, classes = load_sources(str(tiny_manifest))
    assert len(items) == 12 and classes == [] and items[5].label == 1 and items[5].key == "clip000005"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4"}\n{"caption": "no path"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2: missing 'path'"):
        load_sources(str(bad))


@pytest.mark.parametrize("name, text, error", [
    ("m.jsonl", '{"path": "a.mp4"}\n["b.mp4", 1]\n', r"m.jsonl:2: not a JSON object \(got list\)"),
    ("m.jsonl", '{"path": "a.mp4"}\n\n{"path": "b.mp4",}\n', r"m.jsonl:3: not valid JSON \(Expecting property name"),
    ("m.jsonl", '{"path": "a.mp4", "label": 1}\n{"path": "b.mp4", "label": "dog"}\n',
     r"m.jsonl:2: label 'dog' is a class name but line 1 has 1; use class names on every line, or integers"),
    ("m.jsonl", '{"path": "a.mp4", "label": [1]}\n', r"m.jsonl:1: label \[1\] is neither an integer nor a class name"),
    ("m.csv", "path,label\na.mp4,cat\nb.mp4,\nc.mp4,0\nd.mp4,dog\n",
     r"m.csv:4: label 0 is an integer but line 2 has 'cat'"),
    ("m.csv", "path,label\na.mp4,-2\n", r"m.csv:2: label -2 is negative; use -1 or leave it empty"),
    ("m.csv", "path,label\na.mp4,1\nb.mp4,2\n", r"m.csv:3: label 2 but .*classes.txt names only 2 classes"),
    ("m.jsonl", '{"path": "a.mp4", "label": "fish"}\n', r"m.jsonl:1: class 'fish' is not in .*classes.txt"),
    ("m.jsonl", '{"path": "a.mp4", "caption": ["x"]}\n', r"m.jsonl:1: caption \['x'\] is not a string"),
    ("m.jsonl", '{"path": "a.mp4"}\n{"path": "./a.mp4"}\n', r"m.jsonl:2: './a.mp4' is line 1's video again"),
    ("m.jsonl", '{"path": "a b.mp4"}\n{"path": "a_b.mp4"}\n',
     r"m.jsonl:2: 'a_b.mp4' and line 1's 'a b.mp4' map to the same sample key 'a_b'; rename one"),
])
def test_manifests_are_checked_line_by_line(tmp_path, name, text, error):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=error):
        load_sources(str(tmp_path / name))


def test_integer_labels_named_by_classes_txt(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "m.csv").write_text("path,label\na.mp4,1\nb.mp4,\nc.mp4,-1\nd.mp4, 0\n")
    items, classes = load_sources(str(tmp_path / "m.csv"))
    assert classes == ["cat", "dog"] and [i.label for i in items] == [1, -1, -1, 0]


def test_classes_txt_numbers_class_names_alike_in_every_manifest(tmp_path):
    """Without classes.txt a val manifest without 'dog' numbered 'fish' 1 where train had 2."""
    (tmp_path / "classes.txt").write_text("dog\ncat\nfish\n")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"path": f"{c}.mp4", "label": c}) + "\n"
                                                 for c in ("cat", "dog", "fish")))
    (tmp_path / "val.jsonl").write_text('{"path": "c.mp4", "label": "cat"}\n{"path": "f.mp4", "label": "fish"}\n')
    train, classes = load_sources(str(tmp_path / "train.jsonl"))
    val, val_classes = load_sources(str(tmp_path / "val.jsonl"))
    assert classes == val_classes == ["dog", "cat", "fish"]
    assert [(i.key, i.label) for i in train] == [("cat", 1), ("dog", 0), ("fish", 2)]
    assert [(i.key, i.label) for i in val] == [("c", 1), ("f", 2)]
    (tmp_path / "none.jsonl").write_text('{"path": "n.mp4"}\n')  # unlabelled: no class names from classes.txt
    assert load_sources(str(tmp_path / "none.jsonl"))[1] == []


def test_csv_from_excel_and_names_in_other_scripts(tmp_path):
    """A byte-order mark before 'path' (Excel's UTF-8 CSV) once read as a missing column; names of only
    non-ASCII letters all became the sample key '_'."""
    (tmp_path / "m.csv").write_bytes("\ufeffpath,caption\nè.mp4,a\né.mp4,b\nвидео.mp4,c\n".encode())
    items, _ = load_sources(str(tmp_path / "m.csv"))
    assert [i.key for i in items] == ["è", "é", "видео"]


def test_a_stray_file_beside_class_folders_is_refused(tmp_path):
    """One video at the top of a folder of class folders once unlabelled the whole set without a word."""
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "a.mp4").write_bytes(b"not decoded here")
    (tmp_path / "stray.mp4").write_bytes(b"not decoded here")
    with pytest.raises(SourceError, match=r"2 files sit one folder deep \(a folder per class\) but 1 do not "
                                          r"\(stray.mp4\).*manifest"):
        load_sources(str(tmp_path))


def test_rerun_resumes_instead_of_starting_over(tiny_manifest, tmp_path, monkeypatch):
    dest = str(tmp_path / "ds")
    calls = []
    real = shards_write.write_shard
    monkeypatch.setattr(shards_write, "write_shard", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    make_shards(str(tiny_manifest), dest, shard_size_mb=1e-6, progress=False)
    assert len(calls) == 12
    sidecar = tmp_path / "ds" / "shard-000004.meta.json"  # as if killed while writing shard 4: its first sidecar,
    side = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: side[k] for k in ("name", "keys", "options")} | {"state": "writing"}))
    os.remove(os.path.join(dest, "shard-000004.tar"))  # no tar yet,
    os.remove(os.path.join(dest, "index.json"))  # and no index
    calls.clear()
    index = make_shards(str(tiny_manifest), dest, shard_size_mb=1e-6, progress=False)
    assert calls == [4] and index["num_samples"] == 12
    # a shard deleted or cut short since it was written (its sidecar says done): written again, not counted as there
    os.remove(os.path.join(dest, "shard-000002.tar"))
    with open(os.path.join(dest, "shard-000007.tar"), "r+b") as f:
        f.truncate(1000)
    calls.clear()
    index = make_shards(str(tiny_manifest), dest, shard_size_mb=1e-6, progress=False)
    assert sorted(calls) == [2, 7] and index["num_samples"] == 12
    assert all(os.path.getsize(os.path.join(dest, s["name"])) == s["bytes"] for s in index["shards"])
    calls.clear()
    make_shards(str(tiny_manifest), dest, shard_size_mb=1e-6, reencode="all", progress=False)  # other options: redo
    assert len(calls) == 12


def test_a_shard_that_cannot_be_written_fails_instead_of_leaving_its_video_out(tiny_manifest, tmp_path, monkeypatch):
    """A full disk while a video went into the tar was taken for an unreadable video: the video was 'left out', the
    tar (its offsets past a half-written member) was corrupt or short, and make-shards exited 0."""
    dest, real, writes = str(tmp_path / "ds"), shards_write.TarWriter.write, []

    def write(self, key, fields):
        writes.append(key)
        if len(writes) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, fields)

    monkeypatch.setattr(shards_write.TarWriter, "write", write)
    with pytest.raises(OSError, match="No space left"):
        make_shards(str(tiny_manifest), dest, shard_size_mb=0.02, progress=False)
    assert not os.path.exists(os.path.join(dest, "index.json"))
    monkeypatch.setattr(shards_write.TarWriter, "write", real)
    index = make_shards(str(tiny_manifest), dest, shard_size_mb=0.02, progress=False)  # the rerun completes it
    assert index["num_samples"] == 12 and not index["skipped"]


def test_a_tar_write_error_names_the_tar(tmp_path, monkeypatch):
    """tarfile's errors name no file, so a full disk during make-shards said only "no space left on device"."""
    writer = shards_write.TarWriter(str(tmp_path / "shard.tar"))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._tf, "addfile", full)
    with pytest.raises(OSError) as exc:
        writer.write("clip", {"json": b"{}"})
    assert (exc.value.errno, exc.value.filename) == (errno.ENOSPC, str(tmp_path / "shard.tar"))


def test_rerun_after_the_manifest_changed_writes_the_changed_shards_again(tiny_manifest, tmp_path):
    """A relabelled video, a new caption and a source that appeared: a rerun once kept the old shards."""
    rows = [json.loads(line) for line in open(tiny_manifest)][:3]
    manifest, dest = tmp_path / "m.jsonl", tmp_path / "ds"

    def write(rows):
        manifest.write_text("".join(json.dumps({**r, "path": str(tiny_manifest.parent / r["path"])}) + "\n" for r in rows)
                            + json.dumps({"path": str(tmp_path / "late.mp4")}) + "\n")
        return make_shards(str(manifest), str(dest), shard_size_mb=1e-6, progress=False)

    first = write(rows)
    assert first["num_samples"] == 3 and [os.path.basename(s["path"]) for s in first["skipped"]] == ["late.mp4"]
    rows[1] |= {"label": 3, "caption": "relabelled"}
    os.link(tiny_manifest.parent / rows[0]["path"], tmp_path / "late.mp4")
    index = write(rows)
    assert index["num_samples"] == 4 and index["skipped"] == []
    batch = next(iter(build_loader(DataConfig(shards=str(dest), num_workers=0), frames=4, size=(16, 16),
                                   batch_size=4, train=False)))
    by_key = {k.rsplit("/", 1)[-1]: v for k, v in zip(batch["key"], zip(batch["label"].tolist(), batch["caption"]))}
    assert by_key[rows[1]["path"][:-4]] == (3, "relabelled") and "late" in by_key


def test_formats_the_loader_does_not_read_are_reencoded(tmp_path):
    """An MPEG-TS video was stored as .ts, which the loader skipped as a sample without video."""
    (tmp_path / "src").mkdir()
    _write_avi(tmp_path / "src" / "clip.ts", container="mpegts")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "src/clip.ts"}) + "\n")
    make_shards(str(manifest), str(tmp_path / "ds"), progress=False)
    assert sorted(_members(tmp_path / "ds" / "shard-000000.tar")) == ["src/clip.json", "src/clip.mp4"]
    batch = next(iter(build_loader(DataConfig(shards=str(tmp_path / "ds"), num_workers=0), frames=8, size=(16, 16),
                                   batch_size=1, train=False)))
    assert batch["key"] == ["src/clip"]


def test_parallel_writers_and_unreadable_videos(tiny_manifest, tmp_path):
    rows = [json.loads(line) for line in open(tiny_manifest)]
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 3000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**r, "path": str(tiny_manifest.parent / r["path"])}) + "\n" for r in rows)
                        + json.dumps({"path": str(tmp_path / "broken.mp4"), "label": 0}) + "\n")
    index = make_shards(str(manifest), str(tmp_path / "ds"), shard_size_mb=0.02, workers=2, progress=False)
    assert index["num_samples"] == 12 and len(index["shards"]) > 1
    assert [os.path.basename(s["path"]) for s in index["skipped"]] == ["broken.mp4"]
    assert sum(s["samples"] for s in index["shards"]) == 12


def test_no_readable_video_is_an_error(tmp_path):
    """Sources of which nothing decodes once gave an empty dataset and exit 0; the error names the first reason."""
    (tmp_path / "src" / "cat").mkdir(parents=True)
    for name in ("a.mp4", "b.avi"):
        (tmp_path / "src" / "cat" / name).write_text("not a video\n")
    with pytest.raises(DataError, match=r"none of the 2 videos of .*src could be read \(each is listed with its reason "
                                         r"in .*index.json; the first, .*cat/a.mp4: cannot decode"):
        make_shards(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
    assert len(json.loads((tmp_path / "ds" / "index.json").read_text())["skipped"]) == 2


def test_cli_make_shards(tiny_manifest, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(tiny_manifest), str(tmp_path / "out"), "--shard-size-mb", "0.05", "--workers", "1",
                              "--no-progress"])
    assert cli.run(args) == 0
    assert "12 clips (videos or images) in " in capsys.readouterr().out
    assert json.load(open(tmp_path / "out" / "index.json"))["num_samples"] == 12
    assert cli.main([str(tmp_path / "nothing-here"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpdm make-shards: error: ") and "not a folder of videos" in err and err.count("\n") == 1


def test_synthetic_dataset_goes_through_make_shards(tmp_path):
    cfg = DataConfig(shards=str(tmp_path / "syn"), synthetic=True, flip=False, synthetic_videos=10, num_workers=1, frame_stride=2)
    index = prepare_dataset(cfg, (6, 24, 32), num_classes=6)
    assert index["num_samples"] == 10 and index["format"] == "hpdm-shards/1"
    assert index["class_names"][:2] == ["red square moving left", "red square moving right"]
    with tarfile.open(tmp_path / "syn" / index["shards"][0]["name"]) as tf:
        meta = json.load(tf.extractfile(tf.getnames()[0]))
    assert (meta["width"], meta["height"]) == (32, 24) and meta["frames"] >= 6 * 2
    assert meta["caption"] == "a " + index["class_names"][meta["label"]]
    assert prepare_dataset(cfg, (6, 24, 32), num_classes=6) == index  # already there: not rewritten
    batch = next(iter(build_loader(cfg, frames=6, size=(24, 32), batch_size=10, train=False)))
    assert sorted(batch["label"].tolist()) == sorted(i % 6 for i in range(10))
    # the shape moves: consecutive frames differ, and the clip is not blank
    v = batch["video"].numpy().astype(int)
    assert np.abs(v[:, 1:] - v[:, :-1]).mean() > 1 and v.std() > 10


def test_shards_are_readable_by_webdataset(tiny_shards):
    """Our shards follow the WebDataset convention: the webdataset package groups them into the same samples."""
    import glob

    import webdataset as wds

    index = json.load(open(os.path.join(tiny_shards["one"], "index.json")))
    urls = sorted(glob.glob(os.path.join(tiny_shards["one"], "*.tar")))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == index["num_samples"] == 12
    for s in samples:
        meta = json.loads(s["json"])
        with av.open(io.BytesIO(s["mp4"])) as c:
            assert c.streams.video[0].codec_context.width == meta["width"]


def test_folder_videos_with_the_same_key_are_refused(tmp_path):
    """a.avi and a.mp4 would become one tar record; make-shards must stop and name both files."""
    for name in ("a.avi", "a.mp4"):
        (tmp_path / name).write_bytes(b"not decoded here")
    with pytest.raises(SourceError, match="a.avi.*a.mp4"):
        load_sources(str(tmp_path))


@pytest.mark.parametrize("dest", ["afile", "afile/sub"])
def test_a_destination_under_a_file_is_refused(tiny_manifest, tmp_path, dest):
    """DEST below a file once ended in a NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("the user's file")
    with pytest.raises(DataError, match=rf"{dest}: .*afile is a file; make-shards writes shards into a folder"):
        make_shards(str(tiny_manifest), str(tmp_path / dest), progress=False)
    assert (tmp_path / "afile").read_text() == "the user's file"
