"""``hpdm sample``: generator file -> full-resolution mp4s, a PNG grid of frames and the per-level cost.

Video ``i`` is drawn from seed ``seed * 1000003 + i`` and its own condition, so it is the same whatever the
batch size or the number of processes; with several processes, rank r takes the videos i with i % world == r.
With prompts, video ``i`` gets prompt ``i % len(prompts)`` and is named after it (hpdm/prompts.py).
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.local_files import write_atomic
from hpdm.config import SEED_LIMIT
from hpdm.diffusion import Condition
from hpdm.distributed import on_rank0
from hpdm.errors import UsageError
from hpdm.prompts import CAPTION_HEIGHT, caption_strip, encode_prompts, video_name
from hpdm.sampling import SampleOptions, TiledSampler, check_finite, cost_table, sampling_record
from hpdm.video_io import clip_fps, to_uint8, write_mp4

MAX_VIDEOS = 10_000_000  # -n: a condition, a seed and a name are made per video up front
GRID_VIDEOS = 64  # rows of grid.png: a process's first videos
# what sample writes
OUTPUTS = ("*.mp4", "grid.png", "grid_rank*.png", "cost.json", "cost_rank*.json", "prompts.json", "sample.json")


def at_least(option: str, value: float, low: float = 1, high: float | None = None) -> None:
    """A UsageError naming ``option`` unless ``value >= low`` (and, given ``high``, ``value <= high``)."""
    if value < low:
        raise UsageError(f"{option}: must be >= {low}; got {value}")
    if high is not None and value > high:
        raise UsageError(f"{option}: must be <= {high:,}; got {value:,}")


def check_seed(seed: int) -> None:
    """``--seed`` fits SEED_LIMIT: video seeds are ``seed * 1000003 + i`` and must stay within int64."""
    if not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed: must be in [0, {SEED_LIMIT}); got {seed}")


def rank_world() -> tuple[int, int]:
    """(rank, world) of torch.distributed; initialises it when a launcher set WORLD_SIZE > 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from hpdm.distributed import init_distributed  # noqa: PLC0415

        rank, world, _ = init_distributed()
        return rank, world
    return 0, 1


def check_out(out: Path) -> None:
    """``--out`` is a new folder, or one without any file that sample writes (OUTPUTS), outside any checkpoint:
    videos of an earlier run left beside new ones would mix in a metric, its grid or prompts.json be replaced."""
    from hpdm.export import check_output  # noqa: PLC0415

    check_output("--out", out, "videos")  # not samples/, where training writes its videos
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is a file; give a folder for the videos")
    old = sorted({p.name for pattern in OUTPUTS for p in out.glob(pattern)}) if out.is_dir() else []
    if set(old) <= {"sample.json", "prompts.json"} and "sampler" in (json_object(out / "sample.json") or {}):
        old = []  # written first, by a run that stopped before its first video
    if old:
        what = "videos" if all(name.endswith(".mp4") for name in old) else "the output of a sample"
        ours = any(re.fullmatch(r"(video_)?\d{5}.*\.mp4", n) for n in old)
        unfinished = ours and not any(n.startswith("cost") for n in old)  # sample writes its cost.json last
        raise UsageError(f"--out: {out} already holds {what} ({', '.join(old[:2])}{', ...' if old[2:] else ''})"
                         f"{' of an unfinished `hpdm sample` (it has no cost.json)' if unfinished else ''}, which new "
                         "ones would join or replace; give an empty or new folder"
                         f"{', or remove that one' if unfinished else ''}")


def json_object(path: Path, limit: int = 1 << 26) -> dict | None:
    """The JSON object in ``path`` (one of our records or results), or None: missing, unreadable, over ``limit``
    bytes, or not an object."""
    try:
        data = json.loads(path.read_bytes()) if path.stat().st_size < limit else None
    except (OSError, ValueError):
        data = None
    return data if isinstance(data, dict) else None


def share(n: int, rank: int, world: int) -> list[int]:
    """The items this rank handles: i % world == rank."""
    return list(range(rank, n, world))


