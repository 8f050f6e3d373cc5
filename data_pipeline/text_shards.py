"""``embed-text``: the captions' text embeddings, precomputed once, as a set of shards parallel to the video shards.

For every video shard ``NAME.tar`` of SHARDS, ``EMB/NAME.tar`` (EMB defaults to ``SHARDS/text``) holds the same
keys in the same order, one ``KEY.safetensors`` member per sample: ``{"text": [n_tokens, width]}`` with only
the caption's real tokens (no padding), in bfloat16 or float16. The loader reads both tars in lockstep.

Why parallel shards rather than video shards rewritten with embeddings inside: video bytes are never copied
again (on S3, rewriting terabytes of video takes hours and doubles the storage while it runs), the embeddings
of another encoder sit beside the first in another folder, and the embedding tars are small and written with
make-shards' resumable scheme: a ``NAME.meta.json`` sidecar written "writing" before the tar and "done" after
it, so a rerun redoes only unfinished shards, and ``EMB/index.json`` written last.

The encoder (its name and ``digest``, see hpdm.text_encoder.encoder_digest), max_tokens and dtype are part of
the set's identity: a rerun with other options over existing embeddings is refused (never mixed, never
overwritten). Every embedding shard records what it was made from (``source``: its captions' digest; ``bytes``:
the video tar's size; ``mtime`` too for a local tar without a make-shards sidecar) and the index ``videos``, the
video shards' location: a rerun redoes a shard whose video shard changed, but refuses to replace the
embeddings of another location's videos, and training refuses embeddings that do not match the video shards
(``check_made_from``). Captions come from the make-shards sidecars when they list them (no video byte is read),
otherwise from the ``.json`` members streamed from the video tars.
Encoders are passed in as an ``encode(captions) -> (emb [N,S,W], mask [N,S])`` callable: this package does
not depend on hpdm.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from typing import Callable

import torch
from tqdm import tqdm

from .shardlist import is_pattern, resolve_shards
from .shards_write import TEXT_DIR
from .storage import Storage, is_s3, join, summary
from .stream import DataError
from .tario import TarWriter, iter_records

log = logging.getLogger(__name__)
INDEX = "index.json"
FORMAT = "hpdm-text/1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# What embed-text leaves at EMB: tars, sidecars, the index, and leftovers of interrupted writes.
OWN = re.compile(r"[^/]+\.tar|[^/]+\.meta\.json|index\.json|.+\.json\.tmp\d+|\.hpdm-tmp-.+|\.hpdm-write-check")
ONLY_OWN = "write the embeddings to an empty folder or prefix with --out (embed-text only resumes its own work there)"
WHAT = {"samples": "sample count", "bytes": "size", "source": "keys or captions"}  # what check_made_from compares
SPOT_CHECKS = 16  # video sidecars read at training start on S3 (every one where local)
Encode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def default_location(shards: str) -> str:
    """``SHARDS/text``; a pattern of shards has no folder of its own, so its embeddings need an explicit place."""
    if is_pattern(shards):
        raise DataError(f"{shards}: a pattern of shards has no folder for the embeddings; give one with --out")
    return join(shards, TEXT_DIR)


def text_shard_urls(video_urls: list[str], emb: str) -> list[str]:
    """The embedding shard of each video shard: the same basename under ``emb``."""
    seen: dict[str, str] = {}
    for url in video_urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name in seen:
            raise DataError(f"{seen[name]} and {url} have the same name {name!r}, so their embeddings in {emb} would "
                            "be one file; rename one of the shards")
        seen[name] = url
    return [join(emb, name) for name in seen]


def read_text_index(storage: Storage, emb: str) -> dict:
    """The index of the embedding set at ``emb``; a DataError says how to write one when it is missing."""
    url = join(emb, INDEX)
    if not storage.exists(url):
        raise DataError(f"{emb}: no text embeddings there (no {INDEX}); run `hpdm embed-text SHARDS --encoder PATH`"
                        + ("" if emb.endswith("/text") else f" --out {emb}"))
    try:
        index = json.loads(storage.read_bytes(url))
    except ValueError as exc:
        raise DataError(f"{url}: not a valid index ({exc}); run `hpdm embed-text` again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), dict):
        raise DataError(f"{url}: not an index of text embeddings written by `hpdm embed-text` ({FORMAT})")
    return index


def text_options(encoder_meta: dict, dtype: str) -> dict:
    """What identifies an embedding set: the encoder (and its digest, when given), its width, max_tokens and the
    stored dtype."""
    if dtype not in DTYPES:
        raise DataError(f"--dtype: must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return ({"encoder": encoder_meta["encoder"], "width": int(encoder_meta["width"]),
             "max_tokens": int(encoder_meta["max_tokens"]), "dtype": dtype}
            | ({"digest": encoder_meta["digest"]} if encoder_meta.get("digest") else {}))


def _setting(opts: dict, keys) -> str:
    return " ".join(f"{k}={opts.get(k)}" for k in keys)


def videos_location(shards: str) -> str:
    """How the index names the video shards' location: absolute for a local folder (``./ds`` is ``/data/ds``)."""
    return shards.rstrip("/") if is_s3(shards) else os.path.abspath(shards)


