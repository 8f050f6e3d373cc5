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
KEY = "train.init_from"
log = logging.getLogger(__name__)


def check_source(model: HPDM, path: str | Path, diffusion: DiffusionConfig, text_id: dict | None) -> tuple:
    """The checks of ``train.init_from`` for ``model`` (of a run with ``diffusion`` settings and text encoder
    ``text_id``), made from the source's config and tensor shapes alone, so that ``hpdm doctor`` reads no weights
    (``model`` may be on the meta device). Returns the source's config and the names of the model's tensors that it
    lacks (the new fusion projections)."""
    from hpdm.export import generator_shapes, generator_text_encoder  # noqa: PLC0415
    from hpdm.text_encoder import encoder_change  # noqa: PLC0415

    if not Path(path).exists():
        raise ConfigError(KEY, f"no such file or folder: {path}")
    try:
        old_cfg, src = generator_shapes(path)
        changed = encoder_change(generator_text_encoder(path), text_id)
    except CheckpointError as exc:
        raise ConfigError(KEY, str(exc)) from None
    if changed:  # its caption projections read another encoder's embeddings
        raise ConfigError(KEY, f"{path} was trained on the embeddings of another {changed}; train with its encoder "
                               "(data.text_encoder) or start from another generator")
    if old_cfg.diffusion.sigma_data != diffusion.sigma_data:
        log.warning("train.init_from: %s was trained with diffusion.sigma_data %g, this run has %g: the preconditioning "
                    "differs, so level 0 does not compute the old model's output", path, old_cfg.diffusion.sigma_data,
                    diffusion.sigma_data)
    if tuple(old_cfg.model.patch) != tuple(model.cfg.patch) or tuple(old_cfg.model.patchify) != tuple(model.cfg.patchify):
        raise ConfigError(KEY, f"{path}: its patch {list(old_cfg.model.patch)} / patchify {list(old_cfg.model.patchify)} "
                               f"must equal model.patch {list(model.cfg.patch)} / model.patchify {list(model.cfg.patchify)} "
                               "(the old video becomes level 0)")
    if old_cfg.model.levels > model.cfg.levels:
        raise ConfigError(KEY, f"{path} has {old_cfg.model.levels} levels, more than model.levels ({model.cfg.levels})")
    if old_cfg.model.cond != model.cfg.cond:
        raise ConfigError(KEY, f"{path} is conditioned on {old_cfg.model.cond!r}, the model on {model.cfg.cond!r}")
    dst = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in src if k not in dst]
    if missing:
        raise ConfigError(KEY, f"{path}: tensors with no place in the new model (different blocks or layers?): {missing[:5]}")
    bad = [f"{k} {v} vs {dst[k]}" for k, v in src.items() if v != dst[k]]
    if bad:
        raise ConfigError(KEY, f"{path}: shapes differ from the new model: {bad[:5]}")
    fresh = [k for k in dst if k not in src]
    if not all(_NEW_OK.search(k) for k in fresh):
        raise ConfigError(KEY, f"{path}: the new model has tensors the old one lacks beyond the fusion projections: "
                               f"{[k for k in fresh if not _NEW_OK.search(k)][:5]}")
    return old_cfg, fresh


def init_from_generator(model: HPDM, path: str | Path, diffusion: DiffusionConfig, text_id: dict | None) -> list[str]:
    """Copy the EMA weights of the generator at ``path`` (exported file, checkpoint or run folder) into ``model``,
    after check_source's checks.

    Returns the names of the tensors left at their initialisation (the new fusion projections)."""
    from hpdm.export import load_generator  # noqa: PLC0415

    old_cfg, fresh = check_source(model, path, diffusion, text_id)
    try:
        _, old = load_generator(path)
    except CheckpointError as exc:
        raise ConfigError(KEY, str(exc)) from None
    src, dst = old.state_dict(), model.state_dict()
    with torch.no_grad():
        for k, v in src.items():
            dst[k].copy_(v)
        for k in fresh:
            dst[k].zero_()
    log.info("train.init_from: %d tensors copied from the EMA weights of %s (%d to %d levels); %d new, zero-initialised%s",
             len(src), path, old_cfg.model.levels, model.cfg.levels, len(fresh), f" ({', '.join(fresh)})" if fresh else "")
    return fresh
