"""Whole-video operations with PyAV: probing metadata, encoding frames to mp4, re-encoding with a size cap; and
reading still images with Pillow (samples that the loader turns into still clips)."""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageOps

VIDEO_EXTS = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "mpg", "mpeg", "ogv")  # stored as they are
# Read from a folder too, and re-encoded to mp4 (camcorder, broadcast, phone and web formats)
OTHER_VIDEO_EXTS = ("mts", "m2ts", "ts", "3gp", "3g2", "flv", "f4v", "wmv", "asf", "gif", "mxf", "vob", "dv", "m2v",
                    "y4m", "divx")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # shards store jpeg as jpg
TIME_BASE = Fraction(1, 90000)  # of re-encoded videos: MPEG's clock, fine enough for any frame's own time


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


def video_stream(container):
    """The video stream to read: of the default ones (else all), the largest picture; never cover art."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise VideoError("no video stream")
    default = [s for s in streams if s.disposition & av.stream.Disposition.default]
    return max(default or streams, key=lambda s: (s.codec_context.width or 0) * (s.codec_context.height or 0))


def display_shape(frame: av.VideoFrame, stream) -> tuple[int, int, int]:
    """(height, width, quarter turns counterclockwise) of ``frame`` as players show it: non-square pixels (the
    stream's sample aspect ratio) stretched to square ones, then turned by the display matrix (phone videos)."""
    turns = round((frame.rotation or 0) / 90) % 4
    sar = stream.sample_aspect_ratio
    w = max(1, round(frame.width * sar)) if sar and sar > 0 else frame.width
    return (w, frame.height, turns) if turns % 2 else (frame.height, w, turns)


def _rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise VideoError("video stream has no frame rate")
    return float(rate)


def probe(data: bytes) -> dict:
    """fps, frames, width, height (as displayed) and duration (frames / fps) of the video stream; decodes one
    frame. ``first_frame``, where not 0, is the first decodable one (a video cut without its leading key frame).

    The frame count comes from the container when it records one, else from counting packets.
    """
    if not data:
        raise VideoError("empty file (0 bytes)")
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            s = video_stream(c)
            fps, frames = _rate(s), int(s.frames or 0)
            if frames <= 0:
                frames = sum(1 for p in c.demux(s) if p.size)
                c.seek(0)
            frame = next(c.decode(s), None)
            if frame is None:
                raise VideoError("no decodable frame")
            h, w, _ = display_shape(frame, s)
            meta = {"fps": fps, "frames": frames, "width": w, "height": h, "duration": round(frames / fps, 6),
                    "codec": s.codec_context.name}
            if frame.pts is not None and s.time_base and (first := round((frame.pts - (s.start_time or 0))
                                                                          * float(s.time_base) * fps)) > 0:
                meta["first_frame"] = first
            return meta
    except av.FFmpegError as exc:
        raise VideoError(f"cannot decode: {exc}") from exc


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def encode(frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 20, pix_fmt: str = "yuv420p") -> bytes:
    """Encode uint8 [T,H,W,3] (H, W even) as an mp4 in memory. ``yuv444p`` keeps full colour resolution (4:2:0
    halves it, which blurs small coloured shapes into one another); ``libx264rgb`` with ``rgb24`` and ``crf`` 0
    (then qp 0) keeps the exact frames."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        s.codec_context.thread_count = 1
        if codec in ("libx264", "libx264rgb"):  # x264's crf 0 still rounds: qp 0 is lossless
            s.options = {"qp" if crf == 0 else "crf": str(crf), "preset": "veryfast"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def reencode(data: bytes, max_side: int = 0, codec: str = "libx264", crf: int = 20) -> bytes:
    """Re-encode any decodable video to H.264 mp4 as players show it (upright, square pixels), scaled so that its
    long side is at most ``max_side`` (0: keep), each frame at its own time (variable frame rates stay so)."""
    out = io.BytesIO()
    try:
        with av.open(io.BytesIO(data), mode="r") as src, av.open(out, mode="w", format="mp4") as dst:
            si = video_stream(src)
            si.thread_type = "AUTO"
            rate, so, first, last = Fraction(_rate(si)).limit_denominator(1001), None, None, -1
            for i, frame in enumerate(src.decode(si)):
                # the frame's own time (from the first decoded frame), or i / rate where the source gives none
                t = frame.pts * si.time_base if frame.pts is not None and si.time_base else Fraction(i) / rate
                first = t if first is None else first
                h, w, turns = display_shape(frame, si)
                if so is None:
                    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
                    so = dst.add_stream(codec, rate=rate)
                    so.width, so.height, so.pix_fmt = _even(w * scale), _even(h * scale), "yuv420p"
                    so.codec_context.time_base = TIME_BASE
                    if codec == "libx264":
                        so.options = {"crf": str(crf), "preset": "veryfast"}
                if turns:  # scaled in the stored orientation, then turned upright
                    img = frame.to_ndarray(format="rgb24", interpolation="AREA", width=so.height if turns % 2 else
                                           so.width, height=so.width if turns % 2 else so.height)
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(img, turns)), format="rgb24")
                frame = frame.reformat(width=so.width, height=so.height, format="yuv420p", interpolation="AREA")
                last = max(last + 1, round((t - first) / TIME_BASE))
                frame.pts, frame.time_base = last, TIME_BASE
                dst.mux(so.encode(frame))
            if so is None:
                raise VideoError("no decodable frame")
            dst.mux(so.encode())
    except av.FFmpegError as exc:
        raise VideoError(f"cannot re-encode: {exc}") from exc
    return out.getvalue()
