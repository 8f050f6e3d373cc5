"""Run checkpoints: DeepSpeed's sharded engine state plus ours (EMA, progress, data position, RNG).

Layout under ``run_dir/checkpoints`` (mirrored to ``train.checkpoint_uri`` when that is an ``s3://`` prefix):

    step_00001000/   DeepSpeed's files (each rank writes its own shard), rank_00000.safetensors per rank
                     (RNG state; data-loader position in its metadata), ema.safetensors, raw.safetensors (the
                     consolidated raw weights, for sampling and export at any ZeRO stage), state.json
    latest           the name of the newest complete checkpoint

A checkpoint is complete once ``state.json`` exists, which rank 0 writes after every rank has finished its
files (and uploads); only then is ``latest`` replaced, atomically. A crash during a save therefore leaves the
previous checkpoint in force. Nothing is unpickled on load: DeepSpeed's files go through
``torch.load(weights_only=True)`` with an allow-list of DeepSpeed's plain-data classes; ours are safetensors
and JSON.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data_pipeline.storage import Storage, join
from hpdm.ema import full_parameters

log = logging.getLogger(__name__)
UNIVERSAL_MARK = "universal"  # file in a checkpoint folder converted by `hpdm convert-checkpoint`
RAW_FILE = "raw.safetensors"
_OWN_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_|^rank_(\d+)\.")  # files that rank N writes


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


def allow_deepspeed_globals() -> None:
    """Allow the plain-data classes that DeepSpeed puts in its state files through ``weights_only`` loads."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    torch.serialization.add_safe_globals([LossScaler, ZeroStageEnum, fragment_address])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (path / "state.json").is_file()


