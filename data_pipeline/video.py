"""Whole-video operations with PyAV: probing metadata, encoding frames to mp4, re-encoding with a size cap; and
reading still images with Pillow (samples that the loader turns into still clips)."""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageOps

VIDEO_EXTS = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "mpg", "mpeg", "ogv")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # shards store jpeg as jpg


class VideoError(ValueError):
    """A video that cannot be opened or decoded."""


class ImageError(VideoError):
    """An image that cannot be opened or decoded (a VideoError, so whatever skips bad videos skips it too)."""


def read_image(data: bytes) -> np.ndarray:
    """uint8 [H,W,3] RGB of an encoded image, turned upright by its EXIF orientation, fully decoded (so a
    truncated file fails here, not later)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from exc


def probe_image(data: bytes) -> dict:
    """An image's metadata in the shape of :func:`probe`'s (one frame, fps 0), with "image": true."""
    h, w = read_image(data).shape[:2]
    with Image.open(io.BytesIO(data)) as im:
        codec = (im.format or "").lower()
    return {"image": True, "fps": 0, "frames": 1, "width": w, "height": h, "duration": 0.0, "codec": codec}


def _rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise VideoError("video stream has no frame rate")
    return float(rate)


def probe(data: bytes) -> dict:
    """fps, frames, width, height and duration (frames / fps) of the first video stream; decodes one frame.

    The frame count comes from the container when it records one, else from counting packets.
    """
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.video:
                raise VideoError("no video stream")
            s = c.streams.video[0]
            fps, frames = _rate(s), int(s.frames or 0)
            if frames <= 0:
                frames = sum(1 for p in c.demux(s) if p.size)
                c.seek(0)
            frame = next(c.decode(s), None)
            if frame is None:
                raise VideoError("no decodable frame")
            return {"fps": fps, "frames": frames, "width": frame.width, "height": frame.height,
                    "duration": round(frames / fps, 6), "codec": s.codec_context.name}
    except av.FFmpegError as exc:
        raise VideoError(f"cannot decode: {exc}") from exc


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def encode(frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 20, pix_fmt: str = "yuv420p") -> bytes:
    """Encode uint8 [T,H,W,3] (H, W even) as an mp4 in memory. ``yuv444p`` keeps full colour resolution (4:2:0
    halves it, which blurs small coloured shapes into one another)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        s.codec_context.thread_count = 1
        if codec == "libx264":
            s.options = {"crf": str(crf), "preset": "veryfast"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def reencode(data: bytes, max_side: int = 0, codec: str = "libx264", crf: int = 20) -> bytes:
    """Re-encode any decodable video to H.264 mp4, scaling it so its long side is at most ``max_side`` (0: keep)."""
    out = io.BytesIO()
    try:
        with av.open(io.BytesIO(data), mode="r") as src, av.open(out, mode="w", format="mp4") as dst:
            si = src.streams.video[0]
            si.thread_type = "AUTO"
            w, h = si.codec_context.width, si.codec_context.height
            scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
            rate = Fraction(_rate(si)).limit_denominator(1001)
            so = dst.add_stream(codec, rate=rate)
            so.width, so.height, so.pix_fmt = _even(w * scale), _even(h * scale), "yuv420p"
            if codec == "libx264":
                so.options = {"crf": str(crf), "preset": "veryfast"}
            for i, frame in enumerate(src.decode(si)):
                frame = frame.reformat(width=so.width, height=so.height, format="yuv420p", interpolation="AREA")
                # frame i at i / rate: the decoded frame's own pts and time base are the source container's
                frame.pts, frame.time_base = i, 1 / rate
                dst.mux(so.encode(frame))
            dst.mux(so.encode())
    except av.FFmpegError as exc:
        raise VideoError(f"cannot re-encode: {exc}") from exc
    return out.getvalue()
