"""FVD and IS with the StyleGAN-V protocol (Skorokhodov et al. 2022), as the paper's numbers use.

- Videos: 16 frames (the first 16 of each generated and each real clip), uint8, at the evaluation resolution;
  2,048 (FVD_2048) or 10,000 generated videos.
- Features: the user's TorchScript I3D (StyleGAN-V's ``i3d_torchscript.pt``), called as StyleGAN-V does:
  ``detector(videos uint8 [B,3,T,H,W], rescale=True, resize=True, return_features=True)`` -> [B,400]; the
  detector rescales to [-1, 1] and resizes to 224 itself. ``layout="bthwc"`` calls a custom detector as
  ``detector(videos uint8 [B,T,H,W,3])`` instead.
- Statistics: mean and biased covariance (as StyleGAN-V's FeatureStats) in float64; Fréchet distance in float64
  through a symmetric eigen-decomposition, clamped at 0. Real statistics are cached (a .npz keyed by source,
  clip shape, count, the detector's SHA-256 and a fingerprint of the real files); an unreadable cache is rebuilt.
- IS: a C3D TorchScript (StyleGAN-V's ``c3d_ucf101.pt``), ``detector(videos uint8 [B,3,T,H,W])`` -> class
  probabilities (a softmax is applied when the rows are not distributions), exp(E KL(p(y|x) || p(y))) over splits.
- Several processes: rank r extracts the features of items i % world == r; rank 0 gathers them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from hpdm.errors import UsageError

log = logging.getLogger(__name__)
FRAMES = 16
# What StyleGAN-V's files are, for the hint of a detector that does not take their calling convention
EXPECTED = {"i3d": "StyleGAN-V's i3d_torchscript.pt", "c3d": "StyleGAN-V's c3d_ucf101.pt"}


def _reason(e: Exception) -> str:
    """The gist of an error: its first sentence, or the last line of a TorchScript interpreter's traceback."""
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]).split(". ")[0][:300]


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
        self.path, self.device, self.kind, self.layout = path, device, kind, layout

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> np.ndarray:
        """Float64 outputs [B, features] of uint8 clips [B,T,H,W,3]; one-line errors for a wrong call or output."""
        x, kw = videos.to(self.device), {}
        if self.layout != "bthwc":
            x = x.permute(0, 4, 1, 2, 3).contiguous()
            kw = dict(rescale=True, resize=True, return_features=True) if self.kind == "i3d" else {}
        what = f"--{self.kind}: {self.path}"
        try:
            out = self.net(x, **kw)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 (any failure of the user's network is reported as one line)
            given = "[B,T,H,W,3] (--layout bthwc)" if self.layout == "bthwc" else "[B,3,T,H,W] (--layout stylegan-v)"
            raise UsageError(f"{what} failed on uint8 clips {given} of shape {list(x.shape)}: {_reason(e)}; is it "
                             f"{EXPECTED[self.kind]}? (a custom detector taking [B,T,H,W,3] needs --layout bthwc)"
                             ) from None
        if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.is_floating_point() and len(out) == len(x)):
            got = (f"a {out.dtype} tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor)
                   else f"a {type(out).__name__}")
            raise UsageError(f"{what} returned {got}, not a 2-D float tensor of {len(x)} rows (one per video); is it "
                             f"{EXPECTED[self.kind]}?")
        out = out.double().cpu().numpy()
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).any(1).sum())
            raise UsageError(f"{what} returned NaN or infinite outputs for {bad} of {len(out)} videos")
        return out


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
    # clamped: identical statistics give -1e-8 or so from rounding
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; (mean, std) over splits, each of 2 videos or more."""
    p = np.asarray(probs, dtype=np.float64)
    if len(p) < 2 * splits:
        raise ValueError(f"inception_score: {len(p)} videos, {2 * splits} needed for {splits} splits")
    if (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-3):
        p = np.exp(p - p.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
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


def _stat(path: str) -> tuple[int, int] | None:
    st = os.stat(path) if os.path.isfile(path) else None
    return (st.st_size, st.st_mtime_ns) if st else None


def fingerprint(real: str | None, real_shards: str | None, n: int) -> list:
    """What identifies the real videos for the cache: the first ``n`` mp4s' names, sizes and mtimes, or the shards'
    URLs, indexed sample counts and (local ones) sizes and mtimes; an S3 shard counts by URL and count only."""
    if real is not None:
        return [(f.name, _stat(str(f))) for f in sorted(Path(real).glob("*.mp4"))[:n]]
    from data_pipeline.shardlist import resolve_shards  # noqa: PLC0415
    from data_pipeline.storage import Storage, is_s3  # noqa: PLC0415

    urls, counts = resolve_shards(Storage(), real_shards)
    return [(u, c, None if is_s3(u) else _stat(u)) for u, c in zip(urls, counts)]


def load_stats(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (mu, sigma), or None when missing; an unreadable or invalid file is ignored (it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not np.isfinite(np.append(mu, sigma)).all():
            raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} are not finite statistics")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring the unreadable real statistics cache %s (%s); recomputing it", path, _reason(e))
        return None
    return mu, sigma


def save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
    """Writes the .npz through a temporary file of its own, so concurrent savers of one key do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=json.dumps(meta, default=str))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)  # as a plain write would leave it (mkstemp's file is private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