def default_device() -> torch.device:
    """This rank's GPU, with TF32 matmuls as in training (sampling runs the network in fp32), or the CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def video_seed(seed: int, i: int) -> int:
    return seed * 1_000_003 + i


def conditions(cond_kind: str, num_classes: int, n: int, seed: int, label: int | None = None,
               text_emb: str | None = None, prompts: list[str] | None = None, encoder: str | None = None,
               text_dim: int | None = None, text_tokens: int = 128, device: torch.device | None = None,
               trained_with: dict | None = None) -> Condition:
    """The condition of every video: a class (``label``, or uniform random from ``seed`` as in the FVD protocol),
    text (``prompts`` encoded by ``encoder``, or ``text_emb``: safetensors with "text" [S,D] or [N,S,D] and
    optional boolean "mask"; with prompts it holds theirs), or none. Text holds one row per prompt (or 1, or ``n``):
    video i takes row i % rows (``video_rows``), so thousands of videos of a few prompts share their embeddings.
    ``trained_with``: the generator's recorded text encoder, which ``encoder`` must be."""
    if label is not None and cond_kind != "class":
        raise UsageError(f"--label: the model is conditioned on {cond_kind!r}, not on a class")
    if cond_kind != "text" and (prompts or encoder or text_emb):
        option = "--prompt/--prompt-file" if prompts else "--encoder" if encoder else "--text-emb"
        raise UsageError(f"{option}: the model is conditioned on {cond_kind!r}, not on text")
    if cond_kind == "class":
        if label is None:
            labels = torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))
        elif not 0 <= label < num_classes:
            raise UsageError(f"--label: {label} is outside the model's classes 0..{num_classes - 1}")
        else:
            labels = torch.full((n,), label)
        return Condition(labels=labels)
    if cond_kind == "text":
        if encoder and text_emb:
            raise UsageError("--encoder: give --encoder (to encode the prompts) or --text-emb (precomputed), not both")
        if encoder and not prompts:
            raise UsageError("--encoder: give the prompts to encode with --prompt TEXT or --prompt-file FILE")
        if prompts and not text_emb and not encoder:
            raise UsageError("--encoder: --prompt needs the text encoder the model was trained with (a Hugging Face "
                             "folder or cached model name, e.g. google/t5-v1_1-xxl), or precomputed --text-emb FILE")
        if not prompts and not text_emb:
            raise UsageError("--prompt: the model is text-conditioned: give --prompt TEXT (or --prompt-file FILE) with "
                             "--encoder MODEL, or precomputed embeddings with --text-emb FILE")
        if encoder:
            text, mask = encode_prompts(prompts, encoder, text_tokens, text_dim or 0, device or torch.device("cpu"),
                                        trained_with)
        else:
            text, mask = load_text_emb(text_emb, text_dim, text_tokens)
        count = len(prompts) if prompts else n
        if text.shape[0] not in (1, count):
            raise UsageError(f"--text-emb: {text_emb} holds {text.shape[0]} embeddings for {count} "
                             f"{'prompts' if prompts else 'videos'} (give 1 or {count})")
        return Condition(text=text, text_mask=mask)
    return Condition()


def video_rows(cond: Condition, ids: list[int]) -> list[int]:
    """The rows of ``cond`` that videos ``ids`` take: text has one row per prompt (i % rows), classes one per video."""
    return [i % len(cond.text) for i in ids] if cond.text is not None else ids


