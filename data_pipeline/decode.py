"""Decode one training clip from an encoded video: pick frame indices, seek near the first, decode only as far
as the last, resize the short side and crop to the target size, optionally flip.

Frame indices are chosen in the source's frame grid: with native rate r, target rate f (0: r) and stride s,
clip frame i is source frame ``round(start + i * s * r / f)``. Training draws ``start`` uniformly, evaluation
takes the first frames.

An image becomes a still clip (as in Snap Video and HPDM's joint image-video training): resized and cropped
exactly like a video frame, then repeated along time.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from .video import VideoError, display_shape, read_image, video_stream


class ShortVideo(VideoError):
    """The video has fewer frames than one clip needs."""


@dataclass
class ClipSpec:
    frames: int
    size: tuple[int, int]  # H, W
    stride: int = 1
    fps: float = 0.0  # 0: native
    train: bool = True
    flip: bool = False
    threads: int = 1


def clip_indices(n_frames: int, native_fps: float, spec: ClipSpec, rng: np.random.Generator | None) -> list[int]:
    """Source frame indices of the clip, or ShortVideo if the video cannot supply them."""
    step = spec.stride * (native_fps / spec.fps if spec.fps > 0 else 1.0)
    start_max = n_frames - 1 - (spec.frames - 1) * step
    if start_max < -1e-6:
        need = int(np.ceil((spec.frames - 1) * step)) + 1
        raise ShortVideo(f"video has {n_frames} frames; a clip needs {need}")
    start = float(rng.integers(0, int(start_max + 1e-6) + 1)) if (spec.train and rng is not None) else 0.0
    return [min(n_frames - 1, int(np.floor(start + i * step + 0.5))) for i in range(spec.frames)]


def _resized_shape(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    scale = max(size[0] / h, size[1] / w)
    return max(size[0], round(h * scale)), max(size[1], round(w * scale))


def _crop_box(h: int, w: int, spec: ClipSpec, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left): the short side to the target, a random crop in training, else
    the centre one."""
    rh, rw = _resized_shape(h, w, spec.size)
    y, x = (rh - spec.size[0]) // 2, (rw - spec.size[1]) // 2
    if spec.train and rng is not None:
        y, x = int(rng.integers(0, rh - spec.size[0] + 1)), int(rng.integers(0, rw - spec.size[1] + 1))
    return rh, rw, y, x


def _resize_crop(frame: av.VideoFrame, crop: tuple[int, int, int, int], spec: ClipSpec,
                 scaler: VideoReformatter | None = None, turns: int = 0) -> np.ndarray:
    """uint8 [H,W,3] of ``frame`` scaled (area filter when shrinking), turned ``turns`` quarter turns
    counterclockwise and cropped by ``crop`` (see _crop_box, in the turned frame's shape).

    Scales on ``spec.threads`` threads like the decoder (FFmpeg's default starts a thread per core for every
    frame); ``scaler``, one for all the frames of a clip, keeps its scaling context between them."""
    rh, rw, y, x = crop
    if turns % 2:
        rh, rw = rw, rh
    scaler = scaler or VideoReformatter()
    img = scaler.reformat(frame, width=rw, height=rh, format="rgb24", threads=spec.threads,
                          interpolation="AREA" if rh <= frame.height else "BILINEAR").to_ndarray()
    return np.rot90(img, turns)[y:y + spec.size[0], x:x + spec.size[1]]


def _maybe_flip(clip: np.ndarray, spec: ClipSpec, rng: np.random.Generator | None) -> np.ndarray:
    if spec.flip and spec.train and rng is not None and rng.random() < 0.5:
        return np.ascontiguousarray(clip[:, :, ::-1])
    return clip


