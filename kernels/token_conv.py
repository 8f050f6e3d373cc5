"""The token convolution: a depthwise 3-D convolution (stride 1, odd kernel k, same padding) over a level's token
grid, on tokens held as the model holds them, x [B, N, C] with N = T * H * W.

The reference transposes to [B, C, T, H, W] and convolves with PyTorch. On CPU its backward is two forward
convolutions: PyTorch's own CPU backward of a depthwise 3-D convolution is many times slower than its forward
(pytorch/pytorch#37406; on a 2-core CPU at the tiny config's size, 16x64 channels over an 8x4x4 grid, kernel 5:
18-37 ms against a 0.4 ms forward, a third of a training step; the two convolutions take 1-1.5 ms):

- input: the output gradient convolved with the kernel flipped in every dimension;
- weight: for each sample and channel, the input (padded as in the forward) correlated with that channel's output
  gradient as the kernel (a depthwise convolution over batch x channels, output the kernel's size), summed over
  the batch.

On a GPU that weight gradient ran as 2,048 cuDNN launches of ~0.2 ms per training step of
configs/synthetic_gpu.yaml (400 ms of a 620 ms step on an H200), and PyTorch's own depthwise forward took 5 ms per
call there; the fused path (``kernels/token_conv_triton.py``) works on the token layout directly.
``benchmarks/token_conv.py`` times every path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import _triton


class _DepthwiseConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        # Under autocast the forward ran in grad's dtype; autograd casts the gradients back to the inputs' dtypes.
        x, weight = x.to(grad.dtype), weight.to(grad.dtype)
        B, C, *grid = x.shape
        pad = weight.shape[-1] // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=pad, groups=C)
        if ctx.needs_input_grad[1]:
            corr = F.conv3d(x.reshape(1, B * C, *grid), grad.reshape(B * C, 1, *grid), padding=pad,
                            groups=B * C)  # [1, B*C, k, k, k]
            grad_w = corr.view(B, C, *weight.shape[2:]).sum(0).unsqueeze(1)
        if ctx.needs_input_grad[2]:  # False when bias is None
            grad_b = grad.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b


def _check_weight(x_shape, weight: torch.Tensor, channels: int) -> None:
    if weight.dim() != 5 or weight.shape[1] != 1 or weight.shape[0] != channels \
            or len(set(weight.shape[2:])) != 1 or weight.shape[-1] % 2 == 0:
        raise ValueError(f"token conv: weight {tuple(weight.shape)} is not [C, 1, k, k, k] with odd k "
                         f"for input {tuple(x_shape)}")


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=k // 2, groups=C)`` for x [B, C, T, H, W], weight [C, 1, k, k, k], k odd;
    on CPU through the two-convolution backward, elsewhere PyTorch's own."""
    _check_weight(x.shape, weight, x.shape[1])
    if x.device.type != "cpu":
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return _DepthwiseConv3d.apply(x, weight, bias)


def token_conv_reference(x: torch.Tensor, grid: tuple[int, int, int], weight: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: x [B, N, C] over the token grid ``grid`` (T, H, W) -> [B, N, C]."""
    B, N, C = x.shape
    y = depthwise_conv3d(x.transpose(1, 2).reshape(B, C, *grid), weight, bias)
    return y.reshape(B, C, N).transpose(1, 2)


# The Triton kernels as custom ops: opaque to torch.compile (which traces their fake implementations for shapes)
# and differentiable through register_autograd. Triton is imported only when an op first runs.
@torch.library.custom_op("hpdm::token_conv", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: list[int],
             flip: bool) -> torch.Tensor:
    return _triton.load("token_conv_triton", x).conv(x, weight, bias, grid, flip)


@_conv_op.register_fake
def _(x, weight, bias, grid, flip):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("hpdm::token_conv_weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, grad: torch.Tensor, grid: list[int], k: int) -> torch.Tensor:
    return _triton.load("token_conv_triton", x).weight_grad(x, grad, grid, k)


@_weight_grad_op.register_fake
def _(x, grad, grid, k):
    return x.new_empty((x.shape[-1], 1, k, k, k), dtype=torch.float32)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, grid, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.grid = grid
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _conv_op(grad, weight, None, ctx.grid, True)
    if ctx.needs_input_grad[1]:
        grad_w = _weight_grad_op(x, grad, ctx.grid, weight.shape[-1]).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = grad.sum((0, 1), dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def token_conv_fused(x: torch.Tensor, grid: tuple[int, int, int], weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernels (custom op ``hpdm::token_conv``: autograd with a deterministic backward, traceable by
    torch.compile); same contract as the reference. The output is in x's dtype."""
    if x.dim() != 3 or x.shape[1] != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"token conv: x must be [B, N, C] with N = {'x'.join(map(str, grid))}, "
                         f"got {tuple(x.shape)}")
    _check_weight(x.shape, weight, x.shape[-1])
    return _conv_op(x, weight, bias, list(grid), False)


def token_conv(x: torch.Tensor, grid: tuple[int, int, int], weight: torch.Tensor, bias: torch.Tensor | None = None,
               impl: str = "auto") -> torch.Tensor:
    """Convolve tokens x [B, N, C] over their grid; ``impl`` is ``reference``, ``fused`` or ``auto`` (fused on
    GPU)."""
    if impl == "fused" or (impl == "auto" and x.is_cuda):
        return token_conv_fused(x, grid, weight, bias)
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'fused', got {impl!r}")
    return token_conv_reference(x, grid, weight, bias)
