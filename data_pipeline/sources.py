"""What ``make-shards`` reads: a folder of videos or a JSONL/CSV manifest, as a sorted list of items.

Folder: every video and image file below SRC (VIDEO_EXTS, OTHER_VIDEO_EXTS, IMAGE_EXTS; linked folders followed,
other files counted and named in a warning). When all of them sit exactly one folder
deep (UCF-101's ``Class/clip.avi``), the folder names are the classes (sorted) and give the labels; when none
does, they are unlabelled; a mixture is refused (a stray file would silently unlabel the whole set).

Manifest (``.jsonl`` or ``.csv``): one video or image per row with ``path`` (relative to the manifest's folder or
absolute) and optionally ``caption`` and ``label``. Labels are integers (-1 or empty: none), or class names, never
both in one manifest. A ``classes.txt`` beside the manifest (one name per line) fixes the numbering: integer labels
must be below its number of lines, class names must be among its lines and get their line's number, so every
manifest of a dataset (train, val) numbers classes alike. Without one, class names are sorted and numbered. Every
line is checked; an error names the manifest and the line.

Sample keys are the relative paths without extension, with characters other than letters, digits, ``_``, ``-``
and ``/`` replaced by ``_`` (letters and digits of any script are kept).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass

from .stream import DataError
from .video import IMAGE_EXTS, OTHER_VIDEO_EXTS, VIDEO_EXTS

log = logging.getLogger(__name__)
READ = VIDEO_EXTS + OTHER_VIDEO_EXTS + IMAGE_EXTS


@dataclass
class Item:
    key: str  # sample key inside the shards: the relative path without extension, dots replaced
    path: str
    label: int = -1
    caption: str = ""


class SourceError(DataError, ValueError):
    """A malformed source folder or manifest; the message names the file and line."""


def sample_key(rel: str) -> str:
    stem = unicodedata.normalize("NFC", os.path.splitext(os.path.normpath(rel))[0].replace(os.sep, "/"))
    return re.sub(r"[^\w/\-]", "_", stem)


def _walk(src: str) -> tuple[list[str], list[str]]:
    """Paths below ``src`` of the files make-shards reads, and of the others (hidden ones aside); folders that are
    links are followed, once each (a link back up would be walked forever)."""
    paths, others, walked, unreadable = [], [], {}, []
    for root, dirs, files in os.walk(src, followlinks=True, onerror=unreadable.append):
        real = os.path.realpath(root)
        if real in walked:
            log.warning("make-shards: %s leads to %s, which was read already (as %s): not read again", root, real,
                        walked[real])
            dirs[:] = []
            continue
        walked[real] = root
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith("."):
                (paths if f.rsplit(".", 1)[-1].lower() in READ else others).append(os.path.join(root, f))
    if unreadable:  # left out, a class folder would vanish and the classes after it be renumbered
        shown = "; ".join(f"{e.filename}: {e.strerror}" for e in unreadable[:3])
        raise SourceError(f"{len(unreadable)} folder(s) below {src} cannot be listed ({shown}"
                          f"{'; ...' if len(unreadable) > 3 else ''}): fix their permissions, or move them out")
    return paths, others


def from_folder(src: str) -> tuple[list[Item], list[str]]:
    paths, others = _walk(src)
    if others:  # subtitles, notes, formats not known here (a manifest may list any file that PyAV reads)
        shown = ", ".join(sorted(os.path.relpath(p, src) for p in others)[:3])
        log.warning("make-shards: %d files below %s are neither videos nor images by their extension and are left "
                    "out (%s%s)", len(others), src, shown, ", ..." if len(others) > 3 else "")
    rels = sorted(os.path.relpath(p, src) for p in paths)
    if not rels:
        raise SourceError(f"{src}: no video or image files ({', '.join(READ)}) found")
    one_deep = [r.count(os.sep) == 1 for r in rels]
    labelled = all(one_deep)
    if any(one_deep) and not labelled:
        stray = [r for r, d in zip(rels, one_deep) if not d]
        raise SourceError(f"{src}: {sum(one_deep)} files sit one folder deep (a folder per class) but {len(stray)} do "
                          f"not ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}), so the folders cannot "
                          "name the classes: move those, or list the videos and their labels in a manifest")
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
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel's CSV) is not text
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
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise SourceError(f"{path}:{n}: caption {caption!r} is not a string")
        rows.append((n, p, label, caption or ""))
    classes = sorted({lab for _, _, lab, _ in rows if isinstance(lab, str)})
    names_file = os.path.join(base, "classes.txt")
    if os.path.exists(names_file):
        with open(names_file, encoding="utf-8-sig") as f:
            listed = [line.strip() for line in f if line.strip()]
        twice = sorted({c for c in listed if listed.count(c) > 1})
        if twice:
            raise SourceError(f"{names_file}: {', '.join(map(repr, twice))} listed more than once")
        for n, _, label, _ in rows:
            if isinstance(label, str) and label not in listed:
                raise SourceError(f"{path}:{n}: class {label!r} is not in {names_file}, which fixes the classes' "
                                  f"numbers ({len(listed)} lines); add it there")
            if isinstance(label, int) and label >= len(listed):
                raise SourceError(f"{path}:{n}: label {label} but {names_file} names only {len(listed)} classes "
                                  f"(labels 0..{len(listed) - 1})")
        classes = listed if any(lab != -1 for _, _, lab, _ in rows) else []
    lookup = {c: i for i, c in enumerate(classes)}
    items, seen = [], {}
    for n, p, label, caption in rows:
        full = p if os.path.isabs(p) else os.path.join(base, p)
        key = sample_key(p if not os.path.isabs(p) else os.path.relpath(p, base))
        if key in seen:
            m, other, other_full = seen[key]
            same = os.path.normpath(full) == os.path.normpath(other_full)
            raise SourceError(f"{path}:{n}: {p!r} is line {m}'s video again" if same else
                              f"{path}:{n}: {p!r} and line {m}'s {other!r} map to the same sample key {key!r}; rename one")
        seen[key] = (n, p, full)
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
