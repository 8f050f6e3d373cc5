"""Still images for joint image-video training: images in shards, decoded as still clips exactly like a video
frame, corrupt images skipped, exact resume, the batch split and its config."""
import json
import logging
import os
import shutil
import tarfile

import av
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import DataConfig, build_loader, make_shards, split_batch
from data_pipeline.sources import load_sources
from data_pipeline.synthetic import render
from data_pipeline.tario import TarWriter
from data_pipeline.video import probe_image
from hpdm.config import ConfigError, load_config

SIZE = (24, 40)  # from 32x48 sources: shrunk to 27x40 (area filter), then cropped


def _frame(i):
    """First frame of the tiny_manifest's clip i (32x48, class i % 4)."""
    return render(i % 4, 24, 32, 48, seed=i)[0]


def _as_video_frame(img, size=SIZE):
    """What evaluation makes of a video frame ``img``: short side resized to the target (area), centre crop."""
    h, w = img.shape[:2]
    scale = max(size[0] / h, size[1] / w)
    rh, rw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    out = av.VideoFrame.from_ndarray(img, format="rgb24").to_ndarray(width=rw, height=rh, format="rgb24",
                                                                      interpolation="AREA")
    y, x = (rh - size[0]) // 2, (rw - size[1]) // 2
    return out[y:y + size[0], x:x + size[1]]


@pytest.fixture(scope="module")
def mixed(tiny_manifest, tmp_path_factory):
    """A manifest of 3 of the tiny mp4s, stills of clips 0-5 (png, lossless webp, jpg / jpeg) and an unreadable png; its
    shards ("mixed", one sample per shard) and the images alone ("images")."""
    root = tmp_path_factory.mktemp("images")
    rows = {json.loads(line)["path"]: json.loads(line) for line in open(tiny_manifest)}
    manifest, images = [], []
    for i in range(3):
        name = f"clip{i:06d}.mp4"
        shutil.copy(tiny_manifest.parent / name, root / name)
        manifest.append(rows[name])
    for i, ext in enumerate(["png", "png", "webp", "jpg", "jpeg", "jpg"]):
        name = f"still{i}.{ext}"
        Image.fromarray(_frame(i)).save(root / name, **({"lossless": True} if ext == "webp" else {"quality": 95}))
        images.append({"path": name, "label": i % 4, "caption": f"still {i}"})
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    images.append({"path": "broken.png", "label": 0, "caption": "broken"})
    for name, lines in (("mixed.jsonl", manifest + images), ("images.jsonl", images)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
        make_shards(str(root / name), str(root / name.split(".")[0]), shard_size_mb=1e-6, progress=False)
    return root


def _samples(shards, frames=6, **kw):
    loader = build_loader(DataConfig(shards=shards, num_workers=0, max_skip_fraction=1.0, **kw), frames=frames,
                          size=SIZE, batch_size=4, train=False)
    out = {k: (v, lab, cap) for b in loader
           for k, v, lab, cap in zip(b["key"], b["video"], b["label"].tolist(), b["caption"])}
    return out, loader.stats


def test_make_shards_stores_images_as_they_are_with_video_shaped_metadata(mixed):
    index = json.loads((mixed / "mixed" / "index.json").read_text())
    assert index["num_samples"] == 9
    skipped = [(os.path.basename(s["path"]), "cannot decode image" in s["reason"]) for s in index["skipped"]]
    assert skipped == [("broken.png", True)]
    members = {}
    for shard in index["shards"]:
        with tarfile.open(mixed / "mixed" / shard["name"]) as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf.getmembers()})
    assert {"still0.png", "still2.webp", "still3.jpg", "still4.jpg", "clip000000.mp4"} <= set(members)  # jpeg: .jpg
    assert members["still0.png"] == (mixed / "still0.png").read_bytes()
    assert members["still4.jpg"] == (mixed / "still4.jpeg").read_bytes()
    meta = json.loads(members["still4.json"])
    assert meta == {"image": True, "width": 48, "height": 32, "frames": 1, "fps": 0, "duration": 0.0, "codec": "jpeg",
                    "label": 0, "caption": "still 4", "key": "still4", "source": "still4.jpeg"}
    assert "image" not in json.loads(members["clip000000.json"])


def test_a_folder_mixes_images_and_videos(mixed, tmp_path):
    for cls, name in (("a", "clip000000.mp4"), ("b", "still0.png"), ("b", "still3.jpg")):
        (tmp_path / cls).mkdir(exist_ok=True)
        shutil.copy(mixed / name, tmp_path / cls / name)
    items, classes = load_sources(str(tmp_path))
    assert classes == ["a", "b"]
    assert [(i.key, i.label) for i in items] == [("a/clip000000", 0), ("b/still0", 1), ("b/still3", 1)]


