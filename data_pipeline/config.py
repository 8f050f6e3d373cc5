"""Typed settings of the data pipeline (the ``data:`` section of a run config)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .storage import without_userinfo


@dataclass
class DataConfig:
    shards: str = "data/synthetic"  # folder or s3://bucket/prefix holding index.json, or a brace pattern of .tar shards
    synthetic: bool = False  # write the synthetic moving-shapes dataset to `shards` first if it has no index
    synthetic_videos: int = 512  # clips of the synthetic dataset
    num_workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    shuffle_buffer: int = 256  # samples buffered per worker for shuffling (0: shard order)
    frame_stride: int = 1  # take every n-th frame (after fps resampling)
    fps: float = 0.0  # resample clips to this frame rate; 0 keeps the native rate
    flip: bool = True  # random horizontal flip in training (must be off for the synthetic set: see validate)
    max_skip_fraction: float = 0.05  # stop the job when more of the samples seen so far were bad
    endpoint_url: str = ""  # S3-compatible endpoint; empty: AWS_ENDPOINT_URL or AWS itself
    skip_check_after: int = 50  # samples a rank (or a worker) must have seen before max_skip_fraction applies
    prefetch: int = 2  # batches each DataLoader worker prepares ahead
    decode_threads: int = 1  # FFmpeg threads per decoder (1: the DataLoader workers are the parallelism)
    io_retries: int = 4  # retries of a transient storage error, with exponential backoff (and, unless 0, for a minute)
    io_backoff: float = 0.5  # seconds before the first retry; doubles each time, up to 8 s
    io_timeout: float = 20.0  # seconds an S3 request may wait for the server's answer or more bytes (then retried)
    # model.cond: text reads captions' embeddings from shards written by `hpdm embed-text` (default: SHARDS/text),
    # or, when text_encoder is set, encodes captions on the fly with that frozen Hugging Face encoder.
    text_embeddings: str = ""
    text_encoder: str = ""  # a local Hugging Face encoder folder or cache name, for captions on the fly
    # Joint image-video training (HPDM's T2V batch: 4096 videos + 4096 images): shards of still images (folder,
    # s3:// prefix or brace pattern; empty: videos only), each image repeated along time into a still clip.
    image_shards: str = ""
    image_batch_fraction: float = 0.5  # share of every micro-batch that is still images (see loader.split_batch)

    def validate(self) -> None:
        # the data package does not depend on hpdm at import
        from hpdm.config import ConfigError, check_range  # noqa: PLC0415

        for key in ("synthetic_videos", "frame_stride", "prefetch", "decode_threads"):
            check_range(f"data.{key}", getattr(self, key), 1)
        for key in ("num_workers", "shuffle_buffer", "skip_check_after", "io_retries", "fps", "io_backoff"):
            check_range(f"data.{key}", getattr(self, key), 0)
        check_range("data.io_timeout", self.io_timeout, 0, strict=True)
        check_range("data.image_batch_fraction", self.image_batch_fraction, 0, high=1)
        if self.image_shards and not self.image_batch_fraction:
            raise ConfigError("data.image_batch_fraction", "must be > 0 when data.image_shards is set "
                                                           f"({self.image_shards}), or its images are never read; got 0")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError("data.max_skip_fraction", f"must be in [0, 1]; got {self.max_skip_fraction}")
        if self.synthetic and self.flip:
            raise ConfigError("data.flip", "must be false with data.synthetic: a horizontal flip turns a shape moving "
                                           "left into one moving right while its class label stays")
        if not self.shards:
            raise ConfigError("data.shards", "must name a folder, an s3:// prefix or a brace pattern of .tar shards")
        for key in ("shards", "text_embeddings", "image_shards"):  # recorded as found, whatever the folder of a resume
            value = getattr(self, key)
            if value and not value.startswith("s3://"):
                setattr(self, key, os.path.abspath(os.path.expanduser(value)))
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError("data.endpoint_url", f"must start with http:// or https://; got {self.endpoint_url!r}")
        if without_userinfo(self.endpoint_url) != self.endpoint_url:  # botocore refuses it as "not a valid URI"
            raise ConfigError("data.endpoint_url", f"{without_userinfo(self.endpoint_url)} is given with a user and "
                                                   "password, which S3 clients cannot use: give the credentials "
                                                   "through AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
