"""``make-shards``: pack videos into tar shards of a target size, locally or on S3, resumably.

The plan (which video goes to which shard) is fixed up front from the sorted source list and the source file
sizes, so shards can be written in parallel and a rerun knows what is done: each shard has a
``shard-NNNNNN.meta.json`` beside it, written before the tar (marked "writing") and again after it, and a rerun
skips every finished shard whose sidecar lists the same videos with the same options, labels, captions, class
names and source file sizes (a shard whose manifest rows or files changed is written again). ``index.json`` is
written last. Sidecars list each video's caption (null for a video left out), so ``embed-text`` never reads
video bytes for them; ``embed`` writes the captions' embeddings to ``DEST/text`` after all shards are written.

make-shards writes only where it finds nothing or its own work (these names, a sidecar for every tar, and the
``text/`` folder of embeddings): any other file at the destination stops it before it writes anything, so it never
overwrites data it did not make.

Videos are stored as their original bytes under their real extension (``.mp4``, ``.avi``, ...: VIDEO_EXTS, which
the loader reads), since PyAV decodes them all; other formats that PyAV reads (``.gif``, ``.ts``, ...) are
re-encoded, and ``reencode`` ("non-mp4" or "all") or ``max_side`` turns any video into H.264 ``.mp4``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import as_completed
from pathlib import Path

from tqdm import tqdm

from .pool import worker_pool
from .sources import Item, load_sources
from .storage import Storage, is_s3, join
from .stream import DataError
from .tario import TarWriter
from .video import IMAGE_EXTS, VIDEO_EXTS, VideoError, probe, probe_image, reencode

log = logging.getLogger(__name__)
INDEX = "index.json"
FORMAT = "hpdm-shards/1"
# What make-shards leaves at a destination: shards, sidecars, the index, and leftovers of interrupted writes
# (Storage.write_bytes's temporary files, local scratch folders, the S3 write probe).
OWN = re.compile(r"shard-\d{6}\.tar|shard-\d{6}\.meta\.json|index\.json|(shard-\d{6}\.meta|index)\.json\.tmp\d+"
                 r"|\.hpdm-tmp-.+|\.hpdm-write-check|text")  # text: the folder of caption embeddings
TEXT_DIR = "text"  # where make-shards --encoder and embed-text put the captions' embeddings by default
ONLY_OWN = "write to an empty folder or prefix (make-shards only resumes its own shards there)"


def plan_shards(items: list[Item], shard_bytes: int) -> list[list[Item]]:
    """Consecutive groups of items whose source sizes add up to about ``shard_bytes`` (at least one each)."""
    groups, cur, size = [], [], 0
    for it in items:
        n = os.path.getsize(it.path) if os.path.exists(it.path) else 0
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        groups.append(cur)
    return groups


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _sample(it: Item, options: dict, classes: list[str]) -> dict[str, bytes]:
    with open(it.path, "rb") as f:
        data = f.read()
    ext = it.path.rsplit(".", 1)[-1].lower()
    image = ext in IMAGE_EXTS  # an image keeps its bytes (as .jpg, .png, .webp): reencode and max_side are for videos
    meta = probe_image(data) if image else probe(data)
    ext = "jpg" if ext == "jpeg" else ext
    mode, max_side = options["reencode"], options["max_side"]
    if not image and (mode == "all" or (mode == "non-mp4" and ext != "mp4") or ext not in VIDEO_EXTS
                      or (max_side and max(meta["width"], meta["height"]) > max_side)):
        data, ext = reencode(data, max_side), "mp4"
        meta = probe(data)
    meta.update(key=it.key, label=it.label, caption=it.caption, source=os.path.basename(it.path))
    if 0 <= it.label < len(classes):
        meta["class"] = classes[it.label]
    return {ext: data, "json": json.dumps(meta, sort_keys=True).encode()}


def inputs_digest(items: list[Item], classes: list[str]) -> str:
    """What a shard's contents depend on beyond keys and options: labels, captions, class names, source sizes."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for it in items:
        size = os.path.getsize(it.path) if os.path.exists(it.path) else -1
        h.update(json.dumps([it.key, it.label, it.caption, size]).encode())
    return h.hexdigest()[:32]


