"""Run checkpoints: DeepSpeed's sharded engine state plus ours (EMA, progress, data position, RNG).

Layout under ``run_dir/checkpoints``: one folder per step (``step_00001000``) and a ``latest`` file naming
the newest complete one; ``latest`` is replaced atomically only after the whole folder is written, so a crash
during a save leaves the previous checkpoint in force. Nothing is unpickled on load: DeepSpeed's files go
through ``torch.load(weights_only=True)``, ours are safetensors and JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from safetensors.torch import load_file, save_file


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


def _safe_globals() -> None:
    """Types that DeepSpeed puts in its state files and that are plain data."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    torch.serialization.add_safe_globals([LossScaler, ZeroStageEnum, fragment_address])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        f = self.root / "latest"
        if not f.is_file():
            return None
        path = self.root / f.read_text().strip()
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{f} names {path.name}, which has no state.json: the checkpoint is incomplete")
        return path

    def save(self, engine, ema, step: int, samples: int, extra: dict, rng: torch.Tensor) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder."""
        tag = f"step_{step:08d}"
        path = self.root / tag
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        save_file({"rng": rng}, str(path / f"rng_rank{_rank()}.safetensors"))
        if _rank() == 0:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(path / "ema.safetensors"))
            (path / "state.json").write_text(json.dumps({"step": step, "samples": samples, **extra}, indent=1))
        _barrier()
        if _rank() == 0:
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            self._prune()
        _barrier()
        return path

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / "state.json").is_file())
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, ema, path: Path) -> tuple[dict, torch.Tensor | None]:
        """Restores engine and EMA in place; returns (our state dict, this rank's RNG state or None)."""
        _safe_globals()
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
        loaded, _ = engine.load_checkpoint(str(self.root), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        rng_file = path / f"rng_rank{_rank()}.safetensors"
        rng = load_file(str(rng_file))["rng"] if rng_file.is_file() else None
        return json.loads((path / "state.json").read_text()), rng
