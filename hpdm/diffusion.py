"""EDM diffusion (Karras et al. 2022): preconditioning, training noise levels, loss, and the sampler.

All pyramid levels of a sample share one noise level by default (``independent_levels`` draws one per
level). The loss is the EDM-weighted squared error, averaged over pixels within a level, then over levels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpdm.config import DiffusionConfig


@dataclass
class Condition:
    """What a sample is conditioned on: class labels (-1: none) or text embeddings with their mask."""

    labels: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    def dropped(self, p: float, generator: torch.Generator | None = None) -> "Condition":
        """A copy with each sample's condition removed with probability ``p`` (classifier-free guidance)."""
        ref = self.labels if self.labels is not None else self.text
        if ref is None or p <= 0:
            return self
        device = generator.device if generator is not None else torch.device("cpu")  # drawn where the generator is
        return self.masked(torch.rand(ref.shape[0], generator=generator, device=device).to(ref.device) < p)

    def masked(self, drop: torch.Tensor) -> "Condition":
        """A copy with the condition of the samples where ``drop`` (bool [B], on the condition's device) is set
        removed: label -1, or an all-false text mask."""
        labels = None if self.labels is None else torch.where(drop, -1, self.labels)
        mask = None
        if self.text is not None:
            mask = self.text_mask if self.text_mask is not None else torch.ones(self.text.shape[:2], dtype=torch.bool, device=self.text.device)
            mask = mask & ~drop[:, None]
        return Condition(labels, self.text, mask)

    def rows(self, idx, device=None) -> "Condition":
        """The samples ``idx`` (a list or index tensor) of this condition, optionally moved to ``device``."""
        def pick(a):
            if a is None:
                return None
            a = a[torch.as_tensor(idx, device=a.device)]
            return a if device is None else a.to(device)
        return Condition(pick(self.labels), pick(self.text), pick(self.text_mask))

    def unconditional(self) -> "Condition":
        return self.dropped(1.0)

    def cat(self, other: "Condition") -> "Condition":
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Condition(join(self.labels, other.labels), join(self.text, other.text), join(self.text_mask, other.text_mask))


class EDM:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    def precondition(self, sigma):
        """(c_skip, c_out, c_in) of EDM for a float or a tensor of noise levels."""
        sd = self.cfg.sigma_data
        norm = (sigma ** 2 + sd ** 2) ** 0.5
        return sd ** 2 / norm ** 2, sigma * sd / norm, 1 / norm

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor, boxes: torch.Tensor, cond: Condition) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). x [B,L,...], sigma [B,L]."""
        c_skip, c_out, c_in = self.precondition(sigma.view(*sigma.shape, 1, 1, 1, 1).to(torch.float32))
        f = net((c_in * x).to(x.dtype), sigma.log() / 4, boxes, cond.labels, cond.text, cond.text_mask)
        return c_skip * x + c_out * f.to(torch.float32)

    def sample_sigma(self, batch: int, levels: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-normal training noise levels [B, L] on ``device``, drawn on the generator's device (the CPU
        without one)."""
        on = generator.device if generator is not None else torch.device("cpu")
        n = torch.randn(batch, levels if self.cfg.independent_levels else 1, generator=generator, device=on)
        sigma = (n * self.cfg.p_std + self.cfg.p_mean).exp().expand(batch, levels)
        return sigma.to(device)

    def loss(self, net, x0: torch.Tensor, boxes: torch.Tensor, cond: Condition, sigma: torch.Tensor,
             noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scalar loss, per-level losses [L]) for clean levels x0 [B,L,3,t,h,w]."""
        sd = self.cfg.sigma_data
        s = sigma.view(*sigma.shape, 1, 1, 1, 1)
        denoised = self.denoise(net, x0 + s * noise, sigma, boxes, cond)
        weight = (s ** 2 + sd ** 2) / (s * sd) ** 2
        per_level = (weight * (denoised - x0.float()) ** 2).mean(dim=(2, 3, 4, 5)).mean(dim=0)  # [L]
        return per_level.mean(), per_level.detach()

    def sigma_steps(self, steps: int, device=None, sigma_max: float | None = None) -> torch.Tensor:
        """Karras et al.'s rho-spaced schedule from sigma_max (the config's unless given) down to sigma_min, then 0."""
        c = self.cfg
        top = c.sigma_max if sigma_max is None else sigma_max
        i = torch.arange(steps, dtype=torch.float64)
        inv = 1 / c.rho
        t = (top ** inv + i / max(steps - 1, 1) * (c.sigma_min ** inv - top ** inv)) ** c.rho
        return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(device)

    def solve(self, denoise, x: torch.Tensor, steps: int, churn: float, order: int, noise, on_step=None,
              start: torch.Tensor | None = None, sigma_max: float | None = None) -> torch.Tensor:
        """EDM sampler (Karras et al., Algorithm 2) from unit noise ``x`` to sigma 0.

        ``denoise(x, sigma)`` is the (guided) denoised estimate, ``noise(shape)`` draws fresh unit noise for the
        churn; ``order`` 2 adds Heun's correction. Works in the dtype of ``x`` (float64 for sampling). With
        ``start`` and ``sigma_max``, the solve begins at ``start + sigma_max * x`` (SDEdit-like) instead of pure
        noise at the config's sigma_max."""
        sig = self.sigma_steps(steps, sigma_max=sigma_max).tolist()
        x = x * sig[0] if start is None else start + x * sig[0]
        gamma = min(churn / steps, math.sqrt(2) - 1) if churn > 0 else 0.0
        for i in range(steps):
            s_cur, s_next = sig[i], sig[i + 1]
            s_hat = s_cur * (1 + gamma)
            if s_hat > s_cur:
                x = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * noise(x.shape[1:])
            d = (x - denoise(x, s_hat)) / s_hat
            x_next = x + (s_next - s_hat) * d
            if order == 2 and s_next > 0:
                x_next = x + (s_next - s_hat) * (d + (x_next - denoise(x_next, s_next)) / s_next) / 2
            x = x_next
            if on_step is not None:
                on_step()
        return x
