"""Writing sampled videos as mp4 (H.264 through PyAV)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3,T,H,W] in [-1, 1] -> uint8 [T,H,W,3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> None:
    """Encode uint8 [T,H,W,3] frames; H and W must be even (H.264 with yuv420p)."""
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
