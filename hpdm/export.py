"""Exported weights: one safetensors file with the EMA (and optionally the raw) weights and the run config.

``load_generator`` takes an exported file, a checkpoint folder (``.../checkpoints/step_N``) or a run folder
(its latest checkpoint), so that sampling and evaluation accept any of them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hpdm.checkpoint import RAW_FILE, Checkpointer, is_complete, load_safetensors, no_pickle, problems, read_state
from hpdm.config import Config, ConfigError, from_dict
from hpdm.errors import CheckpointError, UsageError
from hpdm.model import HPDM

RAW_PREFIX = "raw."


def _checkpoint_folder(path: Path) -> Path:
    if is_complete(path):
        if wrong := problems(path):
            raise CheckpointError("; ".join(wrong))
        return path
    latest = Checkpointer(path).latest()
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint folder (with ema.safetensors) nor a run with checkpoints")
    return latest


def _run_config(ckpt: Path) -> Config:
    """The config the checkpoint was trained with (saved in its state.json)."""
    return from_dict(Config, read_state(ckpt)["config"])


def _raw_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The raw (non-EMA) weights of a checkpoint folder: ``raw.safetensors``, or, in checkpoints written before
    it existed, the module state that DeepSpeed keeps whole below ZeRO-3."""
    if (ckpt / RAW_FILE).is_file():
        return load_safetensors(ckpt / RAW_FILE)
    model_states = ckpt / "mp_rank_00_model_states.pt"
    if model_states.is_file():
        with no_pickle():
            module = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
        if module is not None:
            return module
    raise CheckpointError(f"{ckpt} holds no raw weights: it has no {RAW_FILE} (older hpdm) and its DeepSpeed model "
                            "state is partitioned (ZeRO-3)")


def export(src: str | Path, out: str | Path, raw: bool = False) -> Path:
    """Write the EMA weights of a checkpoint (or a run's latest) and its config to ``out`` (safetensors)."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out} is a folder: give the file to write, e.g. {out / 'model.safetensors'}")
    inside = next((p for p in out.resolve().parents if is_complete(p)), None)
    if inside is not None:
        raise UsageError(f"{out} is inside the checkpoint {inside}, which it would change: export to another folder")
    ckpt = _checkpoint_folder(Path(src))
    cfg = _run_config(ckpt)
    tensors = load_safetensors(ckpt / "ema.safetensors")
    if raw:
        tensors.update({RAW_PREFIX + k: v for k, v in _raw_weights(ckpt).items()})
    part = out.with_name(out.name + ".part")  # renamed when whole: a failed write leaves no truncated file at out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(part),
                  metadata={"config": yaml.safe_dump(cfg.to_dict(), sort_keys=False), "source": str(ckpt)})
        os.replace(part, out)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def load_generator(path: str | Path, raw: bool = False, device="cpu") -> tuple[Config, HPDM]:
    """An eval-mode model with EMA (or raw) weights, and its config."""
    path = Path(path)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a safetensors file ({e}): give a file written by `hpdm export`, a "
                                  "checkpoint folder or a run folder") from None
        if "config" not in meta:
            raise CheckpointError(f"{path} carries no config metadata: was it written by `hpdm export`?")
        try:
            cfg = from_dict(Config, yaml.safe_load(meta["config"]))
        except (yaml.YAMLError, ConfigError) as e:
            raise CheckpointError(f"{path}: its config metadata is not an hpdm config ({e}); was it written by "
                                  "`hpdm export`?") from None
        tensors = load_file(str(path))
        if raw:
            tensors = {k[len(RAW_PREFIX):]: v for k, v in tensors.items() if k.startswith(RAW_PREFIX)}
            if not tensors:
                raise CheckpointError(f"{path} holds no raw weights (export with --raw)")
        else:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(RAW_PREFIX)}
    else:
        ckpt = _checkpoint_folder(path)
        cfg = _run_config(ckpt)
        tensors = _raw_weights(ckpt) if raw else load_safetensors(ckpt / "ema.safetensors")
    model = HPDM(cfg.model)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # tensors missing, unexpected or of other shapes than the config's model
        raise CheckpointError(f"{path}: its weights do not fit the model of its own config: "
                              f"{'; '.join(line.strip() for line in str(e).splitlines()[1:3])[:400]}") from None
    return cfg, model.to(device).eval()
