"""Writing sampled videos as mp4 (H.264, through the data pipeline's encoder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_pipeline.storage import write_atomic
from data_pipeline.video import encode


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3,T,H,W] in [-1, 1] -> uint8 [T,H,W,3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> None:
    """Encode uint8 [T,H,W,3] frames (H and W even) to ``path`` (whole or not at all: an interrupted ``hpdm sample``
    leaves no truncated video)."""
    write_atomic(path, encode(frames, fps, crf=18))