def write_shard(storage: Storage, dest: str, i: int, items: list[Item], options: dict, classes: list[str], tmpdir: str) -> dict:
    """Write shard ``i`` and its sidecar; return the sidecar. Unreadable videos are skipped and listed."""
    name = shard_name(i)
    side_url = join(dest, name.replace(".tar", ".meta.json"))
    side = {"name": name, "keys": [it.key for it in items], "options": options, "inputs": inputs_digest(items, classes),
            "state": "writing"}
    storage.write_bytes(side_url, json.dumps(side).encode())  # so a tar at dest always has a sidecar
    local = os.path.join(tmpdir, name)
    writer = TarWriter(local)
    skipped, labels, captions = [], [-1], []
    for it in items:
        try:
            sample = _sample(it, options, classes)
        except (OSError, VideoError) as exc:
            log.warning("make-shards: skipping %s: %s", it.path, exc)
            skipped.append({"path": it.path, "reason": str(exc)})
            if not isinstance(exc, VideoError):  # a file that could not be read (permissions, I/O): a rerun tries it
                skipped[-1]["retry"] = True
            captions.append(None)
            continue
        writer.write(it.key, sample)  # a write error (a full disk) fails the shard: the tar is no longer whole
        labels.append(it.label)
        captions.append(it.caption)
    size = writer.close()
    if writer.samples:
        storage.put_file(local, join(dest, name))
    else:
        os.remove(local)
    side.update(state="done", samples=writer.samples, bytes=size if writer.samples else 0, skipped=skipped,
                max_label=max(labels), captions=captions)
    storage.write_bytes(side_url, json.dumps(side).encode())
    return side


def _sidecar(storage: Storage, url: str) -> dict:
    name = url.rsplit("/", 1)[-1]
    try:
        side = json.loads(storage.read_bytes(url))
    except ValueError:
        side = None
    if not (isinstance(side, dict) and side.get("name") == name.replace(".meta.json", ".tar")
            and isinstance(side.get("keys"), list)):
        raise DataError(f"{url}: not a sidecar written by make-shards; {ONLY_OWN}")
    return side


def existing_work(storage: Storage, dest: str) -> dict[str, dict]:
    """The sidecars of the make-shards work at DEST, by shard name. Raises a DataError naming the first thing
    there that make-shards did not write: another file, a tar without its sidecar, another kind of index."""
    found = storage.contents(dest)
    names = {u.rstrip("/").rsplit("/", 1)[-1]: u for u in found}
    for name, url in names.items():
        if not OWN.fullmatch(name) or (name == TEXT_DIR and storage.contents(url) == [url]):  # text/ is a folder
            raise DataError(f"{url}: make-shards did not write this, and will not write beside it; {ONLY_OWN}")
        if name.endswith(".tar") and name.replace(".tar", ".meta.json") not in names:
            raise DataError(f"{url}: a shard without its sidecar {name.replace('.tar', '.meta.json')}, so not "
                            f"written by make-shards; {ONLY_OWN}")
    if INDEX in names:
        try:
            index = json.loads(storage.read_bytes(names[INDEX]))
        except ValueError:
            index = None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{names[INDEX]}: not an index written by make-shards ({FORMAT}); {ONLY_OWN}")
    return {n.replace(".meta.json", ".tar"): _sidecar(storage, u) for n, u in names.items() if n.endswith(".meta.json")}


def _done(storage: Storage, dest: str, sides: dict[str, dict], i: int, items: list[Item], options: dict,
          classes: list[str]) -> dict | None:
    side = sides.get(shard_name(i))
    if (not side or side["keys"] != [it.key for it in items] or side.get("options") != options
            or side.get("state") == "writing"):
        return None
    if side["samples"] and (size := storage.size(join(dest, shard_name(i)))) != side["bytes"]:
        log.warning("make-shards: %s %s; writing it again", shard_name(i), "is missing" if size is None else
                    f"has {size} bytes where {side['bytes']} were written")
        return None
    if side.get("inputs") != inputs_digest(items, classes):
        log.info("make-shards: %s: labels, captions, class names or source files changed since it was written; "
                 "writing it again", shard_name(i))
        return None
    if unread := [s["path"] for s in side.get("skipped", []) if s.get("retry")]:
        log.info("make-shards: %s: %d source files could not be read when it was written (%s); writing it again",
                 shard_name(i), len(unread), unread[0])
        return None
    return side