def is_universal(path: Path) -> bool:
    return (path / UNIVERSAL_MARK).is_file()


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, remote: str = "", storage: Storage | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.remote = keep, remote.rstrip("/")
        self.storage = storage or Storage()

    # -- finding ---------------------------------------------------------------------------------------
    def _local_latest(self) -> str:
        f = self.root / "latest"
        if not f.is_file():
            return ""
        tag = f.read_text().strip()
        if not is_complete(self.root / tag):
            raise FileNotFoundError(f"{f} names {tag}, which has no state.json: the checkpoint is incomplete")
        return tag

    def latest(self) -> Path | None:
        """The newest complete checkpoint, here or (when newer) in the remote copy, which is then fetched.

        Collective when a remote copy is configured: every rank calls it."""
        tag = self._local_latest()
        if self.remote and self.storage.exists(join(self.remote, "latest")):
            remote = self.storage.read_bytes(join(self.remote, "latest")).decode().strip()
            # a newer local one (e.g. converted by `hpdm convert-checkpoint`, step_N_universal > step_N) wins
            tag = max(tag, remote)
            need = torch.tensor([float(tag == remote and not is_complete(self.root / tag))])
            if dist.is_initialized():
                dist.all_reduce(need, op=dist.ReduceOp.MAX)
            if need.item():
                self._download(remote)
        return self.root / tag if tag else None

    def _download(self, tag: str) -> None:
        """Collective. Local rank 0 of every node without the folder fetches it (shared file systems once per node)."""
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not is_complete(self.root / tag):
            prefix = join(self.remote, tag)
            urls = self.storage.list(prefix)
            log.info("downloading checkpoint %s (%d files)", prefix, len(urls))
            for url in sorted(urls, key=lambda u: u.endswith("state.json")):  # state.json last: it marks completion
                self.storage.download(url, str(self.root / tag / url.rsplit("/", 1)[1]))
        _barrier()

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, engine, ema, step: int, samples: int, loader_state: dict, rng: torch.Tensor, config: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder."""
        t0 = time.perf_counter()
        rank, tag = _rank(), f"step_{step:08d}"
        path = self.root / tag
        # the version marker lets `hpdm convert-checkpoint` (DeepSpeed's ds_to_universal) convert this checkpoint
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False,
                               client_state={UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        save_file({"rng": rng}, str(path / f"rank_{rank:05d}.safetensors"), metadata={"loader": json.dumps(loader_state)})
        with full_parameters(engine.module):  # collective under ZeRO-3
            if rank == 0:
                save_file({n: p.detach().contiguous() for n, p in engine.module.named_parameters()}, str(path / RAW_FILE))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(path / "ema.safetensors"))
        self._upload(path, rank)
        _barrier()  # every rank's files are written (and uploaded)
        if rank == 0:
            state = {"step": step, "samples": samples, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                     "config": config}
            (path / "state.json").write_text(json.dumps(state, indent=1))
            if self.remote:
                self.storage.upload(str(path / "state.json"), join(self.remote, tag, "state.json"))
                self.storage.write_bytes(join(self.remote, "latest"), tag.encode())
            self.set_latest(tag)
            self._prune()
            log.info("checkpoint %s saved in %.1f s", path, time.perf_counter() - t0)
        _barrier()
        return path

    def _upload(self, path: Path, rank: int) -> None:
        """Each rank uploads the files it wrote; rank 0 also the shared ones."""
        if not self.remote:
            return
        for f in sorted(path.iterdir()):
            m = _OWN_FILE.match(f.name)
            owner = int(m.group(1) or m.group(2)) if m else 0
            if owner == rank and f.name != "state.json":
                self.storage.upload(str(f), join(self.remote, path.name, f.name))

    def set_latest(self, tag: str) -> None:
        tmp = self.root / f"latest.tmp{os.getpid()}"
        tmp.write_text(tag)
        os.replace(tmp, self.root / "latest")

    def _prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older incomplete ones (crashed saves)."""
        latest = (self.root / "latest").read_text().strip()
        folders = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        complete = [p for p in folders if is_complete(p)]
        keep = {p.name for p in complete[-self.keep:]} | {latest}
        for p in folders:
            if p.name not in keep and p.name < latest:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------------
    def load(self, engine, ema, path: Path) -> tuple[dict, dict | None, torch.Tensor | None]:
        """Restore engine and EMA in place; returns (state.json, this rank's loader state, RNG state).

        After a world-size change (a universal checkpoint), ranks without a saved state of their own get rank
        0's loader state (the loader then restarts its epoch) and no RNG state."""
        allow_deepspeed_globals()
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        state = json.loads((path / "state.json").read_text())
        own = path / f"rank_{_rank():05d}.safetensors"
        same_world = state.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1)
        rank_file = own if own.is_file() and same_world else path / "rank_00000.safetensors"
        with safe_open(str(rank_file), framework="pt") as f:
            loader = json.loads(f.metadata()["loader"])
        rng = load_file(str(rank_file))["rng"] if rank_file == own else None
        return state, loader, rng


def convert_to_universal(src: str | Path) -> Path:
    """Convert a checkpoint (or a run's latest) with DeepSpeed's ``ds_to_universal`` so that it loads at any
    world size; the result sits beside it as ``<name>_universal`` and becomes the run's latest."""
    src = Path(src)
    ckpt = src if is_complete(src) else Checkpointer(src).latest()
    if ckpt is None:
        raise FileNotFoundError(f"{src} is neither a checkpoint folder nor a run with checkpoints")
    if is_universal(ckpt):
        raise ValueError(f"{ckpt} is already universal")
    out = ckpt.parent / f"{ckpt.name}_universal"
    tmp = ckpt.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
                    "--output_folder", str(tmp)], check=True)
    for f in ckpt.glob("rank_*.safetensors"):
        shutil.copy2(f, tmp / f.name)
    for name in ("ema.safetensors", RAW_FILE):
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, tmp / name)
    (tmp / UNIVERSAL_MARK).write_text(f"converted from {ckpt.name}\n")
    shutil.copy2(ckpt / "state.json", tmp / "state.json")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    (ckpt.parent / "latest_universal").unlink(missing_ok=True)  # written by ds_to_universal inside tmp's parent
    Checkpointer(ckpt.parent.parent).set_latest(out.name)
    return out
