"""Fine-tuning from a low-resolution generator: a multi-level model initialised from a (single-level) one.

The paper's T2V path (36x64 generator -> 4 levels, 64x288x512): the new model keeps the old model's patch (its
level 0 *is* the old model's video), blocks and widths, and adds levels. Every old tensor is copied; the only
new tensors are the context-fusion projections of blocks that now see several levels, which are
zero-initialised, so the new model's level 0 computes exactly what the old model did and finer levels start as
the old model applied to their patches with their own coordinates. Selected by ``train.init_from``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from hpdm.config import ConfigError, DiffusionConfig
from hpdm.errors import CheckpointError
from hpdm.model import HPDM

_NEW_OK = re.compile(r"blocks\.\d+\.fuse\.(weight|bias)$")
log = logging.getLogger(__name__)


def init_from_generator(model: HPDM, path: str | Path, diffusion: DiffusionConfig, text_id: dict | None) -> list[str]:
    """Copy the EMA weights of the generator at ``path`` (exported file, checkpoint or run folder) into ``model``,
    whose run has ``diffusion`` settings and text encoder ``text_id``.

    Returns the names of the tensors left at their initialisation (the new fusion projections)."""
    from hpdm.export import generator_text_encoder, load_generator  # noqa: PLC0415
    from hpdm.text_encoder import encoder_change  # noqa: PLC0415

    key = "train.init_from"
    if not Path(path).exists():
        raise ConfigError(key, f"no such file or folder: {path}")
    try:
        old_cfg, old = load_generator(path)
        changed = encoder_change(generator_text_encoder(path), text_id)
    except CheckpointError as exc:
        raise ConfigError(key, str(exc)) from None
    if changed:  # its caption projections read another encoder's embeddings
        raise ConfigError(key, f"{path} was trained on the embeddings of another {changed}; train with its encoder "
                               "(data.text_encoder) or start from another generator")
    if old_cfg.diffusion.sigma_data != diffusion.sigma_data:
        log.warning("train.init_from: %s was trained with diffusion.sigma_data %g, this run has %g: the preconditioning "
                    "differs, so level 0 does not compute the old model's output", path, old_cfg.diffusion.sigma_data,
                    diffusion.sigma_data)
    if tuple(old_cfg.model.patch) != tuple(model.cfg.patch) or tuple(old_cfg.model.patchify) != tuple(model.cfg.patchify):
        raise ConfigError(key, f"{path}: its patch {list(old_cfg.model.patch)} / patchify {list(old_cfg.model.patchify)} "
                               f"must equal model.patch {list(model.cfg.patch)} / model.patchify {list(model.cfg.patchify)} "
                               "(the old video becomes level 0)")
    if old_cfg.model.levels > model.cfg.levels:
        raise ConfigError(key, f"{path} has {old_cfg.model.levels} levels, more than model.levels ({model.cfg.levels})")
    if old_cfg.model.cond != model.cfg.cond:
        raise ConfigError(key, f"{path} is conditioned on {old_cfg.model.cond!r}, the model on {model.cfg.cond!r}")
    src, dst = old.state_dict(), model.state_dict()
    missing = [k for k in src if k not in dst]
    if missing:
        raise ConfigError(key, f"{path}: tensors with no place in the new model (different blocks or layers?): {missing[:5]}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(dst[k].shape)}" for k, v in src.items() if v.shape != dst[k].shape]
    if bad:
        raise ConfigError(key, f"{path}: shapes differ from the new model: {bad[:5]}")
    fresh = [k for k in dst if k not in src]
    if not all(_NEW_OK.search(k) for k in fresh):
        raise ConfigError(key, f"{path}: the new model has tensors the old one lacks beyond the fusion projections: "
                               f"{[k for k in fresh if not _NEW_OK.search(k)][:5]}")
    with torch.no_grad():
        for k, v in src.items():
            dst[k].copy_(v)
        for k in fresh:
            dst[k].zero_()
    log.info("train.init_from: %d tensors copied from the EMA weights of %s (%d to %d levels); %d new, zero-initialised%s",
             len(src), path, old_cfg.model.levels, model.cfg.levels, len(fresh), f" ({', '.join(fresh)})" if fresh else "")
    return fresh
