"""``hpdm make-shards SRC DEST``: the command-line face of :func:`data_pipeline.make_shards`."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from .shards_write import make_shards
from .storage import Storage, StorageError
from .stream import DataError


def number_at_least(low: float, kind: type = int, strict: bool = False):
    """An argparse ``type``: a finite ``kind`` >= ``low`` (> with ``strict``); argparse names the option when not."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            kind_name = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind_name}; got {text!r}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}; got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder of videos (Class/clip.avi gives labels) or a .jsonl/.csv manifest "
                                    "with path and caption or label")
    parser.add_argument("dest", help="local folder or s3://bucket/prefix")
    parser.add_argument("--shard-size-mb", type=number_at_least(0, float, strict=True), default=256.0,
                        help="target shard size (default 256)")
    parser.add_argument("--workers", type=number_at_least(1), default=max(1, (os.cpu_count() or 2) // 2),
                        help="parallel shard writers (default: half the CPUs)")
    parser.add_argument("--reencode", choices=("none", "non-mp4", "all"), default="none",
                        help="re-encode to H.264 mp4: never (store original bytes, default), only non-mp4 inputs, or all")
    parser.add_argument("--max-side", type=number_at_least(0), default=0,
                        help="re-encode videos whose long side exceeds this (0: never)")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, embed: dict | None = None) -> int:
    """Write the shards (and with ``embed``, the captions' embeddings: see :func:`make_shards`); user errors
    (DataError, StorageError) propagate to the caller, which prints them."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    index = make_shards(args.src, args.dest, shard_size_mb=args.shard_size_mb, workers=args.workers,
                        reencode=args.reencode, max_side=args.max_side, storage=Storage(args.endpoint_url),
                        progress=not args.no_progress, embed=embed)
    text = f", their captions' embeddings in {args.dest.rstrip('/')}/text" if embed else ""
    shards = len(index["shards"])
    print(f"make-shards: {index['num_samples']} clips (videos or images) in {shards} shard{'s' * (shards != 1)} at "
          f"{args.dest} ({len(index['class_names'])} classes, {len(index['skipped'])} unreadable files left out{text})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpdm make-shards", description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (DataError, StorageError) as exc:  # bad sources, a destination with other files, storage
        print(f"hpdm make-shards: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
