"""Resolve ``data.shards`` to a list of shard URLs: a folder/prefix with ``index.json``, a brace pattern
(``s3://b/p/shard-{000000..000099}.tar``), or a folder/prefix whose ``*.tar`` files are listed."""
from __future__ import annotations

import json
import os

from braceexpand import braceexpand

from .shards_write import INDEX
from .storage import Storage, StorageError, is_s3, join, summary
from .stream import DataError


def is_pattern(spec: str) -> bool:
    """``spec`` names shard files (a brace pattern or one ``.tar``), not a folder or prefix."""
    return "{" in spec or spec.endswith(".tar")


def load_index(storage: Storage, spec: str) -> dict | None:
    """The index under ``spec``, or None if it has none."""
    if is_pattern(spec):
        return None
    url = join(spec, INDEX)
    if not storage.exists(url):
        return None
    try:
        index = json.loads(storage.read_bytes(url))
    except ValueError as exc:
        raise DataError(f"{url}: not a valid index ({exc}); rewrite it with `hpdm make-shards`") from exc
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DataError(f"{url}: not a shard index (no list of shards); rewrite it with `hpdm make-shards`")
    for i, entry in enumerate(index["shards"]):
        name, n = (entry.get("name"), entry.get("samples", 0)) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or not name or not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"{url}: shard entry {i} is {json.dumps(entry)[:120]}, not {{\"name\": FILE, \"samples\": "
                            "COUNT}; rewrite the index with `hpdm make-shards`")
    if not index["shards"]:
        raise DataError(f"{url}: the index lists no shards; write some with `hpdm make-shards`")
    return index


def resolve_shards(storage: Storage, spec: str) -> tuple[list[str], list[int | None]]:
    """Shard URLs in a fixed order, and their sample counts where an index says them."""
    if is_pattern(spec):
        urls = list(braceexpand(spec))
        return urls, [None] * len(urls)
    if spec.rstrip("/").endswith("/" + INDEX) or spec == INDEX:
        raise DataError(f"{spec}: data.shards names the index file; give the folder or prefix that holds it")
    index = load_index(storage, spec)
    if index is not None:
        return [join(spec, s["name"]) for s in index["shards"]], [s.get("samples") for s in index["shards"]]
    found = storage.contents(spec)
    check_finished(spec, found)
    urls = [u for u in found if u.endswith(".tar")]
    if not urls:
        what = f"found {summary(found)}" if found else "nothing is there"
        raise StorageError(f"{spec}: no index.json and no .tar shards ({what}); write some with `hpdm make-shards`")
    return urls, [None] * len(urls)


def check_finished(spec: str, found: list[str]) -> None:
    """A DataError when ``found``, the files at ``spec`` without an index, hold make-shards' sidecars: its run was
    interrupted (or is rewriting shards), so the .tar files there are part of a dataset or a mix of two."""
    if any(u.endswith(".meta.json") for u in found):
        raise DataError(f"{spec}: `hpdm make-shards` into it did not finish (its shards are there but no {INDEX}); "
                        "run the same make-shards command again, which resumes")


def check_readable(urls: list[str]) -> None:
    """A StorageError naming the local shards that exist but that this user may not read: found at the start, not
    when training reaches them (hours in, and again after every resume)."""
    effective = os.access in os.supports_effective_ids
    denied = [u for u in urls if not is_s3(u) and os.path.exists(u) and not os.access(u, os.R_OK, effective_ids=effective)]
    if denied:
        raise StorageError(f"{len(denied)} of the {len(urls)} shards cannot be read by this user ({', '.join(denied[:3])}"
                           f"{', ...' if len(denied) > 3 else ''}): fix their owner or mode")
