"""One loader worker's stream of batches: its shards for each epoch, a shuffle buffer, decoding, skipping bad
samples, and a JSON cursor after every batch.

Every worker of the job has a global id ``g = rank * workers + w`` out of ``total = world_size * workers``.
In each epoch the shard order is shuffled with (seed, epoch); with at least ``total`` shards, worker g reads
shards ``order[g::total]``; with fewer, every worker reads all shards and keeps sample i of shard s when
``(s + i) % total == g``. Either way each sample belongs to exactly one worker per epoch.

All randomness is a pure function of (seed, epoch, worker, counter) or (seed, epoch, shard, byte offset), so
the cursor (epoch, shard position, byte offset, buffer contents as references, number of shuffle draws,
counters) is all it takes to continue exactly where a run stopped.

Text-conditioned runs read, beside each video shard, its embedding shard (``hpdm embed-text``): the same keys
in the same order, so both are read in lockstep and the cursor holds a byte offset in each.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .decode import ClipSpec, ShortVideo, decode_clip, decode_still
from .storage import Storage, StorageError, without_userinfo
from .tario import Record, iter_records
from .video import IMAGE_EXTS, VIDEO_EXTS, ImageError, VideoError

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data cannot feed training (too many bad samples, or none at all)."""


def mix(*xs) -> int:
    """A 64-bit hash of the arguments: the source of every random choice in the loader."""
    return int.from_bytes(hashlib.blake2b(",".join(map(str, xs)).encode(), digest_size=8).digest(), "little")


def new_stats() -> dict:
    return {"seen": 0, "skipped": 0, "reasons": {}, "fetch_s": 0.0, "decode_s": 0.0, "resize_s": 0.0}


def add_stats(a: dict, b: dict) -> dict:
    out = {k: a.get(k, 0) + b.get(k, 0) for k in new_stats() if k != "reasons"}
    ra, rb = a.get("reasons", {}), b.get("reasons", {})
    out["reasons"] = {r: ra.get(r, 0) + rb.get(r, 0) for r in sorted({*ra, *rb})}
    return out


SHORT_VIDEOS = ("Every video is shorter than one clip, see the warnings: use longer videos, or fewer frames per clip "
                "(model.patch, model.levels), a smaller data.frame_stride or data.fps.")


def check_skips(stats: dict, max_fraction: float, min_samples: int, where: str = "") -> None:
    seen, skipped = stats["seen"], stats["skipped"]
    if seen >= min_samples and skipped > max_fraction * seen:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(stats["reasons"].items()))
        fix = ("Fix or rewrite the shards (see the warnings above for shard and key), or raise "
               "data.max_skip_fraction.")
        if skipped == seen and set(stats["reasons"]) == {"short_video"}:  # no fraction helps: the clip is too long
            fix = SHORT_VIDEOS
        raise DataError(f"{where}{skipped} of {seen} samples were bad ({skipped / seen:.1%} > data.max_skip_fraction = "
                        f"{max_fraction:.1%}); reasons: {reasons}. {fix}")


def fresh_cursor(epoch: int) -> dict:
    return {"epoch": epoch, "pos": 0, "offset": 0, "toffset": 0, "index": 0, "buffer": [], "draws": 0, "good": 0}