def existing_work(storage: Storage, emb: str, options: dict) -> dict[str, dict]:
    """The sidecars at ``emb`` by shard name, after checking that everything there is embed-text's work with
    these ``options``; raises a DataError naming ``emb`` (and both settings when the options differ)."""
    found = {u.rstrip("/").rsplit("/", 1)[-1]: u for u in storage.contents(emb)}
    for name, url in found.items():
        if not OWN.fullmatch(name) or (name.endswith(".tar") and name[:-4] + ".meta.json" not in found):
            raise DataError(f"{url}: embed-text did not write this ({summary(list(found.values()))} at {emb}); "
                            f"{ONLY_OWN}")
    sides, videos = {}, None
    for name in ([INDEX] if INDEX in found else []) + [n for n in found if n.endswith(".meta.json")]:
        try:
            side = json.loads(storage.read_bytes(found[name]))
        except ValueError:
            side = None
        if not isinstance(side, dict) or side.get("format") != FORMAT:
            raise DataError(f"{found[name]}: not written by embed-text ({FORMAT}); {ONLY_OWN}")
        theirs = {k: side.get(k) for k in options}
        if theirs != options:
            raise DataError(f"{emb} holds embeddings made with {_setting(theirs, options)}, not "
                            f"{_setting(options, options)}; embeddings are never mixed or overwritten: write these to "
                            "another folder with --out")
        if name == INDEX:
            videos = side.get("videos")  # for sidecars of versions that did not record it
        elif side.get("name") in found:  # a sidecar whose tar is gone: that shard is redone
            sides[side["name"]] = {"videos": videos} | side
    return sides


def _video_sidecar(storage: Storage, url: str) -> dict | None:
    """make-shards' finished sidecar of the video shard ``url`` when it lists the captions, else None."""
    side_url = url[: -len(".tar")] + ".meta.json" if url.endswith(".tar") else ""
    if not side_url or not storage.exists(side_url):
        return None
    try:
        side = json.loads(storage.read_bytes(side_url))
    except ValueError:
        return None
    ok = isinstance(side, dict) and side.get("state") == "done" and isinstance(side.get("captions"), list)
    return side if ok and len(side["captions"]) == len(side.get("keys", ())) else None


def read_captions(storage: Storage, url: str, side: dict | None = None) -> tuple[list[str], list, str]:
    """(keys, captions, error) of video shard ``url`` in tar order: from make-shards' sidecar ``side`` (None for
    a video left out), else from the tar's ``.json`` members (``error``: why the tar ended early, or "")."""
    if side is not None:
        pairs = [(k, c) for k, c in zip(side["keys"], side["captions"]) if c is not None]
        return [k for k, _ in pairs], [c for _, c in pairs], ""
    keys, captions, error = [], [], ""
    with storage.open(url) as reader:
        for rec in iter_records(reader):
            if rec.error:  # the loader reads the samples before this point, so they are embedded
                error = rec.error
                break
            try:
                caption = json.loads(rec.fields["json"]).get("caption") if "json" in rec.fields else None
            except (ValueError, AttributeError):
                caption = None
            keys.append(rec.key)
            captions.append(caption)
    return keys, captions, error


def _check_captions(url: str, keys: list[str], captions: list) -> None:
    for key, caption in zip(keys, captions):
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{url}: sample {key!r} has no caption; give every video a caption in the manifest "
                            "and run `hpdm make-shards` again into the same folder (it writes again the shards whose "
                            "captions changed)")


def _fingerprint(keys: list[str], captions: list) -> str:
    return hashlib.sha256(json.dumps([keys, captions]).encode()).hexdigest()