def load_text_emb(text_emb: str, text_dim: int | None = None, text_tokens: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed embeddings (``--text-emb``): fp32 [N,S,D] and bool mask [N,S], with 1 <= S <= ``text_tokens``
    (the model's, as training cut its captions) and at least one token per embedding in the mask (all False is the
    unconditional branch)."""
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
    if text.dim() not in (2, 3):
        raise UsageError(f"--text-emb: {text_emb}: 'text' is {list(text.shape)}; it must be [tokens, dim] or "
                         "[n, tokens, dim]")
    if not torch.isfinite(text).all():  # NaN through the network: black videos, exit 0
        raise UsageError(f"--text-emb: {text_emb}: 'text' holds NaN or infinite values")
    text = text[None] if text.dim() == 2 else text
    if text.shape[1] == 0:
        raise UsageError(f"--text-emb: {text_emb}: 'text' {list(text.shape)} holds no tokens")
    if text_tokens is not None and text.shape[1] > text_tokens:
        raise UsageError(f"--text-emb: {text_emb} holds {text.shape[1]} tokens per embedding but the generator's "
                         f"model.text_tokens is {text_tokens}; give at most {text_tokens}")
    mask = t.get("mask", torch.ones(text.shape[:2], dtype=torch.bool)).bool()
    mask = mask[None] if mask.dim() == 1 else mask
    if mask.shape[1:] != text.shape[1:2] or mask.shape[0] not in (1, text.shape[0]):
        raise UsageError(f"--text-emb: {text_emb}: 'mask' {list(mask.shape)} does not fit 'text' {list(text.shape)}")
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise UsageError(f"--text-emb: {text_emb}: 'mask' row {empty[0]} is all False, which would sample "
                         "unconditionally; mark its tokens True")
    if text_dim is not None and text.shape[-1] != text_dim:
        raise UsageError(f"--text-emb: {text_emb} holds {text.shape[-1]}-wide embeddings but the generator's "
                         f"model.text_dim is {text_dim}")
    return text, mask.expand(text.shape[0], -1)


def write_png(path: str | Path, img: np.ndarray) -> None:
    """uint8 [H,W,3] as a PNG (Pillow comes with matplotlib), whole or not at all (write_atomic)."""
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def grid_frames(video: np.ndarray, columns: int = 8) -> np.ndarray:
    """The ``columns`` evenly spaced frames of ``video`` [T,H,W,3] that its row of a grid shows."""
    return video[np.linspace(0, len(video) - 1, min(columns, len(video))).round().astype(int)]


def frame_grid(videos: list[np.ndarray], columns: int = 8, captions: list[str] | None = None) -> np.ndarray:
    """One row per video, ``columns`` evenly spaced frames per row; uint8 [rows*H, columns*W, 3]. With
    ``captions``, each row has its caption in a strip of CAPTION_HEIGHT pixels above it."""
    rows = [np.concatenate(list(grid_frames(v, columns)), axis=1) for v in videos]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    if captions is not None:
        rows = [np.concatenate([caption_strip(c, width, CAPTION_HEIGHT), r])
                for c, r in zip(captions, rows, strict=True)]
    return np.concatenate(rows, axis=0)


def generate(generator: str, out: str | Path, num: int | None = None, label: int | None = None,
             text_emb: str | None = None, prompts: list[str] | None = None, encoder: str | None = None, seed: int = 0,
             opts: SampleOptions = SampleOptions(), batch: int = 1, fps: float | None = None, raw: bool = False,
             lossless: bool = False, progress: bool = True, hook=None) -> dict:
    """Sample this rank's share of ``num`` videos (default and least: one per prompt; else 4) into ``out``, with
    ``sample.json`` saying what they were drawn with (and each video's class); returns {"files", "grid", "cost",
    "resolution", "prompts" (file name -> prompt), "rank", "world"}. ``lossless``: mp4s holding the exact frames
    (H.264 RGB at qp 0: larger, and not every player shows them), so that measures of the files agree with those of
    the samples (4:2:0 H.264 blurs small coloured shapes)."""
    from hpdm.export import generator_text_encoder, load_generator  # noqa: PLC0415

    num = (len(prompts) if prompts else 4) if num is None else num
    at_least("-n", num, high=MAX_VIDEOS)
    if prompts and num < len(prompts):
        raise UsageError(f"-n: {num} is fewer than the {len(prompts)} prompts, so some would get no video; give "
                         f"-n >= {len(prompts)}, or leave it out for one video per prompt")
    at_least("--batch", batch)
    if fps is not None and not 0.01 <= fps <= 1000:  # mp4 stores the rate as a fraction with a denominator up to 1001
        raise UsageError(f"--fps: must be in [0.01, 1000]; got {fps}")
    check_seed(seed)
    out = Path(out)
    rank, world = rank_world()
    on_rank0(lambda: check_out(out))  # rank 0 checks while the others wait: no rank has written a video yet
    device = default_device()
    cfg, net = load_generator(generator, raw=raw, device=device)
    fps = clip_fps(cfg) if fps is None else fps
    m = cfg.model
    sampler = TiledSampler(net, cfg, opts, device=device, hook=hook)  # checks the options before the encoder loads
    cond = conditions(m.cond, m.num_classes, num, seed, label, text_emb, prompts, encoder, m.text_dim, m.text_tokens,
                      device, generator_text_encoder(generator) if encoder else None)
    prompt_of = [prompts[i % len(prompts)] if prompts else None for i in range(num)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out}: {e.strerror or e}") from None
    mine = share(num, rank, world)
    if rank == 0:
        labels = cond.labels.tolist() if cond.labels is not None else None
        record = sampling_record(net, cfg, opts, seed, num, label=label, labels=labels, encoder=encoder,
                                 text_emb=text_emb and str(Path(text_emb).resolve()), fps=fps, lossless=lossless)
        write_atomic(out / "sample.json", json.dumps(record, indent=1 if num <= GRID_VIDEOS else None))
    if prompts and rank == 0:
        write_atomic(out / "prompts.json", json.dumps({video_name(i, p): p for i, p in enumerate(prompt_of)}, indent=1,
                                                      ensure_ascii=False))
    files, frames, stats = [], [], None
    for start in range(0, len(mine), batch):
        ids = mine[start:start + batch]
        c = cond.rows(video_rows(cond, ids), device)
        levels, st = sampler.sample(c, [video_seed(seed, i) for i in ids], progress=progress and rank == 0)
        check_finite(levels, sampler.guidance)
        stats = st if stats is None else [a.add(b) for a, b in zip(stats, st)]
        for i, x in zip(ids, levels[-1]):
            video = to_uint8(x)
            path = out / video_name(i, prompt_of[i])
            write_mp4(path, video, fps=fps, lossless=lossless)
            files.append(str(path))
            if len(frames) < GRID_VIDEOS:  # a row of 8 frames each: thousands of whole videos would not fit in memory
                frames.append(grid_frames(video))
    grid = out / ("grid.png" if world == 1 else f"grid_rank{rank}.png")
    if frames:
        write_png(grid, frame_grid(frames, captions=[prompt_of[i] for i in mine[:len(frames)]] if prompts else None))
    cost = [s.row() for s in stats] if stats else []
    write_atomic(out / ("cost.json" if world == 1 else f"cost_rank{rank}.json"), json.dumps(
        {"device": str(device), "overlap": opts.overlap, "levels": cost}, indent=1))
    if stats and rank == 0:
        print(cost_table(stats))
    return {"files": files, "grid": str(grid) if frames else None, "cost": cost, "resolution": cfg.model.resolution,
            "prompts": {Path(f).name: prompt_of[i] for i, f in zip(mine, files)} if prompts else {},
            "rank": rank, "world": world}
