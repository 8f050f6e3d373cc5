"""Deep context fusion: add to a level's data tokens the average of the coarser levels' token grids,
resampled trilinearly at the current level's token centres.

Boxes are ``(t0, h0, w0, t1, h1, w1)`` in normalised full-video coordinates. A token grid of ``n`` cells over a
box has its centres at ``lo + (i + 0.5) / n * (hi - lo)``, which is grid_sample's ``align_corners=False``
convention; coarser boxes contain finer ones, so border padding only matters at rounding level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import _triton


def _token_centres(box: torch.Tensor, shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """Per dimension (t, h, w): [B, n] token-centre positions in normalised video coordinates."""
    out = []
    for d, n in enumerate(shape):
        lo, hi = box[:, d:d + 1], box[:, d + 3:d + 4]
        u = (torch.arange(n, device=box.device, dtype=box.dtype) + 0.5) / n
        out.append(lo + u * (hi - lo))
    return out


def fusion_grid(box: torch.Tensor, ctx_boxes: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """grid_sample grid [B,K,t,h,w,3] (x=w, y=h, z=t in [-1, 1]) of the fine tokens inside each coarse box."""
    t, h, w = shape
    B, K = ctx_boxes.shape[:2]
    coords = []
    for d, pos in enumerate(_token_centres(box, shape)):
        lo, hi = ctx_boxes[..., d:d + 1], ctx_boxes[..., d + 3:d + 4]  # [B,K,1]
        coords.append((pos[:, None, :] - lo) / (hi - lo) * 2 - 1)  # [B,K,n]
    gt = coords[0][:, :, :, None, None].expand(B, K, t, h, w)
    gh = coords[1][:, :, None, :, None].expand(B, K, t, h, w)
    gw = coords[2][:, :, None, None, :].expand(B, K, t, h, w)
    return torch.stack([gw, gh, gt], dim=-1)


def context_fusion_reference(x: torch.Tensor, ctx: torch.Tensor, box: torch.Tensor,
                             ctx_boxes: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference.

    x [B,t,h,w,D] current level's tokens; ctx [B,K,tc,hc,wc,D] the K coarser levels' tokens; box [B,6] and
    ctx_boxes [B,K,6] their boxes. Returns ``x + mean_k resample(ctx[:, k])`` with the shape of ``x``.
    """
    B, t, h, w, D = x.shape
    K = ctx.shape[1]
    grid = fusion_grid(box.float(), ctx_boxes.float(), (t, h, w)).to(ctx.dtype)
    src = ctx.flatten(0, 1).permute(0, 4, 1, 2, 3)  # [B*K, D, tc, hc, wc]
    sampled = F.grid_sample(src, grid.flatten(0, 1), mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled.view(B, K, D, t, h, w).mean(dim=1).permute(0, 2, 3, 4, 1)
    return x + sampled.to(x.dtype)


# The Triton kernels as custom ops: opaque to torch.compile (which traces their fake implementations for shapes)
# and differentiable through register_autograd. Triton is imported only when an op first runs.
@torch.library.custom_op("hpdm::context_fusion", mutates_args=())
def _fusion_op(x: torch.Tensor, ctx: torch.Tensor, box: torch.Tensor, ctx_boxes: torch.Tensor) -> torch.Tensor:
    return _triton.load("context_fusion_triton", x).forward(x, ctx, box, ctx_boxes)


@_fusion_op.register_fake
def _(x, ctx, box, ctx_boxes):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("hpdm::context_fusion_backward", mutates_args=())
def _fusion_backward_op(grad: torch.Tensor, box: torch.Tensor, ctx_boxes: torch.Tensor, ctx_shape: list[int],
                        ctx_dtype: torch.dtype) -> torch.Tensor:
    return _triton.load("context_fusion_triton", grad).backward(grad, box, ctx_boxes, ctx_shape, ctx_dtype)


@_fusion_backward_op.register_fake
def _(grad, box, ctx_boxes, ctx_shape, ctx_dtype):
    return grad.new_empty(ctx_shape, dtype=ctx_dtype)


def _fusion_setup(ctx, inputs, output):  # ``ctx`` is autograd's context here, ``inputs[1]`` the coarse tokens
    _, coarse, box, ctx_boxes = inputs
    ctx.save_for_backward(box, ctx_boxes)
    ctx.coarse = (list(coarse.shape), coarse.dtype)


def _fusion_backward(ctx, grad):
    gctx = None
    if ctx.needs_input_grad[1]:
        gctx = _fusion_backward_op(grad, *ctx.saved_tensors, *ctx.coarse)
    return grad if ctx.needs_input_grad[0] else None, gctx, None, None


_fusion_op.register_autograd(_fusion_backward, setup_context=_fusion_setup)


def context_fusion_fused(x: torch.Tensor, ctx: torch.Tensor, box: torch.Tensor,
                         ctx_boxes: torch.Tensor) -> torch.Tensor:
    """The Triton kernels (the custom op ``hpdm::context_fusion``: autograd with a deterministic backward,
    traceable by torch.compile); same contract as the reference. Shapes are checked (a mismatch read out of
    bounds); box values are not, which would synchronise: every box must have lo < hi on each axis, as the
    model's do (the backward's gradient assumes it)."""
    if x.dim() != 5 or ctx.dim() != 6 or ctx.shape[0] != x.shape[0] or ctx.shape[-1] != x.shape[-1]:
        raise ValueError(f"x must be [B,t,h,w,D] and ctx [B,K,tc,hc,wc,D], got {tuple(x.shape)} and {tuple(ctx.shape)}")
    if tuple(box.shape) != (x.shape[0], 6) or tuple(ctx_boxes.shape) != (*ctx.shape[:2], 6):
        raise ValueError(f"box must be [B,6] and ctx_boxes [B,K,6] for x {tuple(x.shape)} and ctx {tuple(ctx.shape)}, "
                         f"got {tuple(box.shape)} and {tuple(ctx_boxes.shape)}")
    return _fusion_op(x, ctx, box, ctx_boxes)


def context_fusion(x: torch.Tensor, ctx: torch.Tensor, box: torch.Tensor, ctx_boxes: torch.Tensor,
                   impl: str = "auto") -> torch.Tensor:
    """Fuse coarser context into ``x``; ``impl`` is ``reference``, ``fused`` or ``auto`` (fused on GPU).

    With no coarser level (K = 0) there is nothing to fuse and ``x`` is returned as is."""
    if ctx.shape[1] == 0:
        return x
    if impl == "fused" or (impl == "auto" and x.is_cuda):
        return context_fusion_fused(x, ctx, box, ctx_boxes)
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'fused', got {impl!r}")
    return context_fusion_reference(x, ctx, box, ctx_boxes)
