"""The per-step randomness of training, drawn on the training device from one generator.

Every random number a training step needs (pyramid offsets, condition dropout, noise levels, the noise) comes
from one ``torch.Generator`` that lives on the training device, so the step does no host work and no
host-to-device copy for it, and its outputs are a pure function of the generator's state (which checkpoints
save, so a resumed run continues the same stream). The draw order is that of the former CPU stream, so CPU
runs draw exactly what they drew before this module existed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from hpdm.config import Config
from hpdm.diffusion import EDM
from hpdm.pyramid import sample_offsets


@dataclass
class StepDraws:
    """One micro-batch's random numbers, all on the generator's device."""

    offsets: torch.Tensor  # int64 [B, L, 3]: pyramid box offsets
    drop: torch.Tensor | None  # bool [B]: condition removed (None when nothing is dropped)
    sigma: torch.Tensor  # float32 [B, L]: noise levels
    noise: torch.Tensor  # [B, L, 3, t, h, w] unit noise in the training dtype


def step_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The training generator: on ``device`` (a CUDA generator on GPU), seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> bool:
    """Set ``gen`` to a checkpointed ``state`` (a CPU ByteTensor, also for a CUDA generator).

    A state of the other kind of generator (a checkpoint written by a CPU run, resumed on a GPU, or back) is
    not refused: ``gen`` is seeded from a hash of it, so the resume is deterministic, but its stream differs
    from the one the writing run would have drawn (CPU and CUDA generators never draw the same numbers).
    Returns whether the state was set exactly."""
    state = state.to("cpu", torch.uint8).contiguous()
    if state.numel() == gen.get_state().numel():
        gen.set_state(state)
        return True
    digest = hashlib.sha256(state.numpy().tobytes()).digest()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
    return False


def draw_step_randomness(gen: torch.Generator, micro: int, cfg: Config, conditioned: bool = True) -> StepDraws:
    """Draw one micro-batch's randomness on ``gen.device``, in the order offsets, dropout, sigma, noise.

    ``conditioned``: the batch has a condition to drop (labels or text); otherwise no dropout is drawn, as
    ``Condition.dropped`` draws none then. Nothing here reads a value back to the host."""
    m = cfg.model
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    offsets = sample_offsets(micro, m.levels, m.patch, gen)
    drop = None
    if conditioned and m.cond_dropout > 0:
        drop = torch.rand(micro, generator=gen, device=gen.device) < m.cond_dropout
    sigma = EDM(cfg.diffusion).sample_sigma(micro, m.levels, gen.device, gen)
    # float32 then cast (on the device): the same numbers as the former CPU draw, also in bf16
    noise = torch.randn((micro, m.levels, 3, *m.patch), generator=gen, device=gen.device).to(dtype)
    return StepDraws(offsets, drop, sigma, noise)
