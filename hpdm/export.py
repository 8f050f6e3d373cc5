"""Exported weights: one safetensors file with the EMA (and optionally the raw) weights and the run config.

``load_generator`` takes an exported file, a checkpoint folder (``.../checkpoints/step_N``) or a run folder
(its latest checkpoint), so that sampling and evaluation accept any of them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from hpdm.checkpoint import Checkpointer
from hpdm.checkpoint_folder import RAW_FILE, in_checkpoints, is_complete, problems, read_state, save_safetensors
from hpdm.config import Config, ConfigError, from_dict
from hpdm.errors import CheckpointError, UsageError
from hpdm.model import HPDM
from hpdm.safe_load import load_safetensors, no_pickle

RAW_PREFIX = "raw."
log = logging.getLogger(__name__)


def check_output(option: str, path: Path, suggest: str) -> None:
    """Before any loading or sampling: a UsageError naming ``option`` when the output ``path`` lies in a checkpoint
    folder or a run's checkpoints/ folder (symlinks resolved), which it would change or destroy, or when it cannot
    be created (a file in the way, or no permission). ``suggest``: a name to offer beside the run instead."""
    real = path.resolve()
    guarded = [p for p in (real, *real.parents) if in_checkpoints(p)]
    if guarded:
        where = "is" if guarded[0] == real else "is inside"
        what = "the checkpoint" if is_complete(guarded[0]) else "the checkpoints folder"
        raise UsageError(f"{option}: {path} {where} {what} {guarded[0]}, which it would change; write elsewhere, "
                         f"e.g. {guarded[-1].parent / suggest}")
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{option}: {existing} is a file, so {path} cannot be created under it")
    for folder in ([path] if path.is_dir() else []) + [existing]:  # an output folder, and where a file is replaced
        if not os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            raise UsageError(f"{option}: cannot write {path}: {folder} is not writable by this user")


def _checkpoint_folder(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_complete(path):
        if wrong := problems(path):
            raise CheckpointError("; ".join(wrong))
        return path
    latest = Checkpointer(path).latest()
    if latest is None:
        hint = f"; give the run folder, {path.parent}" if path.name == "checkpoints" else ""
        raise CheckpointError(f"{path} is neither a checkpoint folder (with ema.safetensors) nor a run with "
                              f"checkpoints{hint}")
    return latest


def _checked_config(data, source: Path, what: str) -> Config:
    """The config ``data`` stored in ``source``, with the checks of the sections that sampling uses (model,
    diffusion; train.init_from, say, names a file of the training machine), or a CheckpointError naming the file
    and the key: a config edited or written by hand gave grey videos (diffusion.steps 0) or a TypeError."""
    try:
        cfg = from_dict(Config, data)
        cfg.model.validate()
        cfg.diffusion.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: {what} is not a valid hpdm config ({e})") from None
    return cfg


def _run_config(ckpt: Path) -> Config:
    """The config the checkpoint was trained with (saved in its state.json)."""
    return _checked_config(read_state(ckpt)["config"], ckpt / "state.json", "its config")


def _check_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """A CheckpointError naming ``source`` and the first tensor with NaN or infinite values (black videos)."""
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{source}: tensor {bad!r} holds NaN or infinite values (did the run diverge?)")


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


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a safetensors file written by ``export`` (its metadata has export's keys)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {"config", "source"} <= (f.metadata() or {}).keys()
    except (SafetensorError, OSError):
        return False


def export(src: str | Path, out: str | Path, raw: bool = False) -> Path:
    """Write the EMA weights of a checkpoint (or a run's latest) and its config to ``out`` (safetensors). An existing
    ``out`` is replaced only if it is itself an export."""
    out = Path(out)
    check_output("out", out, "model.safetensors")
    if out.is_dir():
        raise UsageError(f"{out} is a folder: give the file to write, e.g. {out / 'model.safetensors'}")
    if out.exists() and not _is_export(out):
        raise UsageError(f"out: {out} exists and was not written by `hpdm export`; give a new file name (or remove "
                         "it first)")
    ckpt = _checkpoint_folder(Path(src))
    cfg = _run_config(ckpt)
    tensors = load_safetensors(ckpt / "ema.safetensors")
    if raw:
        tensors.update({RAW_PREFIX + k: v for k, v in _raw_weights(ckpt).items()})
    part = out.with_name(out.name + ".part")  # renamed when whole: a failed write leaves no truncated file at out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        state = read_state(ckpt)
        text = state.get("text_encoder")  # which encoder prompts must go through (hpdm sample checks)
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, part,
                         metadata={"config": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                                   "source": str(ckpt.resolve()), "step": str(state["step"]),
                                   "samples": str(state["samples"])}
                         | ({"text_encoder": json.dumps(text)} if text else {}))
        os.replace(part, out)
    except BaseException as e:  # also an interrupt: no half-written .part left beside the output
        if part.parent.is_dir():
            part.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    return out


def generator_text_encoder(path: str | Path) -> dict | None:
    """The text encoder a generator (export, checkpoint or run folder) was trained with, {"encoder", "digest"},
    where its checkpoint recorded one."""
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("text_encoder")
        return json.loads(text) if text else None
    return read_state(_checkpoint_folder(path)).get("text_encoder")


def _file_config(path: Path) -> tuple[Config, dict]:
    """The config of an exported generator file and its metadata, from its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}): give a file written by `hpdm export`, a "
                              "checkpoint folder or a run folder") from None
    if "config" not in meta:
        raise CheckpointError(f"{path} carries no config metadata: was it written by `hpdm export`?")
    try:
        data = yaml.safe_load(meta["config"])
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: its config metadata is not an hpdm config ({e}); was it written by "
                              "`hpdm export`?") from None
    return _checked_config(data, path, "its config metadata"), meta


