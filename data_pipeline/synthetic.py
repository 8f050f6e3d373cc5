"""The embedded default dataset: coloured shapes moving over a background, with class labels and captions.

A clip's class fixes its motion direction, shape and colour (in that order of variation, so even a few
classes differ in motion and shape); its caption says the same, e.g. "a red square moving left". Clips are
encoded to mp4 with PyAV and written through :func:`make_shards`, exactly like real videos.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from .config import DataConfig
from .pool import worker_pool
from .shards_write import TEXT_DIR, existing_work, make_shards
from .shardlist import check_readable, is_pattern, load_index, resolve_shards
from .storage import Storage, StorageError, is_s3, summary
from .stream import DataError
from .video import encode

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "white": (240, 240, 240), "cyan": (40, 210, 220), "magenta": (210, 50, 200), "orange": (245, 140, 30),
           "purple": (120, 50, 170)}
FPS = 24.0


def class_name(label: int) -> str:
    d = list(DIRECTIONS)[label % 4]
    shape = SHAPES[(label // 4) % len(SHAPES)]
    colour = list(COLOURS)[(label // (4 * len(SHAPES))) % len(COLOURS)]
    return f"{colour} {shape} moving {d}"


def shape_mask(shape: str, ox: np.ndarray, oy: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a ``shape`` of half-size ``r`` at offsets (ox, oy) from its centre (triangles point up)."""
    if shape == "square":
        return (np.abs(ox) <= r) & (np.abs(oy) <= r)
    if shape == "circle":
        return ox**2 + oy**2 <= r * r
    return (oy <= r) & (oy >= -r) & (np.abs(ox) <= (oy + r) / 2)


