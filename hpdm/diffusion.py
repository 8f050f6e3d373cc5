"""EDM diffusion (Karras et al. 2022): preconditioning, training noise levels, loss, and a one-level sampler.

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
        drop = torch.rand(ref.shape[0], generator=generator, device="cpu").to(ref.device) < p
        labels = None if self.labels is None else torch.where(drop, -1, self.labels)
        mask = None
        if self.text is not None:
            mask = self.text_mask if self.text_mask is not None else torch.ones(self.text.shape[:2], dtype=torch.bool, device=ref.device)
            mask = mask & ~drop[:, None]
        return Condition(labels, self.text, mask)

    def unconditional(self) -> "Condition":
        return self.dropped(1.0)

    def cat(self, other: "Condition") -> "Condition":
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Condition(join(self.labels, other.labels), join(self.text, other.text), join(self.text_mask, other.text_mask))


class EDM:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor, boxes: torch.Tensor, cond: Condition) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). x [B,L,...], sigma [B,L]."""
        sd = self.cfg.sigma_data
        s = sigma.view(*sigma.shape, 1, 1, 1, 1).to(torch.float32)
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        f = net((c_in * x).to(x.dtype), sigma.log() / 4, boxes, cond.labels, cond.text, cond.text_mask)
        return c_skip * x + c_out * f.to(torch.float32)

    def sample_sigma(self, batch: int, levels: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-normal training noise levels [B, L]."""
        n = torch.randn(batch, levels if self.cfg.independent_levels else 1, generator=generator)
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

    def sigma_steps(self, steps: int, device=None) -> torch.Tensor:
        """Karras et al.'s rho-spaced schedule from sigma_max down to sigma_min, then 0."""
        c = self.cfg
        i = torch.arange(steps, dtype=torch.float64)
        inv = 1 / c.rho
        t = (c.sigma_max ** inv + i / max(steps - 1, 1) * (c.sigma_min ** inv - c.sigma_max ** inv)) ** c.rho
        return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(device)

    def guided(self, net, x, sigma, boxes, cond: Condition, guidance: float) -> torch.Tensor:
        """Denoised estimate with classifier-free guidance (one batched call for both branches)."""
        if guidance == 1.0:
            return self.denoise(net, x, sigma, boxes, cond)
        both = self.denoise(net, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([boxes, boxes]),
                            cond.cat(cond.unconditional()))
        c, u = both.chunk(2)
        return u + guidance * (c - u)

    @torch.no_grad()
    def sample(self, net, shape: tuple[int, ...], boxes: torch.Tensor, cond: Condition, steps: int | None = None,
               guidance: float | None = None, s_churn: float | None = None, second_order: bool = True,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """EDM sampler (Algorithm 2 of Karras et al.) for one level: shape [B,1,3,t,h,w]; returns x at sigma 0."""
        c = self.cfg
        steps = steps or c.steps
        guidance = c.guidance if guidance is None else guidance
        s_churn = c.s_churn if s_churn is None else s_churn
        sig = self.sigma_steps(steps)
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device) * sig[0]
        B = shape[0]
        gamma = min(s_churn / steps, math.sqrt(2) - 1)
        for i in range(steps):
            s_cur, s_next = sig[i], sig[i + 1]
            s_hat = s_cur * (1 + gamma) if s_churn > 0 else s_cur
            if s_hat > s_cur:
                x = x + (s_hat ** 2 - s_cur ** 2).sqrt() * torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
            sig_b = torch.full((B, shape[1]), float(s_hat), device=device)
            d = (x - self.guided(net, x.float(), sig_b, boxes, cond, guidance).double()) / s_hat
            x_next = x + (s_next - s_hat) * d
            if second_order and s_next > 0:
                sig_n = torch.full((B, shape[1]), float(s_next), device=device)
                d2 = (x_next - self.guided(net, x_next.float(), sig_n, boxes, cond, guidance).double()) / s_next
                x_next = x + (s_next - s_hat) * (d + d2) / 2
            x = x_next
        return x.float()
