"""Transformer pieces of the RIN backbone: attention, MLP, adaLN modulation, and the layer kinds.

A *read* layer lets latents attend to data tokens, a *latent* layer is self-attention among latents, and a
*write* layer lets data tokens attend to latents. Every layer's residual branches are modulated (shift,
scale, gate; zero-initialised gate) by the per-sample conditioning vector. A *token convolution* mixes each
data token with its neighbours in space and time.
"""
from __future__ import annotations

import torch
from torch import nn

from hpdm.attention import attention
from kernels.token_conv import token_conv


class Attention(nn.Module):
    """Multi-head attention from ``dim_q`` queries to ``dim_kv`` keys/values, ``inner`` wide, out to ``dim_q``."""

    def __init__(self, dim_q: int, dim_kv: int, inner: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = inner // head_dim, head_dim
        self.q = nn.Linear(dim_q, inner)
        self.kv = nn.Linear(dim_kv, 2 * inner)
        self.q_norm = nn.RMSNorm(head_dim)  # QK-norm keeps the logits bounded in fp32 and bf16 alike
        self.k_norm = nn.RMSNorm(head_dim)
        self.out = nn.Linear(inner, dim_q)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, ctx tokens] (True: attend) leaves out padding, e.g. of captions; every row needs a True."""
        B, N, _ = x.shape
        q = self.q_norm(self.q(x).view(B, N, self.heads, self.head_dim))
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, self.head_dim).unbind(2)
        o = attention(q, self.k_norm(k), v.contiguous(), mask)
        return self.out(o.reshape(B, N, -1))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Modulation(nn.Module):
    """adaLN: (shift, scale, gate) per residual branch from the conditioning vector (without the gate when not
    ``gated``); zero-initialised. ``c`` [...,Z] gives [...,1,dim] pieces, which broadcast over the tokens."""

    def __init__(self, cond_dim: int, dim: int, branches: int, gated: bool = True):
        super().__init__()
        self.branches, self.pieces = branches, 3 if gated else 2
        self.proj = nn.Linear(cond_dim, self.pieces * branches * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        chunks = self.proj(c).unsqueeze(-2).chunk(self.pieces * self.branches, dim=-1)
        return [chunks[self.pieces * i:self.pieces * (i + 1)] for i in range(self.branches)]


def modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in one element-wise pass (addcmul; the residuals below likewise)."""
    return torch.addcmul(shift, norm(x), 1 + scale)


class ResidualLayer(nn.Module):
    """``x += gate * attn(mod(norm(x)), ctx)``, then ``x += gate * mlp(mod(norm(x)))``.

    With ``ctx_dim`` None the attention is self-attention over ``x``; otherwise ``x`` attends to ``ctx``.
    """

    def __init__(self, dim: int, ctx_dim: int | None, inner: int, head_dim: int, mlp_ratio: float, cond_dim: int):
        super().__init__()
        self.cross = ctx_dim is not None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ctx_norm = nn.LayerNorm(ctx_dim) if self.cross else None
        self.attn = Attention(dim, ctx_dim or dim, inner, head_dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.mod = Modulation(cond_dim, dim, branches=2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        (s1, g1, a1), (s2, g2, a2) = self.mod(c)
        h = modulate(self.norm1, x, s1, g1)
        x = torch.addcmul(x, a1, self.attn(h, self.ctx_norm(ctx) if self.cross else h, mask))
        return torch.addcmul(x, a2, self.mlp(modulate(self.norm2, x, s2, g2)))


class TokenConv(nn.Module):
    """``x += gate * proj(gelu(conv(mod(norm(x)))))``, conv depthwise over the token grid, adaLN-Zero like the others.

    Data tokens otherwise meet only through the latents, so neighbouring tokens decide their pixels on their own
    and a shape comes out as specks, each token's own guess; this local path lets them agree. Its modulation lets
    the condition steer it: a class that names a direction of motion selects the matching shift in time."""

    def __init__(self, dim: int, grid: tuple[int, int, int], kernel: int, cond_dim: int, impl: str = "auto"):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.conv = GridConv(dim, grid, kernel, impl)
        self.proj = nn.Linear(dim, dim)
        self.mod = Modulation(cond_dim, dim, branches=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        (shift, scale, gate), = self.mod(c)
        y = self.conv(modulate(self.norm, x, shift, scale))
        return torch.addcmul(x, gate, self.proj(nn.functional.gelu(y, approximate="tanh")))


class GridConv(nn.Conv3d):
    """Depthwise convolution over the token grid of [B, N, C] tokens (kernels.token_conv; ``impl``: model.kernels).

    Called as a module of its own: ZeRO-3 gathers a module's weights when it runs, and weights read from a module
    that never runs broke its prefetch trace on the first resume."""

    def __init__(self, dim: int, grid: tuple[int, int, int], kernel: int, impl: str = "auto"):
        super().__init__(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.grid, self.impl = grid, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_conv(x, self.grid, self.weight, self.bias, self.impl)


class PixelHead(nn.Module):
    """``out += conv(gate * gelu(mod(norm(conv([out, x])))))`` over each frame's pixels (3x3 convolutions).

    Every pixel of a token is otherwise a linear read-out of that token alone, so the few pixels that tell a small
    circle from a square, at the edge between two tokens, are guessed by each token on its own. This pass sees the
    network's input pixels beside its output, like a U-Net's last skip connection. The per-pixel norm bounds its
    output whatever its input: without it the head's gain on ``x`` fed back through the sampler and blew up."""

    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.inp = nn.Conv3d(6, hidden, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.out = nn.Conv3d(hidden, 3, (1, 3, 3), padding=(0, 1, 1))
        nn.init.zeros_(self.out.bias)  # with the zero-initialised gate, a fresh head passes ``out`` through
        self.mod = Modulation(cond_dim, hidden, branches=1)

    def forward(self, out: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """out (the tokens' pixels) and x (the network's input) [N,3,t,h,w], conditioning c [N,Z] -> like out."""
        (shift, scale, gate), = self.mod(c)  # [N,1,hidden] each
        y = self.inp(torch.cat([out, x.to(out.dtype)], 1)).movedim(1, -1)  # [N,t,h,w,hidden]
        y = modulate(self.norm, y, shift[:, None, None], scale[:, None, None])
        y = gate[:, None, None] * nn.functional.gelu(y, approximate="tanh")
        return out + self.out(y.movedim(-1, 1))