def render(label: int, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [frames, height, width, 3] of clip ``seed`` in class ``label``."""
    rng = np.random.default_rng(seed)
    colour, shape, _, direction = class_name(label).split(" ")
    bg = rng.integers(0, 90, size=3)
    ramp = np.linspace(0, 1, height)[:, None, None] * rng.integers(0, 60, size=3)
    base = np.broadcast_to(bg + ramp, (height, width, 3)).astype(np.uint8)
    r = max(3, int(min(height, width) * rng.uniform(0.1, 0.18)))
    dx, dy = DIRECTIONS[direction]
    speed = rng.uniform(0.4, 0.8) * min(height, width) / frames
    cx0, cy0 = rng.uniform(0, width), rng.uniform(0, height)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        cx, cy = (cx0 + dx * speed * t) % width, (cy0 + dy * speed * t) % height
        ox = (xx - cx + width / 2) % width - width / 2  # wrap around the edges
        oy = (yy - cy + height / 2) % height - height / 2
        out[t] = base
        out[t][shape_mask(shape, ox, oy, r)] = COLOURS[colour]
    return out


def write_clip(args) -> dict:
    i, label, frames, h, w, folder = args
    name = f"clip{i:06d}.mp4"
    with open(os.path.join(folder, name), "wb") as f:
        # Full colour resolution: with 4:2:0 a small red circle and a red square decode alike (issue 10).
        f.write(encode(render(label, frames, h, w, seed=i), FPS, pix_fmt="yuv444p"))
    return {"path": name, "label": label, "caption": f"a {class_name(label)}"}


def write_synthetic(dest: str, videos: int, resolution: tuple[int, int, int], num_classes: int, *, frames: int,
                    storage: Storage | None = None, workers: int = 1, progress: bool = False) -> dict:
    """Render ``videos`` clips of ``frames`` x resolution[1:] into a manifest and shard them to ``dest``."""
    _, h, w = resolution
    storage = storage or Storage()
    folder = storage.local_tmpdir(dest)  # under a local dest: a killed run's clips go with the next write there
    try:
        jobs = [(i, i % num_classes, frames, h, w, folder) for i in range(videos)]
        if workers > 1:
            with worker_pool(workers) as pool:
                rows = list(pool.map(write_clip, jobs, chunksize=8))
        else:
            rows = [write_clip(j) for j in jobs]
        manifest = os.path.join(folder, "manifest.jsonl")
        with open(manifest, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        total = sum(os.path.getsize(os.path.join(folder, r["path"])) for r in rows)
        shard_mb = max(total / 16, 1.0) / (1 << 20)  # about 16 shards, so many workers can split them
        return make_shards(manifest, dest, shard_size_mb=shard_mb, workers=workers, storage=storage,
                           progress=progress, class_names=[class_name(c) for c in range(num_classes)],
                           origin=synthetic_origin(videos, resolution, num_classes, frames))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def synthetic_origin(videos: int, resolution: tuple[int, int, int], num_classes: int, frames: int) -> str:
    """How the synthetic set was made, recorded in its sidecars: what may resume an interrupted write."""
    return f"synthetic videos={videos} size={resolution[1]}x{resolution[2]} frames={frames} classes={num_classes}"


def synthetic_frames(cfg: DataConfig, clip_frames: int) -> int:
    """Frames per synthetic clip: 1.5x what one clip spans after fps resampling and stride."""
    step = cfg.frame_stride * (FPS / cfg.fps if cfg.fps > 0 else 1.0)
    return math.ceil(1.5 * ((clip_frames - 1) * step + 1))


def prepare_dataset(cfg: DataConfig, resolution: tuple[int, int, int], num_classes: int, labelled: bool = False) -> dict:
    """Make sure ``cfg.shards`` holds a dataset whose labels fit ``num_classes`` (and that has labels at all where
    ``labelled``: a class-conditional model) and return its index. With
    ``cfg.synthetic`` and nothing at that location yet, writes the synthetic dataset there first (or finishes
    an interrupted write of the same set); a location holding anything else is never written to.
    Call on rank 0 only, with the other ranks at a barrier."""
    storage = Storage(cfg.endpoint_url, retries=cfg.io_retries, backoff=cfg.io_backoff, timeout=cfg.io_timeout)
    index = load_index(storage, cfg.shards)
    if index is None and cfg.synthetic:
        frames = synthetic_frames(cfg, resolution[0])
        check_empty(storage, cfg.shards, synthetic_origin(cfg.synthetic_videos, resolution, num_classes, frames))
        workers = min(8, os.cpu_count() or 1)  # one-off work on rank 0 while the others wait: use the machine
        index = write_synthetic(cfg.shards, cfg.synthetic_videos, tuple(resolution), num_classes, frames=frames,
                                storage=storage, workers=workers)
    elif index is None:
        urls, counts = resolve_shards(storage, cfg.shards)
        if is_pattern(cfg.shards) and not storage.exists(urls[0]):
            if is_s3(urls[0]):
                storage.check_bucket(urls[0])  # say so when the bucket itself is missing
            raise StorageError(f"data.shards {cfg.shards}: its first shard {urls[0]} does not exist")
        index = {"shards": [{"name": u.rsplit("/", 1)[-1], "samples": c} for u, c in zip(urls, counts)],
                 "num_samples": None, "class_names": []}
    check_labels(index, num_classes, cfg.shards, labelled)
    if not is_s3(cfg.shards):
        check_readable(resolve_shards(storage, cfg.shards)[0])
    images = load_index(storage, cfg.image_shards) if cfg.image_shards else None
    if images is not None:  # checked at the start too: it failed at the first batch holding such a label, hours in
        check_labels(images, num_classes, cfg.image_shards, key="data.image_shards")
    return index


def check_empty(storage: Storage, spec: str, origin: str) -> None:
    """Raise a DataError unless ``spec`` is an empty location (or holds only an interrupted write of ``origin``)."""
    todo = "point data.shards at an empty folder or prefix for the synthetic set, or set data.synthetic=false"
    if is_pattern(spec):
        raise DataError(f"data.shards {spec}: data.synthetic=true writes a dataset to a folder or prefix, not to "
                        f".tar files; {todo} to train on these shards")
    found = storage.contents(spec)
    if not found:
        return
    try:  # only leftovers of an interrupted write of this very set may be there (never embeddings: text/)
        ours = all(s.get("options", {}).get("origin") == origin for s in existing_work(storage, spec).values())
        ours = ours and not any(u.rstrip("/").rsplit("/", 1)[-1] == TEXT_DIR for u in found)
    except DataError:
        ours = False
    if not ours:
        raise DataError(f"data.shards {spec} holds {summary(found)}, but no index.json; data.synthetic=true "
                        f"writes only where nothing exists, so these files are left alone: {todo} to train on them")


def check_labels(index: dict, num_classes: int, spec: str, labelled: bool = False, key: str = "data.shards") -> None:
    """Raise a DataError naming ``key`` when the index shows labels or class names beyond ``num_classes``, or,
    where ``labelled``, no label at all."""
    top, names = index.get("max_label"), len(index.get("class_names") or [])
    if labelled and top == -1:
        raise DataError(f"{key} {spec}: no video has a label, but model.cond is class, which would train "
                        "every clip unconditionally; label the videos (a folder per class, or a manifest's label "
                        "column), or set model.cond=none")
    top = top if isinstance(top, int) else -1
    if max(top + 1, names) > num_classes:  # both bounds at once: the advice of the first alone met the second
        found = " and ".join(([f"labels go up to {top}"] if top >= num_classes else [])
                             + ([f"the index names {names} classes"] if names > num_classes else []))
        raise DataError(f"{key} {spec}: {found} but model.num_classes is {num_classes}; set model.num_classes to "
                        f"at least {max(top + 1, names)}")
