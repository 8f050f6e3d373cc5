"""Resolve ``data.shards`` to a list of shard URLs: a folder/prefix with ``index.json``, a brace pattern
(``s3://b/p/shard-{000000..000099}.tar``), or a folder/prefix whose ``*.tar`` files are listed."""
from __future__ import annotations

import json

from braceexpand import braceexpand

from .shards_write import INDEX
from .storage import Storage, StorageError, join


def load_index(storage: Storage, spec: str) -> dict | None:
    """The index under ``spec``, or None if it has none."""
    if "{" in spec or spec.endswith(".tar"):
        return None
    url = join(spec, INDEX)
    if not storage.exists(url):
        return None
    return json.loads(storage.read_bytes(url))


def resolve_shards(storage: Storage, spec: str) -> tuple[list[str], list[int | None]]:
    """Shard URLs in a fixed order, and their sample counts where an index says them."""
    if "{" in spec or spec.endswith(".tar"):
        urls = list(braceexpand(spec))
        return urls, [None] * len(urls)
    index = load_index(storage, spec)
    if index is not None:
        return [join(spec, s["name"]) for s in index["shards"]], [s["samples"] for s in index["shards"]]
    urls = storage.list(spec, ".tar")
    if not urls:
        raise StorageError(f"{spec}: no index.json and no .tar shards; write some with `hpdm make-shards`")
    return urls, [None] * len(urls)
