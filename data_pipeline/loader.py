"""The loader the trainer iterates: worker streams behind a torch DataLoader, with a resumable position.

Every batch comes from one worker and carries that worker's cursor after it; torch's DataLoader returns
worker batches strictly round-robin, so the position of a run is (each worker's cursor as of its last batch
consumed here, which worker is next). On resume the workers are rotated so the next one is asked first.
"""
from __future__ import annotations

import atexit
import gc
import json
import logging
import multiprocessing
import signal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .decode import ClipSpec
from .shardlist import resolve_shards
from .storage import Storage
from .stream import ShardStream, add_stats, check_skips, fresh_cursor, new_stats

log = logging.getLogger(__name__)
STATE_VERSION = 1


def _worker_init(_):
    # Keep the garbage collector off the objects inherited at fork: touching them would copy their pages
    # (copy-on-write) into every worker and show up as host memory growth.
    gc.freeze()
    # A scheduler's preemption signal goes to every process of the job; the trainer handles it, finishes its
    # step and checkpoints, so a worker must not die of it first. Workers still end with their parent (PyTorch's
    # watchdog), on the loader's shutdown, and at the parent's exit (_kill_workers_at_exit).
    for sig in (signal.SIGTERM, signal.SIGUSR1):
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
        return self.stream.batches(w)


class VideoLoader:
    """Iterable of batches {"video" uint8 [B,T,H,W,3], "label" int64 [B], "caption", "key"}.

    Training: endless (epochs roll over per worker); a new ``iter()`` continues from the last batch consumed.
    Evaluation: each ``iter()`` is one pass from the start.
    """

    def __init__(self, cfg: DataConfig, stream: ShardStream):
        self.cfg, self.stream = cfg, stream
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
            meta = batch.pop("_state")
            w = meta["worker"]
            self._states[w] = {"cursor": meta["cursor"], "stats": meta["stats"]}
            self._next = (w + 1) % self.workers
            check_skips(self.stats, self.cfg.max_skip_fraction, self.cfg.skip_check_after, f"rank {self.stream.rank}: ")
            if not batch:
                continue
            if self.pin and self.cfg.num_workers == 0:
                batch["video"] = batch["video"].pin_memory()
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
                "seed": s.seed, "shards": len(s.urls), "batch_size": s.batch_size, "shuffle_buffer": s.shuffle_buffer}

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank: epoch, every worker's cursor and counters, next worker."""
        return json.loads(json.dumps({"version": STATE_VERSION, "layout": self._layout(), "epoch": self.epoch,
                                      "next_worker": self._next, "workers": self._states, "base_stats": self._base}))

    def load_state_dict(self, sd: dict) -> None:
        """Restore a position. With the same layout the following batches equal those of the uninterrupted
        run; with a different one (world size, workers, shards, ...) every worker restarts at the start of the
        oldest saved epoch (see docs/data.md)."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state: unsupported version {sd.get('version')!r}")
        self._reset()
        if sd["layout"] == self._layout():
            self._states = json.loads(json.dumps(sd["workers"]))
            self._next = int(sd["next_worker"])
            self._base = sd.get("base_stats", new_stats())
            return
        changed = {k: (v, self._layout()[k]) for k, v in sd["layout"].items() if self._layout().get(k) != v}
        epoch = int(sd.get("epoch", 0))
        log.warning("data loader state was saved with a different layout %s; restarting every worker at the start "
                    "of epoch %d", {k: f"{a} -> {b}" for k, (a, b) in changed.items()}, epoch)
        totals = sd.get("base_stats", new_stats())
        for st in sd.get("workers", []):
            if st:
                totals = add_stats(totals, st["stats"])
        self._base = totals
        self._states = [{"cursor": fresh_cursor(epoch), "stats": new_stats()} for _ in range(self.workers)]


def build_loader(cfg: DataConfig, *, frames: int, size: tuple[int, int], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True) -> VideoLoader:
    """A loader of ``frames`` x ``size`` clips from ``cfg.shards`` for this rank (see VideoLoader)."""
    storage = Storage(cfg.endpoint_url, retries=cfg.io_retries, backoff=cfg.io_backoff)
    urls, counts = resolve_shards(storage, cfg.shards)
    spec = ClipSpec(frames=frames, size=tuple(size), stride=cfg.frame_stride, fps=cfg.fps, train=train,
                    flip=cfg.flip and train, threads=cfg.decode_threads)
    stream = ShardStream(urls=urls, counts=counts, storage=storage, spec=spec, batch_size=batch_size, seed=seed,
                         rank=rank, world_size=world_size, workers=max(1, cfg.num_workers),
                         shuffle_buffer=cfg.shuffle_buffer if train else 0, max_skip_fraction=cfg.max_skip_fraction,
                         skip_check_after=cfg.skip_check_after)
    return VideoLoader(cfg, stream)
