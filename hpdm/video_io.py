"""Writing sampled videos as mp4 (H.264, through the data pipeline's encoder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_pipeline.local_files import write_atomic
from data_pipeline.video import encode


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3,T,H,W] in [-1, 1] -> uint8 [T,H,W,3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def clip_fps(cfg) -> float:
    """The frame rate at which a generator's videos play as fast as its training clips: data.fps (where 0, which
    keeps native rates, the synthetic set's own rate) over data.frame_stride; 8 where the native rates are unknown."""
    from data_pipeline.synthetic import FPS  # noqa: PLC0415

    rate = cfg.data.fps or (FPS if cfg.data.synthetic else 0.0)
    return rate / cfg.data.frame_stride if rate else 8.0


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 8.0, lossless: bool = False) -> None:
    """Encode uint8 [T,H,W,3] frames (H and W even) to ``path`` (whole or not at all: an interrupted ``hpdm sample``
    leaves no truncated video): 4:2:0 H.264 that every player shows, or ``lossless``, the exact frames (H.264 in
    RGB at qp 0)."""
    data = encode(frames, fps, codec="libx264rgb", crf=0, pix_fmt="rgb24") if lossless else encode(frames, fps, crf=18)
    write_atomic(path, data)