def _stat(storage: Storage, url: str) -> dict:
    """A video tar's size, and its mtime where local (S3 copies get new times, so only the size there)."""
    if is_s3(url):
        return {"bytes": int(storage.retry(lambda: storage.s3.info(url[len("s3://"):]), url, "checking")["size"]),
                "mtime": None}
    st = os.stat(url)
    return {"bytes": st.st_size, "mtime": st.st_mtime_ns}


def _identity(storage: Storage, url: str, known: dict) -> dict:
    """What a finished embedding shard must have recorded to be of video shard ``url`` as it is now: the digest of
    the captions make-shards' sidecar lists, else the tar's size (and mtime)."""
    return {"source": _fingerprint(*known[url][:2])} if url in known else _stat(storage, url)


def _made_from(old: dict, identity: dict) -> bool:
    return all(old.get(k) == v for k, v in identity.items())


def _to_bytes(t: torch.Tensor) -> bytes:
    from safetensors.torch import save  # noqa: PLC0415

    return save({"text": t.contiguous()})


def write_text_shard(storage: Storage, emb: str, url: str, keys: list[str], captions: list[str], encode: Encode,
                     options: dict, batch: int, tmpdir: str, bar: tqdm, **extra) -> dict:
    """Embed one video shard's captions into ``emb/NAME.tar`` between its two sidecar writes; return the sidecar."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    side_url = join(emb, name[: -len(".tar")] + ".meta.json")
    side = {"format": FORMAT, "name": name, "video_shard": name, **options, "state": "writing", **extra}
    storage.write_bytes(side_url, json.dumps(side).encode())  # so a tar at EMB always has a sidecar
    local = f"{tmpdir}/{name}"
    writer = TarWriter(local)
    for i in range(0, len(keys), batch):
        raw, mask = encode(captions[i:i + batch])
        emb_, mask = raw.detach().to("cpu", DTYPES[options["dtype"]]), mask.detach().cpu().bool()
        if emb_.shape[-1] != options["width"]:
            raise DataError(f"the encoder gave {emb_.shape[-1]}-wide embeddings, not the {options['width']} it declared")
        if not (finite := torch.isfinite(emb_).flatten(1).all(1)).all():
            key, peak = keys[i + int((~finite).nonzero()[0])], raw.detach().abs().max().item()
            raise DataError(f"--dtype {options['dtype']}: the embedding of {url} sample {key!r} is not finite in "
                            f"{options['dtype']} (the encoder's largest value is {peak:.4g}); "
                            + ("use --dtype bfloat16" if options["dtype"] == "float16" and math.isfinite(peak)
                               else "the encoder itself gives non-finite values: check it, or try it in float32"))
        for key, e, m in zip(keys[i:i + batch], emb_, mask):
            writer.write(key, {"safetensors": _to_bytes(e[m])})  # the real tokens only: padding is not stored
        bar.update(len(emb_))
    writer.close()
    storage.put_file(local, join(emb, name))
    side.update(state="done", samples=writer.samples, keys=len(keys))
    storage.write_bytes(side_url, json.dumps(side).encode())
    return side


def embed_shards(shards: str, encode: Encode, encoder_meta: dict, out: str | None = None, batch: int = 64,
                 dtype: str = "bfloat16", storage: Storage | None = None, progress: bool = True) -> dict:
    """Write the caption embeddings of every video shard of ``shards`` to ``out`` (default ``SHARDS/text``) and
    return the index (also written as ``out/index.json``). ``encoder_meta``: {"encoder", "width", "max_tokens",
    "digest"}."""
    options = text_options(encoder_meta, dtype)
    if batch < 1:
        raise DataError(f"--batch: must be >= 1; got {batch}")
    storage = storage or Storage()
    emb = (out or default_location(shards)).rstrip("/")
    if emb == shards.rstrip("/"):
        raise DataError(f"--out {emb}: is where the video shards are; embeddings go to their own folder "
                        "(default SHARDS/text)")
    urls, counts = resolve_shards(storage, shards)
    names = [u.rsplit("/", 1)[-1] for u in text_shard_urls(urls, emb)]
    if bad := [n for n in names if not n.endswith(".tar")]:
        raise DataError(f"{shards}: shard {bad[0]!r} does not end in .tar")
    existing = existing_work(storage, emb, options)
    known, sizes = {}, {}  # captions that make-shards' sidecars list: checked for all shards before anything is written
    for url in urls:
        if (vside := _video_sidecar(storage, url)) is not None:
            known[url], sizes[url] = read_captions(storage, url, vside), vside.get("bytes")
            _check_captions(url, *known[url][:2])
    here = videos_location(shards)
    identity = {url: _identity(storage, url, known) for url, name in zip(urls, names)
                if existing.get(name, {}).get("state") == "done"}
    for url, name in zip(urls, names):  # outdated embeddings are redone, but only those of these videos
        old = existing.get(name)
        if url in identity and not _made_from(old, identity[url]) and old.get("videos") not in (None, here):
            raise DataError(f"{emb} holds the embeddings of the video shards at {old['videos']}, not of {here} "
                            f"({name} differs): write these to another folder with --out (or delete {emb} to redo "
                            "it for these videos)")
    storage.check_writable(emb)
    total = sum(counts) if all(c is not None for c in counts) else None
    bar = tqdm(total=total, unit="caption", disable=not progress, desc="embed-text")
    tmpdir = storage.local_tmpdir(emb)
    sides, redone = {}, 0
    try:
        for url, name in zip(urls, names):
            old = existing.get(name)
            if url in identity and _made_from(old, identity[url]):  # finished, from the video shard as it is now
                sides[name] = old
                bar.update(old["samples"])
                continue
            keys, captions, error = known.get(url) or read_captions(storage, url)
            _check_captions(url, keys, captions)
            if error:
                log.warning("embed-text: %s ends early (%s); embedding its %d readable samples", url, error, len(keys))
            redone += old is not None
            made_from = ({"bytes": sizes[url]} if url in known else _stat(storage, url)) | {
                "source": _fingerprint(keys, captions), "videos": here}
            sides[name] = write_text_shard(storage, emb, url, keys, captions, encode, options, batch, tmpdir, bar,
                                           **made_from, **({"error": error} if error else {}))
    finally:
        bar.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    if redone:
        log.info("embed-text: rewrote %d unfinished or outdated shards at %s", redone, emb)
    index = {"format": FORMAT, **options, "videos": here,
             "shards": {n: {k: sides[n].get(k) for k in ("samples", "source", "bytes")} for n in names},
             "num_samples": sum(sides[n]["samples"] for n in names)}
    storage.write_bytes(join(emb, INDEX), json.dumps(index, indent=1).encode())
    return index


def check_made_from(storage: Storage, emb: str, index: dict, shards: str, urls: list[str],
                    video_index: dict | None) -> None:
    """Refuse embeddings that are not of the video shards ``urls`` as they are now. Cheap: the embedding index
    against the video index (samples, tar sizes), and against make-shards' sidecars (the captions) of every
    shard where local, of SPOT_CHECKS shards spread over the set on S3 (the video index does not list
    captions); a local tar without a sidecar by its size."""
    def refuse(problem: str):
        run = (f"hpdm embed-text {shards} --encoder {index['encoder']} --max-tokens {index['max_tokens']}"
               + ("" if index["dtype"] == "bfloat16" else f" --dtype {index['dtype']}"))
        if index.get("videos") not in (None, videos_location(shards)):
            raise DataError(f"{emb}: {problem}; they were made for the videos at {index['videos']}: give these videos "
                            f"their own with `{run} --out NEW` and data.text_embeddings=NEW")
        out = "" if emb == join(shards.rstrip("/"), TEXT_DIR) else f" --out {emb}"
        raise DataError(f"{emb}: {problem}; the videos changed since they were embedded: embed them again with "
                        f"`{run}{out}`")

    names = [url.rstrip("/").rsplit("/", 1)[-1] for url in urls]
    if missing := [n for n in names if n not in index["shards"]]:
        refuse(f"{missing[0]} has no text embeddings there ({len(missing)} of the {len(urls)} video shards have none)")
    listed = {s["name"]: s for s in (video_index or {}).get("shards", [])}
    step = max(1, len(urls) // SPOT_CHECKS) if urls and is_s3(urls[0]) else 1
    for i, (url, name) in enumerate(zip(urls, names)):
        now = {k: listed.get(name, {}).get(k) for k in ("samples", "bytes")}
        if i % step == 0:
            if (vside := _video_sidecar(storage, url)) is not None:
                now |= {"source": _fingerprint(*read_captions(storage, url, vside)[:2]), "bytes": vside.get("bytes")}
            elif not is_s3(url) and os.path.isfile(url):
                now["bytes"] = os.path.getsize(url)
        made = index["shards"][name]
        if differ := [WHAT[k] for k, v in now.items() if v is not None and made.get(k) not in (None, v)]:
            refuse(f"the embeddings of {name} do not match {url} (its {' and '.join(differ)} differ)")
