"""The token convolution (kernels/token_conv.py): its CPU path (the two-convolution backward) and its Triton
kernels against PyTorch's own depthwise convolution: same output, same three gradients (CPU: Triton interpreter)."""
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported (lazily)

import pytest  # noqa: E402

from kernels.token_conv import depthwise_conv3d, token_conv, token_conv_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    """Elsewhere PyTorch's own backward runs: on a GPU ours was the slower (kernels/token_conv.py)."""
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


def _token_case(B, C, grid, k, dtype=torch.float32, bias=True, seed=0):
    """Tokens [B, N, C], weight, bias and an output gradient, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1] * grid[2]
    x, grad = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    w, b = torch.randn(C, 1, k, k, k, generator=g) / k, torch.randn(C, generator=g) if bias else None
    return [None if t is None else t.to(DEVICE, dtype) for t in (x, w, b, grad)]


def _token_run(impl, grid, x, w, b, grad):
    leaves = [t.detach().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    out = token_conv(leaves[0], grid, leaves[1], leaves[2] if b is not None else None, impl=impl)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


# 3 x 128 = 384 rows: 6 row blocks of the forward, 2 partial sums of the weight gradient; 70 channels: a partial
# channel block in both
@pytest.mark.parametrize("k,grid,C,bias", [(5, (8, 4, 4), 70, True), (3, (4, 2, 5), 8, False),
                                           (5, (3, 2, 2), 6, True), (1, (2, 3, 3), 5, True)])
def test_fused_output_and_gradients_match_the_reference(k, grid, C, bias):
    x, w, b, grad = _token_case(3, C, grid, k, bias=bias, seed=k)
    fused, ref = _token_run("fused", grid, x, w, b, grad), _token_run("reference", grid, x, w, b, grad)
    for name, f, r in zip(("output", "grad x", "grad weight", "grad bias"), fused, ref):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-4, msg=name)


def test_fused_bf16_matches_the_fp32_reference():
    """bf16 tokens and weights: fp32 accumulation and one rounding on store, so the output is the fp32 reference
    of the same bf16 values, rounded (within one bf16 step: the two sum in different orders)."""
    grid = (4, 4, 4)
    x, w, b, grad = _token_case(2, 16, grid, 3, dtype=torch.bfloat16)
    fused = _token_run("fused", grid, x, w, b, grad)
    ref = _token_run("reference", grid, *(t.float() for t in (x, w, b, grad)))
    assert all(t.dtype == torch.bfloat16 for t in fused)
    torch.testing.assert_close(fused[0], ref[0].bfloat16())
    for f, r in zip(fused[1:], ref[1:]):
        assert (f.float() - r).norm() / r.norm() < 1e-2


def test_fused_backward_is_deterministic_and_computes_only_what_is_asked():
    grid = (4, 4, 4)
    x, w, b, grad = _token_case(4, 16, grid, 3)
    first, second = _token_run("fused", grid, x, w, b, grad), _token_run("fused", grid, x, w, b, grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    xl = x.detach().requires_grad_()
    token_conv(xl, grid, w, None, impl="fused").backward(grad)  # a frozen weight gets no gradient
    torch.testing.assert_close(xl.grad, first[1], rtol=1e-5, atol=1e-4)
    assert w.grad is None


def test_dispatch_and_bad_arguments():
    x, w, b, _ = _token_case(1, 4, (2, 2, 2), 3)
    ref = token_conv_reference(x.cpu(), (2, 2, 2), w.cpu(), b.cpu())
    torch.testing.assert_close(token_conv(x.cpu(), (2, 2, 2), w.cpu(), b.cpu()), ref)  # auto on CPU: the reference
    with pytest.raises(ValueError, match="impl must be"):
        token_conv(x, (2, 2, 2), w, b, impl="triton")
    with pytest.raises(ValueError, match=r"N = 2x2x3"):
        token_conv(x, (2, 2, 3), w, b, impl="fused")
    with pytest.raises(ValueError, match=r"not \[C, 1, k, k, k\]"):
        token_conv(x, (2, 2, 2), w[:, :, :2], b, impl="fused")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_at_the_gpu_recipes_size_matches_the_cpu(dtype):
    """configs/synthetic_gpu.yaml's token grid and width (8 clips of the recipe's 256) and HPDM-S's (1024 wide,
    kernel 3, 16x16x16 tokens): the Triton kernels on the GPU against the CPU reference in float32."""
    for B, C, grid, k in ((8, 256, (8, 8, 8), 5), (2, 1024, (16, 16, 16), 3)):
        g = torch.Generator().manual_seed(4)
        N = grid[0] * grid[1] * grid[2]
        x, grad = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
        w, b = torch.randn(C, 1, k, k, k, generator=g) / k, torch.randn(C, generator=g)
        results = [_token_run("fused", grid, *(t.to("cuda", dtype) for t in (x, w, b, grad))),
                   _token_run("reference", grid, x, w, b, grad)]
        for name, gpu, cpu in zip(("output", "grad x", "grad weight", "grad bias"), *results):
            err = (gpu.float().cpu() - cpu).norm() / cpu.norm()
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (name, B, C, grid, k, err.item())


def test_a_strided_bias_is_read_as_its_values():
    """The kernel read the bias with stride 1: a view such as b[::2] gave outputs off by up to 3."""
    x, w, b, _ = _token_case(2, 6, (2, 3, 2), 3, bias=True)
    strided = torch.randn(12, generator=torch.Generator().manual_seed(1)).to(DEVICE)[::2]
    torch.testing.assert_close(token_conv(x, (2, 3, 2), w, strided, impl="fused"),
                               token_conv(x, (2, 3, 2), w, strided.contiguous(), impl="reference"),
                               rtol=1e-5, atol=1e-4)

