"""Videos as phones, camcorders and cutting tools leave them: turned by a display matrix, with non-square pixels,
several video tracks, no key frame at the start, formats beside the common ones, class folders that are links.
Each is checked by its pixels: four coloured quarters whose places show the picture's orientation and shape."""
import io
import json
import logging
import os
import tarfile
from fractions import Fraction

import av
import numpy as np
import pytest

from data_pipeline import DataConfig, build_loader, make_shards
from data_pipeline.decode import ClipSpec, ShortVideo, decode_clip
from data_pipeline.video import VideoError, probe, reencode

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def _picture(h: int = 64, w: int = 96) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:h // 2, :w // 2], img[:h // 2, w // 2:], img[h // 2:, :w // 2], img[h // 2:, w // 2:] = RED, GREEN, BLUE, GREY
    return img


def _encode(path, frames: int = 24, setup=None, fmt=None, codec="libx264", pix_fmt="yuv420p", **opts) -> bytes:
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=24)
        s.width, s.height, s.pix_fmt = 96, 64, pix_fmt
        s.options = opts
        if setup:
            setup(s)
        for _ in range(frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(_picture(), format="rgb24")))
        c.mux(s.encode())
    return path.read_bytes()


def _quarters(img: np.ndarray) -> list:
    """The colour nearest to the middle of each quarter: top left, top right, bottom left, bottom right."""
    h, w = img.shape[:2]
    names = {RED: "red", GREEN: "green", BLUE: "blue", GREY: "grey"}
    return [names[min(names, key=lambda c: np.abs(np.array(c) - img[y, x].astype(int)).sum())]
            for y, x in ((h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4))]


def _stored(dest, key: str) -> tuple[bytes, dict]:
    with tarfile.open(dest / "shard-000000.tar") as tf:
        data = next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.startswith(key + ".")
                    and not m.name.endswith(".json"))
        return data, json.load(tf.extractfile(key + ".json"))


@pytest.mark.parametrize("rotation,upright", [
    (90, ["green", "grey", "red", "blue"]),  # counterclockwise, as FFmpeg's display matrix says
    (-90, ["blue", "red", "grey", "green"]),  # a phone held the other way
    (180, ["grey", "blue", "green", "red"]),
])
@pytest.mark.parametrize("reencoded", [False, True])
def test_a_turned_phone_video_trains_upright(tmp_path, rotation, upright, reencoded):
    """The display matrix was ignored: clips showed the stored picture sideways, and --reencode dropped the matrix."""
    (tmp_path / "src").mkdir()
    _encode(tmp_path / "src" / "v.mp4", setup=lambda s: s.set_display_rotation(rotation))
    make_shards(str(tmp_path / "src"), str(tmp_path / "ds"), reencode="all" if reencoded else "non-mp4", progress=False)
    data, meta = _stored(tmp_path / "ds", "v")
    assert (meta["width"], meta["height"]) == ((64, 96) if rotation % 180 else (96, 64))
    clip = decode_clip(data, meta, ClipSpec(frames=4, size=(48, 32) if rotation % 180 else (32, 48), train=False), None)
    assert all(_quarters(f) == upright for f in clip), _quarters(clip[0])


def test_non_square_pixels_are_shown_as_a_player_shows_them(tmp_path):
    """A 96x64 video with 2:1 pixels (a player shows 192x64) was cropped as if 96x64: half of it lost at 3:1."""
    data = _encode(tmp_path / "v.mp4", setup=lambda s: setattr(s.codec_context, "sample_aspect_ratio", Fraction(2)))
    assert (probe(data)["width"], probe(data)["height"]) == (192, 64)
    clip = decode_clip(data, probe(data), ClipSpec(frames=2, size=(32, 96), train=False), None)
    assert _quarters(clip[0]) == ["red", "green", "blue", "grey"]  # all of it: a 3:1 crop of a 3:1 picture
    square = reencode(data)
    assert (probe(square)["width"], probe(square)["height"]) == (192, 64)


def test_the_main_video_track_is_read_not_the_first(tmp_path):
    """Of two video tracks, track 0 (a small flat one) was always taken."""
    path = tmp_path / "v.mkv"
    with av.open(str(path), "w") as c:
        small, main = c.add_stream("libx264", rate=24), c.add_stream("libx264", rate=24)
        (small.width, small.height), (main.width, main.height) = (32, 16), (96, 64)
        for _ in range(24):
            c.mux(small.encode(av.VideoFrame.from_ndarray(np.full((16, 32, 3), 200, np.uint8), format="rgb24")))
            c.mux(main.encode(av.VideoFrame.from_ndarray(_picture(), format="rgb24")))
        c.mux(small.encode())
        c.mux(main.encode())
    data = path.read_bytes()
    assert (probe(data)["width"], probe(data)["height"]) == (96, 64)
    clip = decode_clip(data, probe(data), ClipSpec(frames=2, size=(32, 48), train=False), None)
    assert _quarters(clip[0]) == ["red", "green", "blue", "grey"]
    assert _quarters(av.open(io.BytesIO(reencode(data))).decode(video=0).__next__().to_ndarray(format="rgb24")) == [
        "red", "green", "blue", "grey"]


