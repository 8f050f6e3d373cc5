"""The loader the trainer iterates: worker streams behind a torch DataLoader, with a resumable position.

Every batch comes from one worker and carries that worker's cursor after it; torch's DataLoader returns
worker batches strictly round-robin, so the position of a run is (each worker's cursor as of its last batch
consumed here, which worker is next). On resume the workers are rotated so the next one is asked first.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import hashlib
import json
import logging
import math
import multiprocessing
import signal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .decode import ClipSpec
from .shardlist import is_pattern, load_index, resolve_shards
from .shards_write import TEXT_DIR
from .storage import Storage, StorageError, join
from .stream import DataError, ShardStream, add_stats, check_skips, fresh_cursor, new_stats

log = logging.getLogger(__name__)
STATE_VERSION = 1
LATER_KEYS = ("dataset", "text_embeddings")  # layout keys added since version 1: ignored where absent


def _worker_init(_):
    # Keep the garbage collector off the objects inherited at fork: touching them would copy their pages
    # (copy-on-write) into every worker and show up as host memory growth.
    gc.freeze()
    # A scheduler's preemption signal (and a terminal's Ctrl-C) goes to every process of the job; the trainer
    # handles it, finishes its step and checkpoints, so a worker must not die of it first. Workers still end with
    # their parent (PyTorch's watchdog), on the loader's shutdown, and at the parent's exit (_kill_workers_at_exit).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def _kill_workers_at_exit() -> None:
    """multiprocessing ends daemonic children with SIGTERM at exit, which the workers ignore: kill them."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


class _WorkerDataset(IterableDataset):
    def __init__(self, stream: ShardStream, first: int):
        self.stream, self.first = stream, first

    def __iter__(self):
        info = get_worker_info()
        w = ((info.id if info else 0) + self.first) % self.stream.workers
        try:
            yield from self.stream.batches(w)
        except (DataError, StorageError) as exc:  # handed over as it is: DataLoader would wrap it in a traceback
            yield {"_error": exc}


class VideoLoader:
    """Iterable of batches {"video" uint8 [B,T,H,W,3], "label" int64 [B], "caption", "key"}.

    Training: endless (epochs roll over per worker); a new ``iter()`` continues from the last batch consumed.
    Evaluation: each ``iter()`` is one pass from the start.
    """

    def __init__(self, cfg: DataConfig, stream: ShardStream, dataset: str = ""):
        self.cfg, self.stream, self.dataset = cfg, stream, dataset  # dataset: see dataset_identity
        self.workers = stream.workers
        self.pin = torch.cuda.is_available()
        self._reset()

    def _reset(self):
        self._states: list = [None] * self.workers
        self._next = 0
        self._base = new_stats()  # counts carried over from a state saved with a different layout

    # -- iteration ---------------------------------------------------------------------------------------------
    def _raw(self):
        self.stream.states = list(self._states)
        if self.cfg.num_workers == 0:
            yield from self.stream.batches(0)
            return
        dl = DataLoader(_WorkerDataset(self.stream, self._next), batch_size=None, num_workers=self.workers,
                        pin_memory=self.pin, prefetch_factor=max(1, self.cfg.prefetch), multiprocessing_context="fork",
                        worker_init_fn=_worker_init)
        yield from dl

    def __iter__(self):
        if not self.stream.spec.train:
            self._reset()
        for batch in self._raw():
            if "_error" in batch:
                raise batch["_error"]
            meta = batch.pop("_state")
            w = meta["worker"]
            self._states[w] = {"cursor": meta["cursor"], "stats": meta["stats"]}
            self._next = (w + 1) % self.workers
            check_skips(self.stats, self.cfg.max_skip_fraction, self.cfg.skip_check_after, f"rank {self.stream.rank}: ")
            if not batch:
                continue
            if self.pin and self.cfg.num_workers == 0:  # as DataLoader(pin_memory=True) does: every tensor
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch

    def __len__(self):
        raise TypeError("VideoLoader is a stream; its length is unknown (training loops forever)")

    # -- counters ------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Samples seen and skipped (with reasons) and seconds spent fetching, decoding, resizing, this rank."""
        total = self._base
        for st in self._states:
            if st:
                total = add_stats(total, st["stats"])
        return total

    @property
    def epoch(self) -> int:
        """The epoch every worker of this rank has reached."""
        return min((st["cursor"]["epoch"] for st in self._states if st), default=0)

    # -- checkpointing -------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        s = self.stream
        return {"rank": s.rank, "world_size": s.world_size, "workers": s.workers, "num_workers": self.cfg.num_workers,
                "seed": s.seed, "shards": len(s.urls), "dataset": self.dataset, "batch_size": s.batch_size,
                "shuffle_buffer": s.shuffle_buffer, "text_embeddings": s.text_urls is not None}

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank: epoch, every worker's cursor and counters, next worker."""
        return json.loads(json.dumps({"version": STATE_VERSION, "layout": self._layout(), "epoch": self.epoch,
                                      "next_worker": self._next, "workers": self._states, "base_stats": self._base}))

    def load_state_dict(self, sd: dict) -> None:
        """Restore a position. With the same layout the following batches equal those of the uninterrupted
        run; with a different one (world size, workers, shards, ...) every worker restarts at the start of the
        oldest saved epoch (see docs/data.md)."""
        if set(sd) == {"videos", "images"}:  # a JointLoader's: data.image_shards was set, and is not now
            log.warning("data.image_shards was set when this data position was saved and is not now: training on "
                        "videos alone")
            sd = sd["videos"]
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state: unsupported version {sd.get('version')!r}")
        self._reset()
        # "text_embeddings": precomputed embeddings are read through cursors into their own shards, which an
        # encoder on the fly has not (switching between them crashed or blamed the embeddings)
        layout = {k: v for k, v in self._layout().items() if k in sd["layout"] or k not in LATER_KEYS}
        if sd["layout"] == layout:
            self._states = json.loads(json.dumps(sd["workers"]))
            self._next = int(sd["next_worker"])
            self._base = sd.get("base_stats", new_stats())
            return
        # said once, by rank 0 (a new rank is handed rank 0's state by design); the layout's batch_size is the
        # per-process micro-batch
        names = {"batch_size": "micro-batch per process", "world_size": "processes", "num_workers": "data.num_workers"}
        changed = [f"{names.get(k, k)} {v} -> {layout.get(k)}" for k, v in sd["layout"].items()
                   if layout.get(k) != v and k != "rank"]
        epoch = int(sd.get("epoch", 0))
        log.log(logging.WARNING if self.stream.rank == 0 else logging.DEBUG, "the data position was saved with %s; "
                "restarting every worker at the start of epoch %d", ", ".join(changed) or "another rank", epoch)
        totals = sd.get("base_stats", new_stats())
        for st in sd.get("workers", []):
            if st:
                totals = add_stats(totals, st["stats"])
        self._base = totals
        self._states = [{"cursor": fresh_cursor(epoch), "stats": new_stats()} for _ in range(self.workers)]


