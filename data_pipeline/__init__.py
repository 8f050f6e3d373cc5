"""Video data for HPDM: shard writing, object storage, streaming, video decoding, and the synthetic dataset.

Entry points for the trainer: :func:`prepare_dataset` (rank 0) and :func:`build_loader` (every rank);
for the CLI: :func:`make_shards` (``hpdm make-shards``, see ``data_pipeline.cli``).
"""
from .config import DataConfig
from .loader import JointLoader, VideoLoader, build_loader, build_train_loader, split_batch
from .shards_write import make_shards
from .storage import Storage, StorageError
from .stream import DataError
from .synthetic import prepare_dataset

__all__ = ["DataConfig", "DataError", "JointLoader", "Storage", "StorageError", "VideoLoader", "build_loader",
           "build_train_loader", "make_shards",
           "prepare_dataset", "split_batch"]