def generator_shapes(path: str | Path) -> tuple[Config, dict[str, tuple[int, ...]]]:
    """The config and EMA tensor shapes of a generator (export, checkpoint or run folder), from file headers: what
    ``hpdm doctor`` checks a fine-tuning source by, without reading its weights."""
    path = Path(path)
    if path.is_file():
        cfg, file = _file_config(path)[0], path
    else:
        ckpt = _checkpoint_folder(path)
        cfg, file = _run_config(ckpt), ckpt / "ema.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            return cfg, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(RAW_PREFIX)}
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from None


def load_generator(path: str | Path, raw: bool = False, device="cpu") -> tuple[Config, HPDM]:
    """An eval-mode model with EMA (or raw) weights, and its config. The model's ``provenance`` says which file
    (and checkpoint step) it was loaded from."""
    path = Path(path)
    if path.is_file():
        cfg, meta = _file_config(path)
        source, origin = path, {"exported_from": meta.get("source"),  # older exports lack step and samples
                                **{k: int(meta[k]) for k in ("step", "samples") if meta.get(k, "").isdigit()}}
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
        state = read_state(ckpt)
        origin = {"step": state["step"], "samples": state["samples"]}
        if not raw:
            source = ckpt / "ema.safetensors"
        else:  # older checkpoints hold them in the DeepSpeed model state (_raw_weights)
            source = ckpt / (RAW_FILE if (ckpt / RAW_FILE).is_file() else "mp_rank_00_model_states.pt")
        tensors = _raw_weights(ckpt) if raw else load_safetensors(source)
    _check_finite(tensors, source)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("loading the %s weights of %s", "raw" if raw else "EMA", source)
    model = HPDM(cfg.model)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # tensors missing, unexpected or of other shapes than the config's model
        raise CheckpointError(f"{path}: its weights do not fit the model of its own config: "
                              f"{'; '.join(line.strip() for line in str(e).splitlines()[1:3])[:400]}") from None
    # what was loaded, for the records of samples and evaluations (sampling_record)
    model.provenance = {"generator": str(path.resolve()), "weights": str(source.resolve()), "raw": raw, **origin}
    return cfg, model.to(device).eval()