def text_location(cfg: DataConfig) -> str:
    """Where the caption embeddings of ``cfg.shards`` are: ``data.text_embeddings``, else SHARDS/text."""
    if cfg.text_embeddings:
        return cfg.text_embeddings
    if is_pattern(cfg.shards):
        raise DataError(f"data.text_embeddings: must be set when data.shards is a pattern of shards ({cfg.shards})")
    return join(cfg.shards, TEXT_DIR)


def matching_text_urls(cfg: DataConfig, storage: Storage, urls: list[str], tokens: int, dim: int) -> list[str]:
    """The embedding shard of each video shard, after checking the embeddings fit the model and were made from
    these video shards as they are now (``text_shards.check_made_from``)."""
    from .text_shards import check_made_from, read_text_index, text_shard_urls  # noqa: PLC0415

    where = text_location(cfg)
    index = read_text_index(storage, where)
    if index["width"] != dim:
        raise DataError(f"{where}: the embeddings are {index['width']} wide ({index['encoder']}) but model.text_dim "
                        f"is {dim}")
    if index["max_tokens"] > tokens:
        raise DataError(f"{where}: the embeddings have up to {index['max_tokens']} tokens but model.text_tokens is "
                        f"{tokens}: embed again with --max-tokens {tokens} or raise model.text_tokens")
    if index["max_tokens"] < tokens:
        log.warning("%s: the embeddings have up to %d tokens but model.text_tokens is %d: prompts at sampling are "
                    "encoded to %d tokens, longer than any caption in training (embed again with --max-tokens %d)",
                    where, index["max_tokens"], tokens, tokens, tokens)
    text_urls = text_shard_urls(urls, where)
    videos = None if is_pattern(cfg.shards) else load_index(storage, cfg.shards)
    check_made_from(storage, where, index, cfg.shards, urls, videos)
    return text_urls


