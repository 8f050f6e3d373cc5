"""FVD and IS with the StyleGAN-V protocol (Skorokhodov et al. 2022), as the paper's numbers use.

- Videos: 16 frames (the first 16 of each generated and each real clip), uint8, at the evaluation resolution;
  2,048 (FVD_2048) or 10,000 generated videos.
- Features: the user's TorchScript I3D (StyleGAN-V's ``i3d_torchscript.pt``), called as StyleGAN-V does:
  ``detector(videos uint8 [B,3,T,H,W], rescale=True, resize=True, return_features=True)`` -> [B,400]; the
  detector rescales to [-1, 1] and resizes to 224 itself. ``layout="bthwc"`` calls a custom detector as
  ``detector(videos uint8 [B,T,H,W,3])`` instead.
- Statistics: mean and biased covariance (as StyleGAN-V's FeatureStats) in float64; Fréchet distance in float64
  through a symmetric eigen-decomposition. Real statistics are cached (a .npz keyed by source, clip shape,
  count and the detector's SHA-256).
- IS: a C3D TorchScript (StyleGAN-V's ``c3d_ucf101.pt``), ``detector(videos uint8 [B,3,T,H,W])`` -> class
  probabilities (a softmax is applied when the rows are not distributions), exp(E KL(p(y|x) || p(y))) over splits.
- Several processes: rank r extracts the features of items i % world == r; rank 0 gathers them.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from hpdm.errors import UsageError

FRAMES = 16


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Detector:
    """A TorchScript feature (I3D) or probability (C3D) network on uint8 clips [B,T,H,W,3]."""

    def __init__(self, path: str | Path, device, kind: str = "i3d", layout: str = "stylegan-v", expect_sha256: str = ""):
        if layout not in ("stylegan-v", "bthwc"):
            raise UsageError(f"--layout: must be stylegan-v or bthwc; got {layout!r}")
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"--{kind}: detector file not found: {path} (see docs/sampling.md for where to get it)")
        self.sha256 = sha256(path)
        if expect_sha256 and self.sha256 != expect_sha256.lower():
            raise UsageError(f"--{kind}-sha256: {path} has SHA-256 {self.sha256}, not the expected {expect_sha256}")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise UsageError(f"--{kind}: {path} is not a TorchScript model ({str(e).split('. ')[0]})") from None
        self.device, self.kind, self.layout = device, kind, layout

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> np.ndarray:
        x = videos.to(self.device)
        if self.layout == "bthwc":
            out = self.net(x)
        elif self.kind == "i3d":
            out = self.net(x.permute(0, 4, 1, 2, 3).contiguous(), rescale=True, resize=True, return_features=True)
        else:
            out = self.net(x.permute(0, 4, 1, 2, 3).contiguous())
        return out.double().cpu().numpy()


# ---- statistics ------------------------------------------------------------------------------------------------
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased, as StyleGAN-V) covariance in float64."""
    f = np.asarray(features, dtype=np.float64)
    mu = f.mean(axis=0)
    return mu, f.T @ f / len(f) - np.outer(mu, mu)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 = sum sqrt eig(S1^1/2 S2 S1^1/2) (float64)."""
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; (mean, std) over splits."""
    p = np.asarray(probs, dtype=np.float64)
    if (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-3):
        p = np.exp(p - p.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, max(1, min(splits, len(p)))):
        kl = part * (np.log(part + 1e-12) - np.log(part.mean(0, keepdims=True) + 1e-12))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---- clips -----------------------------------------------------------------------------------------------------
def read_clip(path: str | Path, frames: int, size: tuple[int, int] | None) -> np.ndarray:
    """The first ``frames`` frames of an mp4, short side resized and centre-cropped to ``size`` (None: native)."""
    from data_pipeline.decode import ClipSpec, decode_clip  # noqa: PLC0415
    from data_pipeline.video import probe  # noqa: PLC0415

    data = Path(path).read_bytes()
    meta = probe(data)
    if size is None:
        size = (int(meta["height"]), int(meta["width"]))
    return decode_clip(data, meta, ClipSpec(frames=frames, size=tuple(size), train=False), None)


def mp4_clips(folder: str | Path, n: int, frames: int, size, rank: int, world: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, clip) of this rank's share of the first ``n`` mp4s (sorted by name) in ``folder``."""
    files = sorted(Path(folder).glob("*.mp4"))[:n]
    if len(files) < n:
        raise UsageError(f"{folder}: {len(files)} mp4 files, {n} needed")
    from data_pipeline.video import VideoError  # noqa: PLC0415

    for i in range(rank, n, world):
        try:
            clip = read_clip(files[i], frames, size)
        except VideoError as e:  # FVD over fewer or other videos than asked for would not be comparable
            raise UsageError(f"{files[i]}: {e} (--frames {frames}); every video must decode to --frames "
                             "frames") from None
        yield i, clip


def shard_clips(data_cfg, n: int, frames: int, size, rank: int, world: int, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """Clips from the project's WebDataset shards (each rank reads its own part); indices are rank-local."""
    from data_pipeline import build_loader  # noqa: PLC0415

    per_rank = len(range(rank, n, world))
    loader = build_loader(data_cfg, frames=frames, size=tuple(size), batch_size=batch, rank=rank, world_size=world,
                          seed=0, train=False)
    got = 0
    for b in loader:
        for clip in b["video"].numpy():
            if got == per_rank:
                return
            yield rank + got * world, clip
            got += 1
    if got < per_rank:
        raise UsageError(f"--num-real: {data_cfg.shards}: rank {rank} got {got} real clips, {per_rank} needed (fewer "
                         f"than {n} in all)")


def extract(clips: Iterator[tuple[int, np.ndarray]], detectors: list[Detector], batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(indices, outputs) per detector, over this rank's clips."""
    idx, buf, outs = [], [], [[] for _ in detectors]

    def flush():
        x = torch.from_numpy(np.stack(buf))
        for o, d in zip(outs, detectors):
            o.append(d(x))
        buf.clear()

    for i, clip in clips:
        idx.append(i)
        buf.append(clip)
        if len(buf) == batch:
            flush()
    if buf:
        flush()
    return [(np.asarray(idx, dtype=np.int64), np.concatenate(o) if o else np.zeros((0, 0))) for o in outs]


def gather(idx: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """All ranks' rows in index order on rank 0 (None elsewhere); the identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values[np.argsort(idx, kind="stable")]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (idx, values))
    if dist.get_rank() != 0:
        return None
    i = np.concatenate([p[0] for p in parts])
    return np.concatenate([p[1] for p in parts])[np.argsort(i, kind="stable")]


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_stats(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["mu"], z["sigma"]


def save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=json.dumps(meta, default=str))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
