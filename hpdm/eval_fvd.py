"""``hpdm eval-fvd``: FVD (and IS) of generated videos against real ones, StyleGAN-V protocol (see hpdm/fvd.py).

Generated videos come from a folder of mp4s (e.g. ``hpdm sample`` output) or are sampled on the fly from a
generator (random classes, as the protocol does for class-conditional models). Real videos come from a folder
of mp4s and/or the project's shards; their statistics are cached.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch.distributed as dist

from data_pipeline.local_files import write_atomic
from hpdm import fvd
from hpdm.errors import UsageError
from hpdm.generate import at_least, conditions, default_device, json_object, rank_world, share, video_seed
from hpdm.sampling import SampleOptions, TiledSampler, sampling_record
from hpdm.video_io import to_uint8

log = logging.getLogger(__name__)
PROTOCOL_VIDEOS = 2048  # StyleGAN-V's FVD_2048 (and IS) use 2,048 videos of each set


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpdm" / "fvd"


def load_checked_generator(generator: str, frames: int, device):
    """(config, model) of a generator eval-fvd can sample: not text-conditioned, with at least ``frames`` frames."""
    from hpdm.export import load_generator  # noqa: PLC0415

    cfg, net = load_generator(generator, device=device)
    if cfg.model.cond == "text":
        raise UsageError(f"--generator: {generator} is text-conditioned and eval-fvd has no prompts: sample the videos "
                         f"first with `hpdm sample {generator} --prompt-file FILE --encoder ENC -n N --out DIR`, then "
                         "evaluate them with `hpdm eval-fvd --fake DIR ...`")
    if cfg.model.resolution[0] < frames:
        raise UsageError(f"--frames: {generator} makes {cfg.model.resolution[0]}-frame videos; {frames} asked for")
    return cfg, net


def generated_clips(cfg, net, n: int, frames: int, seed: int, opts: SampleOptions, batch: int, rank: int,
                    world: int, device) -> tuple[Iterator[tuple[int, np.ndarray]], tuple[int, int]]:
    cond = conditions(cfg.model.cond, cfg.model.num_classes, n, seed)
    sampler = TiledSampler(net, cfg, opts, device=device)

    def clips():
        mine = share(n, rank, world)
        for start in range(0, len(mine), batch):
            ids = mine[start:start + batch]
            c = cond.rows(ids, device)
            levels, _ = sampler.sample(c, [video_seed(seed, i) for i in ids])
            for i, x in zip(ids, levels[-1]):
                yield i, to_uint8(x[:, :frames])
    return clips(), tuple(cfg.model.resolution[1:])


def _sample_json(folder: Path) -> dict | None:
    """The record `hpdm sample` left beside the videos of ``folder`` (None for videos from elsewhere); a warning
    when they are 4:2:0 mp4s, whose scores differ from those of the same samples drawn by --generator."""
    record = json_object(folder / "sample.json")
    if record is not None and record.get("lossless") is False and int(os.environ.get("RANK", "0")) == 0:
        log.warning("--fake: %s holds 4:2:0 H.264 videos, whose FVD differs from that of the same samples (by --generator "
                    "or `hpdm sample --lossless`)", folder)
    return record


def _warn_mixed_sizes(files: list[Path]) -> None:
    """Say when the --fake videos are of several sizes (two models' outputs in one folder?): all are resized to the
    first one's, which went unnoticed."""
    import av  # noqa: PLC0415

    sizes: dict[tuple[int, int], str] = {}
    for f in files:
        with av.open(str(f)) as container:
            stream = container.streams.video[0]
            sizes.setdefault((stream.height, stream.width), f.name)
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({name})" for (h, w), name in sizes.items())
        log.warning("--fake: videos of %d sizes, %s: all are resized to the first (--size HxW chooses)", len(sizes),
                    shown)


def _agree(value):
    """Rank 0's value on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def evaluate(i3d: str, fake: str | None = None, generator: str | None = None, real: str | None = None,
             real_shards: str | None = None, num_fake: int = 2048, num_real: int | None = None, frames: int = fvd.FRAMES,
             size: tuple[int, int] | None = None, c3d: str | None = None, layout: str = "stylegan-v", batch: int = 8,
             seed: int = 0, opts: SampleOptions = SampleOptions(), cache_dir: str | Path | None = None,
             i3d_sha256: str = "", c3d_sha256: str = "", is_splits: int = 10) -> dict | None:
    """Returns the result dict on rank 0 (None on other ranks)."""
    if (fake is None) == (generator is None):
        raise UsageError("--fake/--generator: give exactly one: --fake (a folder of mp4s) or --generator")
    if (real is None) == (real_shards is None):
        raise UsageError("--real/--real-shards: give exactly one: --real (a folder of mp4s) or --real-shards")
    num_real = num_fake if num_real is None else num_real
    for option, value in (("--num-fake", num_fake), ("--num-real", num_real), ("--frames", frames), ("--batch", batch)):
        at_least(option, value)
    for option, value in (("--num-fake", num_fake), ("--num-real", num_real)):
        if value < 2:
            raise UsageError(f"{option}: FVD needs 2 videos or more (it compares covariances); got {value}")
    if c3d and num_fake < 2 * is_splits:
        raise UsageError(f"--num-fake: IS (--c3d) averages {is_splits} splits of 2 videos or more, so needs "
                         f"{2 * is_splits} or more; got {num_fake}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise UsageError(f"--size: must be HxW with positive sizes, e.g. 128x128; got {'x'.join(map(str, size))}")
    for option, folder in (("--fake", fake), ("--real", real)):
        if folder is not None and not Path(folder).is_dir():
            raise UsageError(f"{option}: no such folder: {folder}")
    rank, world = rank_world()
    if rank == 0 and min(num_fake, num_real) < PROTOCOL_VIDEOS:
        log.warning("FVD%s of %d generated and %d real videos is not comparable with published numbers, which use "
                    "%d of each (StyleGAN-V's protocol)", "/IS" if c3d else "", num_fake, num_real, PROTOCOL_VIDEOS)
    device = default_device()
    model = load_checked_generator(generator, frames, device) if generator is not None else None
    detector = fvd.Detector(i3d, device, "i3d", layout, i3d_sha256)
    detectors = [detector] + ([fvd.Detector(c3d, device, "c3d", layout, c3d_sha256)] if c3d else [])

    if model is not None:
        clips, gen_size = generated_clips(*model, num_fake, frames, seed, opts, batch, rank, world, device)
        fake_record = {"sampled": sampling_record(model[1], model[0], opts, seed, num_fake)}
    else:
        fake_record = {"fake": str(Path(fake).resolve()), "sampled": _sample_json(Path(fake))}
        files = sorted(Path(fake).glob("*.mp4"))
        if not files:
            raise UsageError(f"--fake: {fake} holds no mp4 files")
        gen_size = tuple(fvd.read_clip(files[0], 1, None).shape[1:3])
        if size is None and rank == 0:
            _warn_mixed_sizes(files[:num_fake])
        clips = fvd.mp4_clips(fake, num_fake, frames, size or gen_size, rank, world)
    size = tuple(size or gen_size)
    outs = fvd.extract(clips, detectors, batch)
    feats = fvd.gather(*outs[0])
    probs = fvd.gather(*outs[1]) if c3d else None

    source = str(Path(real or real_shards).resolve()) if not str(real_shards or "").startswith("s3://") else real_shards
    key = fvd.cache_key(source=source, n=num_real, frames=frames, size=size, detector=detector.sha256, layout=layout,
                        files=fvd.fingerprint(real, real_shards, num_real))
    cache = Path(cache_dir or default_cache_dir()) / f"real_{key}.npz"
    cached = _agree(fvd.load_stats(cache) if rank == 0 else None)
    if cached is None:
        if real is not None:
            real_clips = fvd.mp4_clips(real, num_real, frames, size, rank, world)
        else:
            from data_pipeline.config import DataConfig  # noqa: PLC0415

            real_clips = fvd.shard_clips(DataConfig(shards=real_shards, num_workers=1), num_real, frames, size, rank,
                                         world, batch)
        real_feats = fvd.gather(*fvd.extract(real_clips, [detector], batch)[0])
        if rank == 0:
            mu_r, sig_r = fvd.feature_stats(real_feats)
            fvd.save_stats(cache, mu_r, sig_r, source=source, n=num_real, frames=frames, size=size, detector=detector.sha256)
    else:
        mu_r, sig_r = cached
    if rank != 0:
        return None
    mu_g, sig_g = fvd.feature_stats(feats)
    result = {"fvd": fvd.frechet_distance(mu_g, sig_g, mu_r, sig_r), "num_fake": int(len(feats)), "num_real": num_real,
              "frames": frames, "size": list(size), "i3d_sha256": detector.sha256, "real_stats": str(cache),
              "real_stats_cached": cached is not None, **fake_record}
    if probs is not None:
        result["is_mean"], result["is_std"] = fvd.inception_score(probs, is_splits)
        result["c3d_sha256"] = detectors[1].sha256
    return result


def main_result(result: dict | None, out: str | None) -> None:
    if result is None:
        return
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text)