def decode_clip(data: bytes, meta: dict, spec: ClipSpec, rng: np.random.Generator | None, timing: dict | None = None):
    """uint8 [T,H,W,3] for the clip; ``timing`` (if given) accumulates seconds under "decode" and "resize"."""
    t0 = time.perf_counter()
    first = int(meta.get("first_frame", 0))  # frames before it cannot be decoded (see video.probe)
    idx = [first + i for i in clip_indices(int(meta["frames"]) - first, float(meta["fps"]), spec, rng)]
    out = np.empty((spec.frames, *spec.size, 3), np.uint8)
    scaler = VideoReformatter()
    resize_s = 0.0
    crop = None

    def image(shown: list, s) -> np.ndarray:  # [frame, None] -> resized and cropped, once however often shown
        nonlocal crop, resize_s
        if shown[1] is None:
            r0 = time.perf_counter()
            h, w, turns = display_shape(shown[0], s)
            crop = crop or _crop_box(h, w, spec, rng)
            shown[1] = _resize_crop(shown[0], crop, spec, scaler, turns)
            resize_s += time.perf_counter() - r0
        return shown[1]

    try:
        for attempt in (0, 1):  # 1: the seek failed or landed past the clip start: from the beginning instead
            with av.open(io.BytesIO(data), mode="r") as c:
                s = video_stream(c)
                s.thread_count = spec.threads
                rate = float(s.average_rate or s.guessed_rate or meta["fps"])
                tb = float(s.time_base) if s.time_base else 1.0 / rate
                origin = s.start_time or 0
                got, x, prev, restart = 0, -1.0, None, False  # prev: [frame, its image or None]
                try:
                    if attempt == 0 and idx[0] > 0:
                        c.seek(origin + int(idx[0] / rate / tb), stream=s, backward=True)
                except av.FFmpegError:  # no key frame at or before it
                    continue
                for frame in c.decode(s):
                    # x: the frame's time in source frames; not an integer where the frame rate varies
                    x = (frame.pts - origin) * tb * rate if frame.pts is not None else x + 1
                    if prev is None and x > idx[0] + 0.5:
                        restart = True
                        break
                    # clip frames timed before this one show the frame on screen then: the previous one
                    while got < spec.frames and x > idx[got] + 0.5:
                        out[got], got = image(prev, s), got + 1
                    prev = [frame, None]
                    while got < spec.frames and x >= idx[got] - 0.5:
                        out[got], got = image(prev, s), got + 1
                    if got == spec.frames:
                        break
                if restart and attempt == 1:
                    raise ShortVideo(f"its first decodable frame is frame {x:.0f}, after the clip's first, frame "
                                     f"{idx[0]} (a video cut without its key frame: make its shards again)")
                # the stream ended: its last frame stays on screen for about a frame
                while prev is not None and got < spec.frames and idx[got] <= x + 1.5:
                    out[got], got = image(prev, s), got + 1
                if not restart:
                    break
    except av.FFmpegError as exc:
        raise VideoError(f"corrupt video: {exc}") from exc
    if got < spec.frames:
        raise ShortVideo(f"decoded {got} of the clip's {spec.frames} frames (frames {idx[0]}..{idx[-1]} of {meta['frames']})")
    out = _maybe_flip(out, spec, rng)
    if timing is not None:
        timing["decode"] = timing.get("decode", 0.0) + time.perf_counter() - t0 - resize_s
        timing["resize"] = timing.get("resize", 0.0) + resize_s
    return out


def decode_still(data: bytes, spec: ClipSpec, rng: np.random.Generator | None, timing: dict | None = None):
    """uint8 [T,H,W,3]: the image ``data`` resized, cropped and flipped as decode_clip does a video frame, repeated
    ``spec.frames`` times; ImageError when it cannot be decoded."""
    t0 = time.perf_counter()
    frame = av.VideoFrame.from_ndarray(read_image(data), format="rgb24")
    r0 = time.perf_counter()
    img = _resize_crop(frame, _crop_box(frame.height, frame.width, spec, rng), spec)
    out = _maybe_flip(np.repeat(img[None], spec.frames, axis=0), spec, rng)
    if timing is not None:
        timing["decode"] = timing.get("decode", 0.0) + r0 - t0
        timing["resize"] = timing.get("resize", 0.0) + time.perf_counter() - r0
    return out