def make_shards(src: str, dest: str, *, shard_size_mb: float = 256.0, workers: int = 1, reencode: str = "none",
                max_side: int = 0, storage: Storage | None = None, progress: bool = True,
                class_names: list[str] | None = None, origin: str = "", embed: dict | None = None) -> dict:
    """Write SRC's videos to shards under DEST and return the index (also written as DEST/index.json).

    ``origin`` (e.g. the synthetic set's parameters) is recorded with the options in every sidecar and the index.
    ``embed``: keyword arguments of :func:`~data_pipeline.text_shards.embed_shards` (``encode``, ``encoder_meta``,
    optionally ``dtype``, ``batch``) to also write the captions' embeddings to DEST/text once all shards are
    written (resumable like the shards; its options are checked against earlier embeddings before any shard).
    """
    if reencode not in ("none", "non-mp4", "all"):
        raise ValueError(f"reencode: must be none, non-mp4 or all; got {reencode!r}")
    storage = storage or Storage()
    if not is_s3(dest):
        blocking = next((p for p in (dest, *Path(dest).parents) if os.path.exists(p) and not os.path.isdir(p)), None)
        if blocking is not None:
            raise DataError(f"{dest}: {blocking} is a file; make-shards writes shards into a folder")
    items, classes = load_sources(src)
    classes = list(class_names) if class_names else classes
    existing = existing_work(storage, dest)
    if embed:
        from .text_shards import embed_shards, text_options, existing_work as text_work  # noqa: PLC0415 (imports us)

        text_work(storage, join(dest, TEXT_DIR), text_options(embed["encoder_meta"], embed.get("dtype", "bfloat16")))
    storage.check_writable(dest)
    options = {"reencode": reencode, "max_side": int(max_side)} | ({"origin": origin} if origin else {})
    groups = plan_shards(items, int(shard_size_mb * (1 << 20)))
    sides: dict[int, dict] = {}
    for i, g in enumerate(groups):
        side = _done(storage, dest, existing, i, g, options, classes)
        if side is not None:
            sides[i] = side
    todo = [i for i in range(len(groups)) if i not in sides]
    if sides:
        log.info("make-shards: %d of %d shards already written, resuming", len(sides), len(groups))
    if todo:  # the index of an earlier run would describe shards about to change: readers wait for the new one
        storage.remove(join(dest, INDEX))
    tmpdir = storage.local_tmpdir(dest)
    bar = tqdm(total=len(items), initial=sum(len(groups[i]) for i in sides), unit="video", disable=not progress,
               desc="make-shards")
    try:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                sides[i] = write_shard(storage, dest, i, groups[i], options, classes, tmpdir)
                bar.update(len(groups[i]))
        else:
            with worker_pool(min(workers, len(todo))) as pool:
                futs = {pool.submit(write_shard, storage, dest, i, groups[i], options, classes, tmpdir): i for i in todo}
                for fut in as_completed(futs):
                    sides[futs[fut]] = fut.result()
                    bar.update(len(groups[futs[fut]]))
    finally:
        bar.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    index = {
        "format": FORMAT,
        "shards": [{"name": sides[i]["name"], "samples": sides[i]["samples"], "bytes": sides[i]["bytes"]}
                   for i in range(len(groups)) if sides[i]["samples"]],
        "num_samples": sum(s["samples"] for s in sides.values()),
        "class_names": classes,
        "skipped": [s for i in range(len(groups)) for s in sides[i]["skipped"]],
        "options": options,
    }
    if all("max_label" in s for s in sides.values()):  # sidecars of older versions do not say
        index["max_label"] = max((s["max_label"] for s in sides.values()), default=-1)
    storage.write_bytes(join(dest, INDEX), json.dumps(index, indent=1).encode())
    if index["skipped"] and not index["num_samples"]:  # a run on it would only fail later, with less to go on
        first = index["skipped"][0]
        raise DataError(f"none of the {len(index['skipped'])} videos of {src} could be read (each is listed with its "
                        f"reason in {join(dest, INDEX)}; the first, {first['path']}: {first['reason']})")
    if index["skipped"]:
        log.warning("make-shards: %d videos could not be read and were left out (listed in index.json)", len(index["skipped"]))
    if embed:
        embed_shards(dest, out=join(dest, TEXT_DIR), storage=storage, progress=progress, **embed)
    return index
