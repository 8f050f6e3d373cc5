"""hpdm.depthwise_conv against PyTorch's own depthwise convolution: same output, same three gradients."""
import pytest
import torch
import torch.nn.functional as F

from hpdm.depthwise_conv import depthwise_conv3d


def _reference(x, w, b):
    return F.conv3d(x, w, b, padding=w.shape[-1] // 2, groups=x.shape[1])


@pytest.mark.parametrize("k,grid,bias", [(1, (2, 3, 3), True), (3, (4, 2, 5), False), (5, (8, 4, 4), True),
                                         (5, (3, 2, 2), True)])  # the last: a kernel wider than the grid
def test_output_and_gradients_match_pytorch(k, grid, bias):
    gen = torch.Generator().manual_seed(k)
    B, C = 3, 6
    x = torch.randn(B, C, *grid, generator=gen)
    w = torch.randn(C, 1, k, k, k, generator=gen)
    b = torch.randn(C, generator=gen) if bias else None
    grad = torch.randn(B, C, *grid, generator=gen)
    results = []
    for conv in (depthwise_conv3d, _reference):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        out = conv(leaves[0], leaves[1], leaves[2] if bias else None)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


def test_gradcheck_in_float64_with_a_strided_input():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 3 * 2 * 4, 5, dtype=torch.float64, generator=gen)  # [B, N, C] as the model holds them
    x = tokens.transpose(1, 2).reshape(2, 5, 3, 2, 4).requires_grad_()
    w = torch.randn(5, 1, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(depthwise_conv3d, (x, w, b))
    x_view = tokens.clone().requires_grad_()  # a non-contiguous view reaches the function, as in TokenConv
    assert torch.autograd.gradcheck(lambda t: depthwise_conv3d(t.transpose(1, 2).reshape(2, 5, 3, 2, 4), w, b),
                                    (x_view,))


def test_bf16_gradients_stay_near_float32():
    gen = torch.Generator().manual_seed(1)
    x, grad = torch.randn(4, 8, 8, 4, 4, generator=gen), torch.randn(4, 8, 8, 4, 4, generator=gen)
    w = torch.randn(8, 1, 5, 5, 5, generator=gen) / 10
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        xl, wl = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        depthwise_conv3d(xl, wl).backward(grad.to(dtype))
        grads[dtype] = (xl.grad.float(), wl.grad.float())
    for low, full in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert low.dtype == torch.float32 and (low - full).norm() / full.norm() < 2e-2


def test_autocast_gives_pytorchs_gradients_in_the_parameters_dtype():
    gen = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(shape, generator=gen) for shape in ((2, 4, 4, 3, 3), (4, 1, 3, 3, 3), (4,)))
    results = []
    for conv in (depthwise_conv3d, _reference):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(*leaves)
        out.float().square().sum().backward()
        assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.float32 for t in leaves)
        results.append([t.grad for t in leaves])
    # Both round to bf16 in different places, so single elements can differ by a few bf16 steps: compare norms.
    for ours, theirs in zip(*results):
        assert (ours - theirs).norm() / theirs.norm() < 2e-2


def test_only_the_gradients_asked_for_are_computed():
    x = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, 3)  # frozen
    depthwise_conv3d(x, w).sum().backward()
    assert x.grad is not None and w.grad is None
    x2, w2 = x.detach(), w.clone().requires_grad_()
    depthwise_conv3d(x2, w2).sum().backward()
    torch.testing.assert_close(w2.grad, torch.autograd.grad(_reference(x2, w2, None).sum(), w2)[0])


@pytest.mark.parametrize("shape", [(4, 1, 2, 2, 2), (4, 1, 3, 3, 1), (4, 2, 3, 3, 3), (3, 1, 3, 3, 3)])
def test_a_weight_that_is_not_depthwise_odd_and_cubic_is_refused(shape):
    with pytest.raises(ValueError, match=r"not \[C, 1, k, k, k\]"):
        depthwise_conv3d(torch.randn(1, 4, 3, 3, 3), torch.randn(shape))


def test_the_two_convolution_backward_is_for_cpu_only():
    """Elsewhere PyTorch's own backward runs: on a GPU ours was the slower (hpdm/depthwise_conv.py)."""
    for device, backward in (("cpu", "_DepthwiseConv3dBackward"), ("meta", "ConvolutionBackward0")):
        x = torch.ones(2, 4, 3, 3, 3, device=device, requires_grad=True)
        assert type(depthwise_conv3d(x, torch.ones(4, 1, 3, 3, 3, device=device)).grad_fn).__name__ == backward


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gradients_match_the_cpus_at_the_gpu_recipes_size(dtype):
    """configs/synthetic_gpu.yaml's token grid and width (the recipe runs 256 clips; 8 here), PyTorch's CUDA
    backward against the two-convolution one on CPU in float32."""
    gen = torch.Generator().manual_seed(2)
    x, grad = torch.randn(8, 256, 8, 8, 8, generator=gen), torch.randn(8, 256, 8, 8, 8, generator=gen)
    w, b = torch.randn(256, 1, 5, 5, 5, generator=gen) / 10, torch.randn(256, generator=gen)
    results = []
    for device, dt in (("cuda", dtype), ("cpu", torch.float32)):
        leaves = [t.to(device, dt, copy=True).requires_grad_() for t in (x, w, b)]
        depthwise_conv3d(*leaves).backward(grad.to(device, dt))
        results.append([t.grad.float().cpu() for t in leaves])
    for gpu, cpu in zip(*results):
        assert (gpu - cpu).norm() / cpu.norm() < (1e-2 if dtype == torch.float32 else 3e-2)
