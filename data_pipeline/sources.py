"""What ``make-shards`` reads: a folder of videos or a JSONL/CSV manifest, as a sorted list of items.

Folder: every video file below SRC. When all of them sit exactly one folder deep (UCF-101's
``Class/clip.avi``), the folder names are the classes (sorted) and give the labels; otherwise the videos
are unlabelled.

Manifest (``.jsonl`` or ``.csv``): one video per row with ``path`` (relative to the manifest's folder or
absolute) and optionally ``caption`` and ``label``. Labels are integers, or class names that are sorted and
numbered; integer labels take their names from ``classes.txt`` beside the manifest if there is one.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass

from .video import VIDEO_EXTS


@dataclass
class Item:
    key: str  # sample key inside the shards: the relative path without extension, dots replaced
    path: str
    label: int = -1
    caption: str = ""


class SourceError(ValueError):
    """A malformed source folder or manifest; the message names the file and line."""


def sample_key(rel: str) -> str:
    stem = os.path.splitext(rel)[0].replace(os.sep, "/")
    return re.sub(r"[^A-Za-z0-9_/\-]", "_", stem)


def from_folder(src: str) -> tuple[list[Item], list[str]]:
    paths = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, f) for f in files if f.rsplit(".", 1)[-1].lower() in VIDEO_EXTS]
    rels = sorted(os.path.relpath(p, src) for p in paths)
    if not rels:
        raise SourceError(f"{src}: no video files ({', '.join(VIDEO_EXTS)}) found")
    labelled = all(r.count(os.sep) == 1 for r in rels)
    classes = sorted({r.split(os.sep)[0] for r in rels}) if labelled else []
    lookup = {c: i for i, c in enumerate(classes)}
    items = [Item(sample_key(r), os.path.join(src, r), lookup[r.split(os.sep)[0]] if labelled else -1) for r in rels]
    keys: dict[str, str] = {}
    for item, rel in zip(items, rels):
        if item.key in keys:  # e.g. a.avi and a.mp4: one tar record would silently mix them
            raise SourceError(f"{src}: {keys[item.key]!r} and {rel!r} map to the same sample key {item.key!r}; rename one")
        keys[item.key] = rel
    return items, classes


def _rows(path: str):
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            for n, row in enumerate(csv.DictReader(f), start=2):
                yield n, row
        else:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"{path}:{n}: not JSON ({exc.msg})") from exc


def from_manifest(path: str) -> tuple[list[Item], list[str]]:
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    for n, row in _rows(path):
        if not row.get("path"):
            raise SourceError(f"{path}:{n}: missing 'path'")
        label = row.get("label", "")
        rows.append((n, row["path"], "" if label is None else label, str(row.get("caption") or "")))
    named = [lab for _, _, lab, _ in rows if isinstance(lab, str) and lab != "" and not lab.lstrip("-").isdigit()]
    classes = sorted(set(named))
    if not classes and os.path.exists(os.path.join(base, "classes.txt")):
        with open(os.path.join(base, "classes.txt")) as f:
            classes = [line.strip() for line in f if line.strip()]
    lookup = {c: i for i, c in enumerate(classes)}
    items, seen = [], set()
    for n, p, label, caption in rows:
        if isinstance(label, str) and label in lookup:
            label = lookup[label]
        elif label == "":
            label = -1
        else:
            try:
                label = int(label)
            except ValueError:
                raise SourceError(f"{path}:{n}: label {label!r} is neither an integer nor a class name") from None
        full = p if os.path.isabs(p) else os.path.join(base, p)
        key = sample_key(p if not os.path.isabs(p) else os.path.relpath(p, base))
        if key in seen:
            raise SourceError(f"{path}:{n}: duplicate video {p!r}")
        seen.add(key)
        items.append(Item(key, full, label, caption))
    if not items:
        raise SourceError(f"{path}: manifest lists no videos")
    return sorted(items, key=lambda i: i.key), classes


def load_sources(src: str) -> tuple[list[Item], list[str]]:
    """Items sorted by key, and the class names (empty when unlabelled)."""
    if os.path.isdir(src):
        return from_folder(src)
    if os.path.isfile(src) and src.endswith((".jsonl", ".json", ".csv")):
        return from_manifest(src)
    raise SourceError(f"{src}: not a folder of videos nor a .jsonl/.csv manifest")