def build_loader(cfg: DataConfig, *, frames: int, size: tuple[int, int], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True,
                 text: tuple[int, int] | None = None) -> VideoLoader:
    """A loader of ``frames`` x ``size`` clips from ``cfg.shards`` for this rank (see VideoLoader); with
    ``text`` = (model.text_tokens, model.text_dim) its batches also carry the captions' precomputed embeddings,
    "text" [B,tokens,dim] and "text_mask" [B,tokens]."""
    storage = Storage(cfg.endpoint_url, retries=cfg.io_retries, backoff=cfg.io_backoff, timeout=cfg.io_timeout)
    urls, counts = resolve_shards(storage, cfg.shards)
    text_urls = matching_text_urls(cfg, storage, urls, *text) if text else None
    spec = ClipSpec(frames=frames, size=tuple(size), stride=cfg.frame_stride, fps=cfg.fps, train=train,
                    flip=cfg.flip and train, threads=cfg.decode_threads)
    stream = ShardStream(urls=urls, counts=counts, storage=storage, spec=spec, batch_size=batch_size, seed=seed,
                         rank=rank, world_size=world_size, workers=max(1, cfg.num_workers),
                         shuffle_buffer=cfg.shuffle_buffer if train else 0, max_skip_fraction=cfg.max_skip_fraction,
                         skip_check_after=cfg.skip_check_after, text_urls=text_urls,
                         text_dim=text[1] if text else 0, text_tokens=text[0] if text else 0)
    return VideoLoader(cfg, stream, dataset_identity(storage, cfg.shards, urls, counts))


def dataset_identity(storage: Storage, spec: str, urls: list[str], counts: list) -> str:
    """What tells another dataset from this one wherever it is stored: the shards' names, sample counts and (from
    the index) sizes. A loader state resumes exactly only on the same dataset; another one, even with as many
    shards, restarts the epoch, since the saved byte offsets would point into other files."""
    index = None if is_pattern(spec) else load_index(storage, spec)
    sizes = [s.get("bytes") for s in index["shards"]] if index else None
    names = [u.rsplit("/", 1)[-1] for u in urls]
    return hashlib.sha256(json.dumps([names, counts, sizes]).encode()).hexdigest()[:16]


def split_batch(micro: int, fraction: float) -> tuple[int, int]:
    """(videos, still images) in a micro-batch of ``micro`` samples of which ``fraction`` are images (rounded half
    up), both at least 1 when 0 < fraction < 1: the video loader reads ``data.shards``, the image loader
    ``data.image_shards``."""
    from hpdm.config import ConfigError, check_range  # noqa: PLC0415 (the data package does not import hpdm)

    if micro < 1:
        raise ValueError(f"split_batch: micro must be >= 1; got {micro}")
    check_range("data.image_batch_fraction", fraction, 0, high=1)
    if fraction == 0:
        return micro, 0
    if micro < 2:
        raise ConfigError("data.image_batch_fraction", f"{fraction} puts videos and images in every micro-batch, "
                          "which then needs 2 samples or more (train.micro_batch, or train.batch_size / processes), or set 0 for "
                          "videos only; got a micro-batch of 1")
    images = min(micro - 1, max(1, math.floor(micro * fraction + 0.5)))
    return micro - images, images


class JointLoader:
    """Joint image-video training (``data.image_shards``): each video batch with a batch of still images (images
    repeated along time, as HPDM trains text-to-video) appended; position and counters are the two loaders'."""

    def __init__(self, videos: VideoLoader, images: VideoLoader):
        self.videos, self.images = videos, images

    def __iter__(self):
        vids, imgs = iter(self.videos), iter(self.images)
        try:
            for v in vids:
                i = next(imgs)
                yield {k: v[k] + i[k] if isinstance(v[k], list) else torch.cat([v[k], i[k]]) for k in v}
        finally:
            vids.close()
            imgs.close()

    @property
    def stats(self) -> dict:
        return add_stats(self.videos.stats, self.images.stats)

    @property
    def epoch(self) -> int:
        return self.videos.epoch

    def state_dict(self) -> dict:
        return {"videos": self.videos.state_dict(), "images": self.images.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != {"videos", "images"}:  # a VideoLoader's (its batches were whole micro-batches of videos)
            log.warning("data.image_shards was not set when this data position was saved: the still images start "
                        "from the beginning")
            self.videos.load_state_dict(sd)
            return
        self.videos.load_state_dict(sd["videos"])
        self.images.load_state_dict(sd["images"])


def build_train_loader(cfg: DataConfig, *, frames: int, size: tuple[int, int], micro: int, rank: int = 0,
                       world_size: int = 1, seed: int = 0, text: tuple[int, int] | None = None):
    """The training loader of ``micro``-sample batches: videos alone, or with ``data.image_shards`` a
    JointLoader whose batches end with ``data.image_batch_fraction`` of still images (their caption embeddings
    in IMAGE_SHARDS/text)."""
    n_videos, n_images = split_batch(micro, cfg.image_batch_fraction if cfg.image_shards else 0.0)
    common = dict(frames=frames, size=size, rank=rank, world_size=world_size, seed=seed, train=True, text=text)
    videos = build_loader(cfg, batch_size=n_videos, **common)
    if not n_images:
        return videos
    image_cfg = dataclasses.replace(cfg, shards=cfg.image_shards, text_embeddings="", synthetic=False)
    return JointLoader(videos, build_loader(image_cfg, batch_size=n_images, **common))