@dataclass
class ShardStream:
    """Everything a worker needs, picklable (the S3 client is created inside each worker)."""

    urls: list[str]
    counts: list  # samples per shard from the index, or None
    storage: Storage
    spec: ClipSpec
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 1  # logical workers per rank
    shuffle_buffer: int = 0
    max_skip_fraction: float = 1.0
    skip_check_after: int = 50
    text_urls: list[str] | None = None  # embedding shard of each video shard (model.cond: text), else None
    text_dim: int = 0
    text_tokens: int = 0
    states: list = field(default_factory=list)  # per logical worker: {"cursor", "stats"} or None

    def __post_init__(self):
        total = self.world_size * self.workers
        if self.spec.train and self.counts and len(self.urls) < total:  # split by sample: see shards_for
            reached = {(s + i) % total for s, n in enumerate(self.counts) for i in range(min(n or 0, total))}
            if len(reached) < total:  # found up front on every rank, not as one rank's error mid-start
                raise DataError(f"the dataset ({sum(n or 0 for n in self.counts)} samples in {len(self.urls)} shards) "
                                f"gives {total - len(reached)} of the {total} loader workers ({self.world_size} "
                                f"processes x {self.workers} per process, data.num_workers) no sample: lower "
                                "data.num_workers or the number of processes, or use more data")

    # -- the split ------------------------------------------------------------------------------------------
    def shards_for(self, epoch: int, g: int) -> tuple[list[int], bool]:
        """Global shard ids this worker reads in ``epoch``, and whether it splits them by sample."""
        order = list(range(len(self.urls)))
        if self.spec.train:
            random.Random(mix("shards", self.seed, epoch)).shuffle(order)
        total = self.world_size * self.workers
        return (order[g::total], False) if len(order) >= total else (order, True)

    # -- reading ------------------------------------------------------------------------------------------
    def _skip(self, stats: dict, reason: str, url: str, key: str, detail: str, n: int = 1) -> None:
        stats["seen"] += n
        stats["skipped"] += n
        stats["reasons"][reason] = stats["reasons"].get(reason, 0) + n
        log.warning("skipped sample %r in %s: %s (%s)", key, url, reason, detail)

    def _text_reader(self, s: int, offset: int):
        """The embedding shard of video shard ``s`` opened at ``offset`` (a null context without text)."""
        if self.text_urls is None:
            return contextlib.nullcontext()
        try:
            return self.storage.open(self.text_urls[s], offset)
        except StorageError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            raise DataError(f"{self.urls[s]} has no text embeddings ({self.text_urls[s]} is missing): run "
                            "`hpdm embed-text SHARDS --encoder PATH` for these shards") from None

    def _join(self, rec: Record, trec: Record | None, s: int) -> Record:
        """Add the fields of ``rec``'s embedding record ``trec`` to ``rec``; the two shards must match key for key."""
        if trec is None or trec.error or trec.key != rec.key:
            found = "the shard's end" if trec is None else (trec.error or f"key {trec.key!r}")
            raise DataError(f"{self.text_urls[s]}: expected the embedding of sample {rec.key!r} of {self.urls[s]} but "
                            f"found {found}: the embeddings were made for other shards; rerun `hpdm embed-text`")
        rec.fields.update(trec.fields)
        return trec

    def _records(self, cur: dict, g: int, stats: dict):
        """(shard id, record, byte offset of its embedding record or None) for this worker's samples of the
        cursor's epoch, advancing the cursor."""
        mine, by_sample = self.shards_for(cur["epoch"], g)
        total = self.world_size * self.workers
        while cur["pos"] < len(mine):
            s = mine[cur["pos"]]
            url, idx0 = self.urls[s], cur["index"]
            keep = (lambda i, s=s, idx0=idx0: (s + idx0 + i) % total == g) if by_sample else None
            expected = self.counts[s] if self.counts else None
            try:
                reader = self.storage.open(url, cur["offset"])
            except StorageError as exc:
                if not isinstance(exc.__cause__, FileNotFoundError) or "bucket" in str(exc):
                    raise
                # counted as the samples the index promised this worker, so that data.max_skip_fraction sees them
                owed = sum(1 for i in range(idx0, expected) if not by_sample or (s + i) % total == g) if expected else 1
                self._skip(stats, "missing_shard", url, "*", f"{exc}; counted as {owed} samples", owed)
                reader = None
            n = idx0
            if reader is not None:
                toffset = cur.get("toffset", 0)
                with reader, self._text_reader(s, toffset) as treader:
                    texts = iter_records(treader, toffset, keep) if treader is not None else None
                    fetched = 0.0
                    for rec in iter_records(reader, cur["offset"], keep):
                        i, n = n, n + 1
                        tstart = None
                        if texts is not None and not rec.error:
                            trec = self._join(rec, next(texts, None), s)
                            tstart, cur["toffset"] = trec.start, trec.end
                        cur["offset"], cur["index"] = rec.end, n
                        stats["fetch_s"] += reader.fetch_seconds - fetched
                        fetched = reader.fetch_seconds
                        if by_sample and (s + i) % total != g:
                            continue
                        if rec.error:
                            self._skip(stats, "truncated_tar", url, rec.key, rec.error)
                            continue
                        yield s, rec, tstart
                    for i in range(n, expected or 0):  # the tar ended early at a member boundary
                        if not by_sample or (s + i) % total == g:
                            self._skip(stats, "truncated_tar", url, f"#{i}", f"shard ended after {n} of {expected} samples")
            cur["pos"], cur["offset"], cur["toffset"], cur["index"] = cur["pos"] + 1, 0, 0, 0

    def _fetch_one(self, s: int, offset: int, toffset: int | None = None) -> Record:
        with self.storage.open(self.urls[s], offset, block_size=1 << 20) as reader:  # one sample, not a shard's worth
            rec = next(iter_records(reader, offset))
        if toffset is not None:
            with self.storage.open(self.text_urls[s], toffset, block_size=1 << 20) as treader:
                self._join(rec, next(iter_records(treader, toffset), None), s)
        return rec

    def _text(self, rec: Record, url: str) -> torch.Tensor:
        """The [n_tokens, text_dim] caption embedding joined to ``rec``; a DataError names a bad one."""
        from safetensors import SafetensorError  # noqa: PLC0415
        from safetensors.torch import load  # noqa: PLC0415

        try:
            t = load(rec.fields["safetensors"])["text"]
        except (KeyError, SafetensorError) as exc:
            raise DataError(f"sample {rec.key!r} of {url}: no readable text embedding ({exc}); rerun `hpdm embed-text`") from None
        if t.dim() != 2 or t.shape[1] != self.text_dim or not 1 <= t.shape[0] <= self.text_tokens:
            raise DataError(f"sample {rec.key!r} of {url}: text embedding of shape {list(t.shape)}, but the model takes "
                            f"up to model.text_tokens={self.text_tokens} tokens of model.text_dim={self.text_dim}")
        return t

    def _valid(self, rec: Record, url: str, stats: dict):
        """(video or image bytes, metadata, whether an image) or None after counting a sample that lacks a field."""
        ext = next((e for e in VIDEO_EXTS + IMAGE_EXTS if e in rec.fields), None)
        video, image = rec.fields.get(ext), ext in IMAGE_EXTS
        try:
            meta = json.loads(rec.fields["json"]) if "json" in rec.fields else None
        except ValueError:
            meta = None
        missing = [n for n, ok in (("video", video is not None), ("json", isinstance(meta, dict))) if not ok]
        if not missing and not image and not all(k in meta for k in ("fps", "frames")):
            missing = ["json fps/frames"]
        if missing:
            found = ", ".join(sorted(rec.fields)) or "nothing"
            if rec.cut_off:  # the shard was cut between this sample's members
                self._skip(stats, "truncated_tar", url, rec.key, f"the tar ends inside this sample (no "
                           f"{' and '.join(missing)}; found {found}) without its end-of-archive block")
                return None
            self._skip(stats, "missing_field", url, rec.key, f"no {' and '.join(missing)} (found {found}; "
                       f"videos are {', '.join(VIDEO_EXTS)}, images {', '.join(IMAGE_EXTS)})")
            return None
        label, caption = meta.get("label", -1), meta.get("caption", "")
        if not isinstance(label, int) or isinstance(label, bool) or not isinstance(caption, str):
            self._skip(stats, "bad_metadata", url, rec.key, f"label {label!r}, caption {caption!r}: a label is an "
                       "integer (-1: none), a caption a string")
            return None
        return video, meta, image

    def _samples(self, cur: dict, g: int, stats: dict):
        """Records in shuffled order for the cursor's epoch (the buffer is refilled from references on resume)."""
        refs = cur["buffer"]  # [shard, byte offset(, embedding offset)] of each buffered record, in step with buf
        buf = [(s, self._fetch_one(s, *offsets)) for s, *offsets in refs]
        size = self.shuffle_buffer if self.spec.train else 0

        def emit():
            cur["draws"] += 1
            j = mix("pick", self.seed, cur["epoch"], g, cur["draws"]) % len(buf)
            buf[j], buf[-1] = buf[-1], buf[j]
            refs[j], refs[-1] = refs[-1], refs[j]
            refs.pop()
            return buf.pop()

        for s, rec, tstart in self._records(cur, g, stats):
            if size <= 1:
                yield s, rec
                continue
            buf.append((s, rec))
            refs.append([s, rec.start] + ([] if tstart is None else [tstart]))
            if len(buf) > size:
                yield emit()
        while buf:
            yield emit()

    # -- the worker loop ------------------------------------------------------------------------------------
    def batches(self, w: int):
        """Batches of logical worker ``w``: forever in training, one pass in evaluation."""
        g = self.rank * self.workers + w
        st = self.states[w] if w < len(self.states) and self.states[w] else None
        cur = json.loads(json.dumps(st["cursor"])) if st else fresh_cursor(0)
        stats = add_stats(new_stats(), st["stats"]) if st else new_stats()
        videos, labels, captions, keys, texts = [], [], [], [], []
        while True:
            for s, rec in self._samples(cur, g, stats):
                url = self.urls[s]
                parsed = self._valid(rec, url, stats)
                if parsed is None:
                    check_skips(stats, self.max_skip_fraction, self.skip_check_after, f"loader worker {g}: ")
                    continue
                video, meta, image = parsed
                text = self._text(rec, url) if self.text_urls is not None else None
                rng = np.random.default_rng(mix("aug", self.seed, cur["epoch"], s, rec.start))
                timing: dict = {}
                reason = ""
                try:
                    if image:
                        clip = decode_still(video, self.spec, rng, timing)
                    else:
                        clip = decode_clip(video, meta, self.spec, rng, timing)
                except ShortVideo as exc:
                    reason, detail = "short_video", str(exc)
                except ImageError as exc:
                    reason, detail = "corrupt_image", str(exc)
                except (VideoError, ValueError, KeyError, TypeError) as exc:
                    reason, detail = "corrupt_video", str(exc)
                stats["decode_s"] += timing.get("decode", 0.0)
                stats["resize_s"] += timing.get("resize", 0.0)
                if reason:
                    self._skip(stats, reason, url, rec.key, detail)
                else:
                    stats["seen"] += 1
                check_skips(stats, self.max_skip_fraction, self.skip_check_after, f"loader worker {g}: ")
                if reason:
                    continue
                cur["good"] += 1
                videos.append(clip)
                labels.append(meta.get("label", -1))
                captions.append(meta.get("caption", ""))
                keys.append(rec.key)
                texts.append(text)
                if len(videos) == self.batch_size:
                    yield self._collate(w, videos, labels, captions, keys, texts, cur, stats)
                    videos, labels, captions, keys, texts = [], [], [], [], []
            if not self.spec.train:
                batch = self._collate(w, videos, labels, captions, keys, texts, cur, stats)
                yield batch if videos else {"_state": batch["_state"]}  # a state-only item carries the final counts
                return
            if cur["good"] == 0:
                why = f"skipped: {stats['reasons']}"
                if not stats["skipped"]:
                    why = (f"the dataset ({len(self.urls)} shards) has fewer samples than world_size x workers "
                           f"({self.world_size * self.workers})")
                elif set(stats["reasons"]) == {"short_video"}:
                    why += f" ({SHORT_VIDEOS[0].lower()}{SHORT_VIDEOS[1:-1]})"
                elif set(stats["reasons"]) == {"missing_shard"}:
                    why += (f" (none of the shards under {without_userinfo(self.urls[0]).rsplit('/', 1)[0]} is there "
                            "any more: was the bucket or prefix deleted or moved? see the warnings)")
                raise DataError(f"loader worker {g}: epoch {cur['epoch']} produced no usable sample; {why}")
            cur.update(fresh_cursor(cur["epoch"] + 1))

    def _collate(self, w, videos, labels, captions, keys, texts, cur, stats) -> dict:
        batch = {
            "video": torch.from_numpy(np.stack(videos)) if videos else None,
            "label": torch.tensor(labels, dtype=torch.int64),
            "caption": list(captions),
            "key": list(keys),
            "_state": {"worker": w, "cursor": json.loads(json.dumps(cur)), "stats": json.loads(json.dumps(stats))},
        }
        if self.text_urls is not None and videos:  # padded to model.text_tokens, so every batch has one shape
            batch["text"] = torch.zeros(len(texts), self.text_tokens, self.text_dim, dtype=texts[0].dtype)
            batch["text_mask"] = torch.zeros(len(texts), self.text_tokens, dtype=torch.bool)
            for i, t in enumerate(texts):
                batch["text"][i, :len(t)], batch["text_mask"][i, :len(t)] = t, True
        return batch
