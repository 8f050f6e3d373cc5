"""The hierarchical patch model: a RIN backbone that denoises every pyramid level jointly.

Each level's patch is cut into pixel tubes (data tokens). Per level, a set of latents reads from the data
tokens, thinks by self-attention, and the data tokens read back (one RIN block). Levels share all weights
and are batched together inside a block; they interact only through *context fusion*: before a block, each
finer level's tokens receive the coarser levels' tokens (projected), resampled at their own positions and
averaged. *Adaptive computation*: block ``b`` processes only levels ``< levels_per_block[b]``, so fine levels
run only the last blocks. Information flows strictly coarse to fine. *Activation checkpointing*
(``checkpoint_blocks``, set by the trainer from ``train.activation_checkpointing``): the training forward keeps
only each block's inputs and recomputes the block (its context fusion included) in the backward pass.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpdm.config import ModelConfig
from hpdm.layers import Modulation, PixelHead, ResidualLayer, TokenConv, modulate
from kernels import context_fusion


class FourierEmbedding(nn.Module):
    """Sinusoidal features of a scalar (the EDM noise conditioning ``ln(sigma) / 4``, about -2 to 2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(dim // 2) / (dim // 2)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x[:, None].float() * self.freqs
        return torch.cat([a.cos(), a.sin()], dim=-1)


class Conditioning(nn.Module):
    """Per (sample, level) vector from the noise level, the class or text, and the patch's box."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.latent_dim
        self.cfg = cfg
        self.noise = nn.Sequential(FourierEmbedding(256), nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        if cfg.cond == "class":
            self.label = nn.Embedding(cfg.num_classes + 1, dim)  # the last row is "no class" (guidance)
        elif cfg.cond == "text":
            self.text = nn.Linear(cfg.text_dim, dim)
        if cfg.coords:
            # Raw box coordinates (the paper's supplement reports that sinusoidal ones diverged).
            self.coords = nn.Sequential(nn.Linear(6, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor | None,
                text: torch.Tensor | None, text_mask: torch.Tensor | None) -> torch.Tensor:
        """c_noise [B,L], boxes [B,L,6] -> [B,L,latent_dim]. labels -1 and all-False text_mask mean unconditional."""
        B, L = c_noise.shape
        dtype = self.noise[1].weight.dtype
        c = self.noise[1:](self.noise[0](c_noise.flatten()).to(dtype)).view(B, L, -1)
        if self.cfg.cond == "class":
            if labels is None:
                raise ValueError("model.cond is 'class': pass labels (-1 for unconditional)")
            idx = torch.where(labels < 0, self.cfg.num_classes, labels)
            c = c + self.label(idx)[:, None]
        elif self.cfg.cond == "text":
            if text is None:
                raise ValueError("model.cond is 'text': pass text embeddings [B,S,text_dim]")
            m = torch.ones(text.shape[:2], device=text.device) if text_mask is None else text_mask.to(text.dtype)
            pooled = (text * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
            c = c + self.text(pooled.to(dtype))[:, None]
        if self.cfg.coords:
            c = c + self.coords(boxes.to(dtype))
        return nn.functional.silu(c)


class Block(nn.Module):
    """One RIN block: a token convolution (``model.token_conv``), read (latents <- data), ``latent_layers``
    self-attention layers, write (data <- latents)."""

    def __init__(self, cfg: ModelConfig, fuses: bool):
        super().__init__()
        D, Z, hd, r = cfg.token_dim, cfg.latent_dim, cfg.head_dim, cfg.mlp_ratio
        self.conv = TokenConv(D, cfg.token_grid, cfg.token_conv, Z, cfg.kernels) if cfg.token_conv else None
        self.read = ResidualLayer(Z, D, Z, hd, r, Z)
        self.latent = nn.ModuleList(ResidualLayer(Z, None, Z, hd, r, Z) for _ in range(cfg.latent_layers))
        self.write = ResidualLayer(D, Z, D, hd, cfg.data_mlp_ratio, Z)
        # Context projection, zero-initialised so that fusion starts as the identity.
        self.fuse = nn.Linear(D, D) if fuses else None
        if fuses:
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor, c: torch.Tensor,
                text: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``text``: caption tokens [B,S,D] and their mask, which the latents read together with the data tokens."""
        if self.conv is not None:
            x = self.conv(x, c)
        if text is None:
            z = self.read(z, c, x)
        else:
            seen = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            z = self.read(z, c, torch.cat([x, text[0]], 1), torch.cat([seen, text[1]], 1))
        for layer in self.latent:
            z = layer(z, c)
        return self.write(x, c, z), z


class HPDM(nn.Module):
    """Denoiser network ``F(x, c_noise, boxes, cond)`` over all pyramid levels at once."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.token_dim
        pixels = 3 * math.prod(cfg.patchify)
        self.grid = cfg.token_grid
        self.tokenize = nn.Linear(pixels, D)
        self.pos = nn.Parameter(torch.randn(math.prod(self.grid), D) * 0.02)
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.latent_dim) * 0.02)
        self.cond = Conditioning(cfg)
        # Caption tokens, which every block's latents read beside the data tokens (Snap Video's FIT, which HPDM
        # builds on, gives its latents the text by an extra read); the pooled caption also modulates (Conditioning).
        self.text_tokens = nn.Linear(cfg.text_dim, D) if cfg.cond == "text" else None
        fusing = cfg.context_fusion != "none"
        self.blocks = nn.ModuleList(Block(cfg, fuses=fusing and n > 1) for n in cfg.levels_per_block)
        # Output layer modulated by the conditioning (DiT's final adaLN): the noise level sets the output's scale,
        # which a plain LayerNorm would fix for every noise level alike.
        self.out_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_mod = Modulation(cfg.latent_dim, D, branches=1, gated=False)
        self.detokenize = nn.Linear(D, pixels)
        nn.init.zeros_(self.detokenize.weight)
        nn.init.zeros_(self.detokenize.bias)
        self.pixel_head = PixelHead(cfg.pixel_head, cfg.latent_dim) if cfg.pixel_head else None
        # Recompute each block in the backward pass instead of keeping its activations (a memory setting, not part
        # of the architecture: it is no ModelConfig field, so it may change between resumes). Sampling never uses it.
        self.checkpoint_blocks = False

    def first_block(self, level: int) -> int:
        """Index of the first block that processes ``level``."""
        return next(b for b, n in enumerate(self.cfg.levels_per_block) if n > level)

    def _fuse(self, b: int, block: Block, h: list[torch.Tensor], active: int, boxes: torch.Tensor) -> list[torch.Tensor]:
        """Context fusion before block ``b`` for the active levels >= 1 (coarse states are taken before fusion)."""
        cfg = self.cfg
        targets = [l for l in range(1, active) if cfg.context_fusion == "deep" or self.first_block(l) == b]
        if block.fuse is None or not targets:
            return h
        B, (t, hh, w), D = boxes.shape[0], self.grid, cfg.token_dim
        proj = [block.fuse(h[k].detach() if cfg.context_detach else h[k]).view(B, t, hh, w, D) for k in range(max(targets))]
        out = list(h)
        for l in targets:
            fused = context_fusion(h[l].view(B, t, hh, w, D), torch.stack(proj[:l], dim=1), boxes[:, l], boxes[:, :l],
                                   impl=cfg.kernels)
            out[l] = fused.view(B, -1, D)
        return out

    def _tokenize(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B,L,3,t,h,w] -> per level [B,N,D] data tokens."""
        pt, ph, pw = self.cfg.patchify
        tokens = rearrange(x.to(self.tokenize.weight.dtype), "b l c (t pt) (h ph) (w pw) -> l b (t h w) (c pt ph pw)",
                           pt=pt, ph=ph, pw=pw)
        return list((self.tokenize(tokens) + self.pos).unbind(0))

    def _detokenize(self, h: torch.Tensor, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B,L,N,D] tokens, conditioning [B,L,Z], the network's input x [B,L,3,t,h,w] -> [B,L,3,t,h,w] pixels."""
        (shift, scale), = self.out_mod(cond)
        out = self.detokenize(modulate(self.out_norm, h, shift, scale))
        (t, hh, w), (pt, ph, pw) = self.grid, self.cfg.patchify
        out = rearrange(out, "b l (t h w) (c pt ph pw) -> b l c (t pt) (h ph) (w pw)", t=t, h=hh, w=w, pt=pt, ph=ph, pw=pw)
        if self.pixel_head is None:
            return out
        return self.pixel_head(out.flatten(0, 1), x.flatten(0, 1), cond.flatten(0, 1)).view(out.shape)

    def _text(self, text: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Caption embeddings [B,S,text_dim] -> (tokens [B,S,D], mask [B,S]) for the blocks' reads; None without."""
        if self.text_tokens is None:
            return None
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        return self.text_tokens(text.to(self.text_tokens.weight.dtype)), mask.bool()

    def _run_block(self, b: int, h: list, z: list, cond: torch.Tensor, boxes: torch.Tensor, active: int,
                   text: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[list, list]:
        """Context fusion, then block ``b`` on the ``active`` coarsest levels batched together; the rest pass through."""
        block = self.blocks[b]
        h = self._fuse(b, block, h, active, boxes)
        text = None if text is None else (text[0].repeat(active, 1, 1), text[1].repeat(active, 1))
        xs, zs = block(torch.cat(h[:active]), torch.cat(z[:active]), cond[:, :active].transpose(0, 1).flatten(0, 1), text)
        h, z = list(h), list(z)
        h[:active], z[:active] = xs.chunk(active), zs.chunk(active)
        return h, z

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,L,3,t,h,w] (L <= cfg.levels, a prefix of the pyramid), c_noise [B,L], boxes [B,L,6] -> like x."""
        B, L = x.shape[:2]
        h = self._tokenize(x)
        cond = self.cond(c_noise, boxes, labels, text, text_mask)  # [B,L,Z]
        txt = self._text(text, text_mask)
        z = [self.latents.expand(B, -1, -1)] * L
        for b in range(len(self.blocks)):
            args = (b, h, z, cond, boxes, min(self.cfg.levels_per_block[b], L), txt)
            if self.checkpoint_blocks and torch.is_grad_enabled():
                h, z = checkpoint(self._run_block, *args, use_reentrant=False)
            else:
                h, z = self._run_block(*args)
        return self._detokenize(torch.stack(h, dim=1), cond, x)

    # ---- tiled sampling: coarse activations computed once per parent region and reused by every tile inside it ----
    def fuses_into(self, b: int, level: int) -> bool:
        """Whether ``level``'s tokens receive coarser context before block ``b`` (the rule of ``_fuse``)."""
        cfg = self.cfg
        return (level >= 1 and self.blocks[b].fuse is not None and cfg.levels_per_block[b] > level
                and (cfg.context_fusion == "deep" or self.first_block(level) == b))

    def coarse_context(self, x: torch.Tensor, c_noise: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor | None = None,
                       text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Run the K coarsest levels (x [B,K,3,t,h,w]) and return, per block, the projected context that a level-K
        patch fuses before that block, [B,K,t,h,w,D] (None where level K does not fuse). With ``forward_level``
        this reproduces ``forward(...)[:, K]`` exactly, since coarse levels never see finer ones."""
        B, K = x.shape[:2]
        t, hh, w = self.grid
        h = self._tokenize(x)
        cond = self.cond(c_noise, boxes, labels, text, text_mask)
        txt = self._text(text, text_mask)
        z = [self.latents.expand(B, -1, -1)] * K
        ctx: list[torch.Tensor | None] = []
        for b, block in enumerate(self.blocks):
            ctx.append(torch.stack([block.fuse(h[k]).view(B, t, hh, w, -1) for k in range(K)], dim=1)
                       if self.fuses_into(b, K) else None)
            if not any(self.fuses_into(c, K) for c in range(b + 1, len(self.blocks))):
                return ctx + [None] * (len(self.blocks) - b - 1)
            h, z = self._run_block(b, h, z, cond, boxes, min(self.cfg.levels_per_block[b], K), txt)
        return ctx

    def forward_level(self, x: torch.Tensor, c_noise: torch.Tensor, boxes: torch.Tensor, context: list[torch.Tensor | None],
                      labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
                      text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Level K alone: x [B,1,3,t,h,w], c_noise [B,1], boxes [B,K+1,6] (coarse boxes, then this patch's),
        ``context`` from ``coarse_context`` (rows aligned with x). Returns [B,1,3,t,h,w]."""
        B, K = x.shape[0], boxes.shape[1] - 1
        t, hh, w = self.grid
        h = self._tokenize(x)[0]
        cond = self.cond(c_noise, boxes[:, K:], labels, text, text_mask)[:, 0]
        txt = self._text(text, text_mask)
        z = self.latents.expand(B, -1, -1)
        for b, block in enumerate(self.blocks):
            if self.cfg.levels_per_block[b] <= K:
                continue
            if context[b] is not None:
                h = context_fusion(h.view(B, t, hh, w, -1), context[b], boxes[:, K], boxes[:, :K],
                                   impl=self.cfg.kernels).view(B, t * hh * w, -1)
            h, z = block(h, z, cond, txt)
        return self._detokenize(h[:, None], cond[:, None], x)