def test_a_video_cut_without_its_key_frame_trains_on_the_frames_that_decode(tmp_path):
    """Packets 0-4 cut away (a stream copy cut mid-GOP): 15 leading frames cannot be decoded. Every clip that
    started there was skipped as 'corrupt video: Operation not permitted', and an evaluation never read it."""
    _encode(tmp_path / "whole.mp4", frames=60, g="20", bf="0", **{"x264-params": "keyint=20:min-keyint=20:scenecut=0"})
    with av.open(str(tmp_path / "whole.mp4")) as src, av.open(str(tmp_path / "cut.mp4"), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for k, packet in enumerate(src.demux(src.streams.video[0])):
            if packet.dts is not None and k >= 5:
                packet.stream = out
                dst.mux(packet)
    data = (tmp_path / "cut.mp4").read_bytes()
    meta = probe(data)
    assert meta["first_frame"] == 15 and meta["frames"] == 55
    spec = ClipSpec(frames=8, size=(32, 48), train=True)
    for seed in range(30):
        assert _quarters(decode_clip(data, meta, spec, np.random.default_rng(seed))[0]) == ["red", "green", "blue", "grey"]
    assert decode_clip(data, meta, ClipSpec(frames=40, size=(32, 48), train=False), None).shape[0] == 40
    with pytest.raises(ShortVideo, match="first decodable frame is frame 15, after the clip's first, frame 0"):
        decode_clip(data, {k: v for k, v in meta.items() if k != "first_frame"}, spec, None)  # shards made before


def test_a_variable_frame_rate_video_keeps_its_times_when_reencoded(tmp_path):
    """--reencode put frame i at i / average rate, so motion sped up and slowed down against the stored video."""
    times = [0, 33, 66, 166, 176, 186, 386, 419, 452, 485]
    with av.open(str(tmp_path / "vfr.mkv"), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for t in times:
            frame = av.VideoFrame.from_ndarray(_picture(), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    with av.open(io.BytesIO(reencode((tmp_path / "vfr.mkv").read_bytes()))) as c:
        got = [round(float(f.pts * f.time_base) * 1000) for f in c.decode(video=0)]
    assert [g - got[0] for g in got] == pytest.approx(times, abs=1)


def test_a_folder_of_videos_as_users_have_them(tmp_path, caplog):
    """Class folders that are links were dropped without a word (a whole class lost, the others renumbered);
    camcorder, broadcast and web formats (.MTS, .ts, .gif, ...) were left out uncounted though the docs said they
    were re-encoded; other files were passed over silently; an empty file's error was FFmpeg's errno."""
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere" / "dogs"
    (src / "cats").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    _encode(src / "cats" / "a.mp4")
    _encode(src / "cats" / "b.MTS", fmt="mpegts")
    _encode(src / "cats" / "c.gif", codec="gif", pix_fmt="rgb8")
    _encode(elsewhere / "d.flv", fmt="flv")
    (src / "dogs").symlink_to(elsewhere)
    (elsewhere / "again").symlink_to(src)  # a link back up: walked once, not forever
    (src / "cats" / "notes.txt").write_text("not a video")
    (src / "cats" / "empty.mp4").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        index = make_shards(str(src), str(tmp_path / "ds"), progress=False)
    assert index["class_names"] == ["cats", "dogs"] and index["num_samples"] == 4
    assert [(os.path.basename(s["path"]), s["reason"]) for s in index["skipped"]] == [("empty.mp4", "empty file (0 bytes)")]
    assert "1 files below" in caplog.text and "are neither videos nor images by their extension and are left out " \
                                              "(cats/notes.txt)" in caplog.text
    assert "which was read already" in caplog.text
    loader = build_loader(DataConfig(shards=str(tmp_path / "ds"), num_workers=0), frames=8, size=(32, 48),
                          batch_size=4, train=False)
    batch = next(iter(loader))
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1]
    assert all(_quarters(v[0].numpy()) == ["red", "green", "blue", "grey"] for v in batch["video"])


def test_an_empty_file_says_so():
    with pytest.raises(VideoError, match="^empty file"):
        probe(b"")
