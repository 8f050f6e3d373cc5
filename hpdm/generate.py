"""``hpdm sample``: generator file -> full-resolution mp4s, a PNG grid of frames and the per-level cost.

Video ``i`` is drawn from seed ``seed * 1000003 + i`` and its own condition, so it is the same whatever the
batch size or the number of processes; with several processes, rank r takes the videos i with i % world == r.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hpdm.diffusion import Condition
from hpdm.errors import UsageError
from hpdm.sampling import SampleOptions, TiledSampler, cost_table
from hpdm.video_io import to_uint8, write_mp4


def at_least(option: str, value: float, low: float = 1) -> None:
    """A UsageError naming ``option`` unless ``value >= low``."""
    if value < low:
        raise UsageError(f"{option}: must be >= {low}; got {value}")


def rank_world() -> tuple[int, int]:
    """(rank, world) of torch.distributed; initialises it when a launcher set WORLD_SIZE > 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from hpdm.distributed import init_distributed  # noqa: PLC0415

        rank, world, _ = init_distributed()
        return rank, world
    return 0, 1


def share(n: int, rank: int, world: int) -> list[int]:
    """The items this rank handles: i % world == rank."""
    return list(range(rank, n, world))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def video_seed(seed: int, i: int) -> int:
    return seed * 1_000_003 + i


def conditions(cond_kind: str, num_classes: int, n: int, seed: int, label: int | None = None,
               text_emb: str | None = None) -> Condition:
    """The condition of every video: a class (``label``, or uniform random from ``seed`` as in the FVD protocol),
    a text embedding file (safetensors with "text" [S,D] or [N,S,D] and optional boolean "mask"), or none."""
    if label is not None and cond_kind != "class":
        raise UsageError(f"--label: the model is conditioned on {cond_kind!r}, not on a class")
    if cond_kind == "class":
        if label is None:
            labels = torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))
        elif not 0 <= label < num_classes:
            raise UsageError(f"--label: {label} is outside the model's classes 0..{num_classes - 1}")
        else:
            labels = torch.full((n,), label)
        return Condition(labels=labels)
    if cond_kind == "text":
        if not text_emb:
            raise UsageError("--text-emb: the model is text-conditioned and needs a file of precomputed T5 embeddings "
                             "(hpdm bundles no text encoder)")
        if not Path(text_emb).is_file():
            raise UsageError(f"--text-emb: no such file: {text_emb}")
        from safetensors import SafetensorError  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            t = load_file(text_emb)
        except SafetensorError as e:
            raise UsageError(f"--text-emb: {text_emb} is not a safetensors file ({e})") from None
        if "text" not in t:
            raise UsageError(f"--text-emb: {text_emb} has no tensor named 'text' ([S,D] or [N,S,D])")
        text = t["text"].float()
        text = text[None] if text.dim() == 2 else text
        mask = t.get("mask", torch.ones(text.shape[:2], dtype=torch.bool)).bool()
        mask = mask[None] if mask.dim() == 1 else mask
        if text.shape[0] not in (1, n):
            raise UsageError(f"--text-emb: {text_emb} holds {text.shape[0]} embeddings for {n} videos (give 1 or {n})")
        return Condition(text=text.expand(n, -1, -1), text_mask=mask.expand(n, -1))
    return Condition()


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Minimal RGB PNG writer (no imaging library needed): uint8 [H,W,3]."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))  # noqa: E731
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def frame_grid(videos: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """One row per video, ``columns`` evenly spaced frames per row; uint8 [rows*H, columns*W, 3]."""
    rows = []
    for v in videos:
        idx = np.linspace(0, len(v) - 1, min(columns, len(v))).round().astype(int)
        rows.append(np.concatenate(list(v[idx]), axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)


def generate(generator: str, out: str | Path, num: int = 4, label: int | None = None, text_emb: str | None = None,
             seed: int = 0, opts: SampleOptions = SampleOptions(), batch: int = 1, fps: float = 8.0, raw: bool = False,
             progress: bool = True, hook=None) -> dict:
    """Sample this rank's share of ``num`` videos into ``out``; returns {"files", "grid", "cost", "resolution"}."""
    from hpdm.export import load_generator  # noqa: PLC0415

    at_least("-n", num)
    at_least("--batch", batch)
    if fps <= 0:
        raise UsageError(f"--fps: must be > 0; got {fps}")
    rank, world = rank_world()
    device = default_device()
    cfg, net = load_generator(generator, raw=raw, device=device)
    cond = conditions(cfg.model.cond, cfg.model.num_classes, num, seed, label, text_emb)
    sampler = TiledSampler(net, cfg, opts, device=device, hook=hook)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = share(num, rank, world)
    files, frames, stats = [], [], None
    for start in range(0, len(mine), batch):
        ids = mine[start:start + batch]
        c = cond.rows(ids, device)
        levels, st = sampler.sample(c, [video_seed(seed, i) for i in ids], progress=progress and rank == 0)
        stats = st if stats is None else [a.add(b) for a, b in zip(stats, st)]
        for i, x in zip(ids, levels[-1]):
            video = to_uint8(x)
            path = out / f"video_{i:05d}.mp4"
            write_mp4(path, video, fps=fps)
            files.append(str(path))
            frames.append(video)
    grid = out / ("grid.png" if world == 1 else f"grid_rank{rank}.png")
    if frames:
        write_png(grid, frame_grid(frames))
    cost = [s.row() for s in stats] if stats else []
    (out / ("cost.json" if world == 1 else f"cost_rank{rank}.json")).write_text(json.dumps(
        {"device": str(device), "overlap": opts.overlap, "levels": cost}, indent=1))
    if stats and rank == 0:
        print(cost_table(stats))
    return {"files": files, "grid": str(grid) if frames else None, "cost": cost, "resolution": cfg.model.resolution,
            "rank": rank, "world": world}
