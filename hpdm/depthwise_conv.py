"""Depthwise 3-D convolution (stride 1, odd kernel, same padding) whose backward, on CPU, is two forward convolutions.

PyTorch's own CPU backward of a depthwise 3-D convolution is many times slower than its forward
(pytorch/pytorch#37406; on a 2-core CPU at the tiny config's size, 16x64 channels over an 8x4x4 grid, kernel 5:
18-37 ms against a 0.4 ms forward, a third of a training step). Both gradients are forward depthwise convolutions
(there 1-1.5 ms):

- input: the output gradient convolved with the kernel flipped in every dimension;
- weight: for each sample and channel, the input (padded as in the forward) correlated with that channel's output
  gradient as the kernel (a depthwise convolution over batch x channels, output the kernel's size), summed over
  the batch.

On a GPU PyTorch's own backward is used: there the weight gradient's convolution of batch x channels groups ran
as 2,048 cuDNN launches of ~0.2 ms per training step of configs/synthetic_gpu.yaml (400 ms of a 620 ms step on an
H200), where PyTorch's CUDA kernel reduces over batch and grid directly. ``benchmarks/token_conv.py`` times both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=k // 2, groups=C)`` for x [B, C, T, H, W], weight [C, 1, k, k, k], k odd;
    on CPU through the two-convolution backward, elsewhere PyTorch's own."""
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1] or len(set(weight.shape[2:])) != 1 \
            or weight.shape[-1] % 2 == 0:
        raise ValueError(f"depthwise_conv3d: weight {tuple(weight.shape)} is not [C, 1, k, k, k] with odd k "
                         f"for input {tuple(x.shape)}")
    if x.device.type != "cpu":
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return _DepthwiseConv3d.apply(x, weight, bias)