def test_images_become_still_clips_like_a_resized_video_frame(mixed):
    got, stats = _samples(str(mixed / "mixed"))
    assert stats["seen"] == 9 and stats["skipped"] == 0
    for i in range(6):
        clip, label, caption = got[f"still{i}"]
        assert clip.shape == (6, *SIZE, 3) and clip.dtype == torch.uint8
        assert all(torch.equal(f, clip[0]) for f in clip)  # a still video
        assert (label, caption) == (i % 4, f"still {i}")
        want = torch.from_numpy(_as_video_frame(_frame(i))).int()
        err = (clip[0].int() - want).abs()
        if i < 3:  # png, lossless webp
            assert torch.equal(clip[0].int(), want)
        else:  # jpg at quality 95
            assert err.float().mean() < 2.5 and err.max() < 96, (err.float().mean(), err.max())  # ~1.4 and ~50
    video = got["clip000000"][0][0].int()  # the mp4 of clip 0 (4:4:4, crf 20), decoded as a video
    assert (video - got["still0"][0][0].int()).abs().float().mean() < 3.0


def test_a_corrupt_image_is_a_counted_skip(mixed, tmp_path, caplog):
    png = (mixed / "still0.png").read_bytes()
    meta = json.dumps(probe_image(png) | {"label": 0, "caption": "ok"}).encode()
    w = TarWriter(str(tmp_path / "shard-000000.tar"))
    w.write("good", {"png": png, "json": meta})
    w.write("noise", {"jpg": os.urandom(2000), "json": meta})
    w.write("truncated", {"png": png[: len(png) // 2], "json": meta})
    w.write("bare_json", {"png": png, "json": b'{"caption": "no fps or frames: not needed for an image"}'})
    w.close()
    with caplog.at_level(logging.WARNING):
        got, stats = _samples(str(tmp_path))
    assert sorted(got) == ["bare_json", "good"]
    assert stats["reasons"] == {"corrupt_image": 2} and stats["seen"] == 4
    assert "'noise'" in caplog.text and "corrupt_image" in caplog.text


def test_resume_over_image_shards_equals_the_uninterrupted_run(mixed):
    cfg = DataConfig(shards=str(mixed / "images"), num_workers=2, shuffle_buffer=3, max_skip_fraction=0.0)
    kw = dict(frames=4, size=(16, 16), batch_size=2, seed=5)
    loader = build_loader(cfg, **kw)
    it = iter(loader)
    full = [next(it) for _ in range(9)]  # 18 samples of 6: every worker crosses an epoch end
    first = build_loader(cfg, **kw)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    second = build_loader(cfg, **kw)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    it = iter(second)
    tail = [next(it) for _ in range(6)]
    for a, b in zip(full, head + tail):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
    clips = torch.cat([b["video"] for b in full])
    assert (clips == clips[:, :1]).all()  # still after random crops and flips
    views = {k: set() for k in ("still1", "still2")}  # the same image, augmented (crop, flip) anew each epoch
    for b in full:
        for k, v in zip(b["key"], b["video"]):
            if k in views:
                views[k].add(bytes(v[0].numpy()))
    assert any(len(s) > 1 for s in views.values())


@pytest.mark.parametrize("micro,fraction,want", [
    (8192, 0.5, (4096, 4096)),  # the paper's T2V batch
    (2, 0.5, (1, 1)), (3, 0.5, (1, 2)), (10, 0.25, (7, 3)), (4, 0.01, (3, 1)), (4, 0.99, (1, 3)),
    (5, 0.0, (5, 0)), (1, 0.0, (1, 0)),
])
def test_split_batch(micro, fraction, want):
    assert split_batch(micro, fraction) == want


@pytest.mark.parametrize("micro,fraction,message", [
    (1, 0.5, "data.image_batch_fraction: 0.5 puts videos and images in every micro-batch"),
    (4, 1.0, "data.image_batch_fraction: must be in [0, 1); got 1.0"),
    (4, -0.5, "data.image_batch_fraction: must be in [0, 1); got -0.5"),
])
def test_split_batch_errors_name_the_fraction(micro, fraction, message):
    with pytest.raises(ConfigError) as err:
        split_batch(micro, fraction)
    assert err.value.key == "data.image_batch_fraction" and str(err.value).startswith(message)


@pytest.mark.parametrize("overrides,message", [
    (["data.image_batch_fraction=1"], "must be in [0, 1); got 1"),
    (["data.image_batch_fraction=-0.1"], "must be in [0, 1); got -0.1"),
    (["data.image_shards=s3://b/stills", "data.image_batch_fraction=0"], "must be > 0 when data.image_shards is set"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert err.value.key == "data.image_batch_fraction" and message in str(err.value)


def test_config_defaults_and_a_valid_joint_setting():
    data = load_config("configs/tiny.yaml").data
    assert (data.image_shards, data.image_batch_fraction) == ("", 0.5)
    cfg = load_config("configs/tiny.yaml", ["data.image_shards=s3://b/stills", "data.image_batch_fraction=0.25"])
    assert (cfg.data.image_shards, cfg.data.image_batch_fraction) == ("s3://b/stills", 0.25)
