"""What ``make-shards`` reads: a folder of videos or a JSONL/CSV manifest, as a sorted list of items.

Folder: every video and image file below SRC (VIDEO_EXTS, IMAGE_EXTS). When all of them sit exactly one folder
deep (UCF-101's ``Class/clip.avi``), the folder names are the classes (sorted) and give the labels; otherwise
they are unlabelled.

Manifest (``.jsonl`` or ``.csv``): one video or image per row with ``path`` (relative to the manifest's folder or
absolute) and optionally ``caption`` and ``label``. Labels are integers (-1 or empty: none), or class names that
are sorted and numbered, never both in one manifest; integer labels take their names from ``classes.txt`` beside
the manifest if there is one (and must be below its number of lines). Every line is checked; an error names the
manifest and the line.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass

from .stream import DataError
from .video import IMAGE_EXTS, VIDEO_EXTS


@dataclass
class Item:
    key: str  # sample key inside the shards: the relative path without extension, dots replaced
    path: str
    label: int = -1
    caption: str = ""


class SourceError(DataError, ValueError):
    """A malformed source folder or manifest; the message names the file and line."""


def sample_key(rel: str) -> str:
    stem = os.path.splitext(rel)[0].replace(os.sep, "/")
    return re.sub(r"[^A-Za-z0-9_/\-]", "_", stem)


def from_folder(src: str) -> tuple[list[Item], list[str]]:
    paths = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, f) for f in files if f.rsplit(".", 1)[-1].lower() in VIDEO_EXTS + IMAGE_EXTS]
    rels = sorted(os.path.relpath(p, src) for p in paths)
    if not rels:
        raise SourceError(f"{src}: no video or image files ({', '.join(VIDEO_EXTS + IMAGE_EXTS)}) found")
    labelled = all(r.count(os.sep) == 1 for r in rels)
    classes = sorted({r.split(os.sep)[0] for r in rels}) if labelled else []
    lookup = {c: i for i, c in enumerate(classes)}
    items = [Item(sample_key(r), os.path.join(src, r), lookup[r.split(os.sep)[0]] if labelled else -1) for r in rels]
    keys: dict[str, str] = {}
    for item, rel in zip(items, rels):
        if item.key in keys:  # e.g. a.avi and a.mp4 (or a.jpg): one tar record would silently mix them
            raise SourceError(f"{src}: {keys[item.key]!r} and {rel!r} map to the same sample key {item.key!r}; rename one")
        keys[item.key] = rel
    return items, classes


def _rows(path: str):
    """(line number, row dict) of each record of a CSV or JSONL manifest."""
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            yield from enumerate(csv.DictReader(f), start=2)
            return
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise SourceError(f"{path}:{n}: not a JSON object (got {type(row).__name__}); write one object "
                                  '{"path": ..., "label": ..., "caption": ...} per line')
            yield n, row


def _label(path: str, n: int, label) -> int | str:
    """An integer label (-1: none) or a class name, from a manifest cell or JSON value."""
    if label is None or (isinstance(label, str) and not label.strip()):
        return -1
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, str):
        label = label.strip()
        label = int(label) if re.fullmatch(r"-?\d+", label) else label
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise SourceError(f"{path}:{n}: label {label!r} is neither an integer nor a class name")
    if isinstance(label, int) and label < -1:
        raise SourceError(f"{path}:{n}: label {label} is negative; use -1 or leave it empty for no label")
    return label


def from_manifest(path: str) -> tuple[list[Item], list[str]]:
    base = os.path.dirname(os.path.abspath(path))
    rows, first = [], {}  # is a class name -> (line, label) of the first such label
    for n, row in _rows(path):
        p = row.get("path")
        if not p or not isinstance(p, str):
            raise SourceError(f"{path}:{n}: missing 'path'" if not p else f"{path}:{n}: 'path' must be a string")
        label = _label(path, n, row.get("label"))
        named = isinstance(label, str)
        if label != -1:
            if (not named) in first:
                m, other = first[not named]
                raise SourceError(f"{path}:{n}: label {label!r} is {'a class name' if named else 'an integer'} but "
                                  f"line {m} has {other!r}; use class names on every line, or integers on every "
                                  "line (named by classes.txt)")
            first.setdefault(named, (n, label))
        rows.append((n, p, label, str(row.get("caption") or "")))
    classes = sorted({lab for _, _, lab, _ in rows if isinstance(lab, str)})
    names_file = os.path.join(base, "classes.txt")
    if not classes and os.path.exists(names_file):
        with open(names_file) as f:
            classes = [line.strip() for line in f if line.strip()]
        for n, _, label, _ in rows:
            if label >= len(classes):
                raise SourceError(f"{path}:{n}: label {label} but {names_file} names only {len(classes)} classes "
                                  f"(labels 0..{len(classes) - 1})")
    lookup = {c: i for i, c in enumerate(classes)}
    items, seen = [], set()
    for n, p, label, caption in rows:
        full = p if os.path.isabs(p) else os.path.join(base, p)
        key = sample_key(p if not os.path.isabs(p) else os.path.relpath(p, base))
        if key in seen:
            raise SourceError(f"{path}:{n}: duplicate video {p!r}")
        seen.add(key)
        items.append(Item(key, full, lookup[label] if isinstance(label, str) else label, caption))
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
