"""The fused context-fusion kernels (forward and deterministic backward) against the reference."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported (lazily)

import pytest  # noqa: E402

from hpdm.pyramid import boxes_from_offsets, sample_offsets  # noqa: E402
from kernels.context_fusion import context_fusion  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B, levels, patch, coarse, D, dtype=torch.float32, offsets=None, seed=0):
    """Tokens of the finest level and the K = levels - 1 coarser levels' grids, with nested boxes."""
    g = torch.Generator().manual_seed(seed)
    if offsets is None:
        offsets = sample_offsets(B, levels, patch, g)
    boxes = boxes_from_offsets(offsets, patch).to(DEVICE)
    x = torch.randn(B, *patch, D, generator=g).to(DEVICE, dtype)
    ctx = torch.randn(B, levels - 1, *coarse, D, generator=g).to(DEVICE, dtype)
    return x, ctx, boxes[:, -1], boxes[:, :-1]


def _run(impl, x, ctx, box, cboxes, grad):
    x = x.detach().requires_grad_()
    ctx = ctx.detach().requires_grad_()
    out = context_fusion(x, ctx, box, cboxes, impl=impl)
    gx, gctx = torch.autograd.grad(out, (x, ctx), grad)
    return out.detach(), gx, gctx


@pytest.mark.parametrize("levels,coarse", [(2, (2, 3, 5)), (4, (2, 3, 5)), (3, (3, 2, 4))])
def test_fp32_forward_and_gradients_match_reference(levels, coarse):
    x, ctx, box, cboxes = _case(2, levels, (2, 3, 5), coarse, D=12)
    grad = torch.randn_like(x)
    fused = _run("fused", x, ctx, box, cboxes, grad)
    ref = _run("reference", x, ctx, box, cboxes, grad)
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
    assert fused[2].abs().sum() > 0  # the context did receive a gradient


@pytest.mark.parametrize("u", [0, 1])  # child box at the start / at the end of its parent, every dimension
def test_boxes_at_the_borders(u):
    patch = (2, 3, 4)
    offsets = torch.zeros(1, 3, 3, dtype=torch.long)
    for level in (1, 2):
        offsets[:, level] = 2 * offsets[:, level - 1] + u * torch.tensor(patch)
    x, ctx, box, cboxes = _case(1, 3, patch, patch, D=6, offsets=offsets)
    grad = torch.randn_like(x)
    for f, r in zip(_run("fused", x, ctx, box, cboxes, grad), _run("reference", x, ctx, box, cboxes, grad)):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_bf16_matches_fp32_reference_rounded_once():
    x, ctx, box, cboxes = _case(2, 3, (2, 3, 5), (2, 3, 5), D=10, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    fused = _run("fused", x, ctx, box, cboxes, grad)
    ref = _run("reference", x.float(), ctx.float(), box, cboxes, grad.float())
    assert all(t.dtype == torch.bfloat16 for t in fused)
    for f, r in zip(fused, ref):  # at most one bf16 rounding step apart
        torch.testing.assert_close(f.float(), r.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


def test_backward_is_deterministic_and_x_gradient_is_identity():
    x, ctx, box, cboxes = _case(2, 3, (2, 3, 5), (2, 3, 5), D=8)
    grad = torch.randn_like(x)
    _, gx1, gctx1 = _run("fused", x, ctx, box, cboxes, grad)
    _, gx2, gctx2 = _run("fused", x, ctx, box, cboxes, grad)
    assert torch.equal(gctx1, gctx2)
    assert torch.equal(gx1, grad)


def test_context_without_grad_and_no_context():
    x, ctx, box, cboxes = _case(1, 2, (2, 2, 3), (2, 2, 3), D=4)
    x = x.requires_grad_()
    out = context_fusion(x, ctx, box, cboxes, impl="fused")
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(gx, torch.ones_like(x)) and not ctx.requires_grad
    assert context_fusion(x, ctx[:, :0], box, cboxes[:, :0], impl="fused") is x


def test_boxes_of_another_batch_or_level_count_are_rejected():
    """The fused kernel read out of bounds (a segfault on CPU) where the reference raised."""
    x, ctx, box, cboxes = _case(2, 3, (2, 4, 4), (2, 3, 5), 8)
    for b, cb in ((box[:1], cboxes), (box, cboxes[:, :1])):
        with pytest.raises(ValueError, match=r"box must be \[B,6\] and ctx_boxes \[B,K,6\]"):
            context_fusion(x, ctx, b, cb, impl="fused")


def test_reference_gradcheck_float64():
    x, ctx, box, cboxes = _case(1, 3, (2, 2, 3), (2, 2, 3), D=2, dtype=torch.float64)
    x.requires_grad_()
    ctx.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: context_fusion(a, c, box, cboxes, impl="reference"), (x, ctx))


@pytest.mark.gpu
@pytest.mark.parametrize("levels", [2, 4])
def test_full_size_on_gpu(levels):
    x, ctx, box, cboxes = _case(16, levels, (8, 16, 16), (8, 16, 16), D=1024, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    fused = _run("fused", x, ctx, box, cboxes, grad)
    ref = _run("reference", x.float(), ctx.float(), box, cboxes, grad.float())
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f.float(), r.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-5)
    assert torch.equal(fused[2], _run("fused", x, ctx, box, cboxes, grad)[2])


def test_reference_geometry_on_a_linear_ramp():
    """Coarse tokens holding their own centre coordinates must resample to the fine tokens' centres (trilinear
    interpolation is exact on linear functions), clamped to the span of the coarse centres (border padding),
    and averaged over the coarser levels."""
    from hpdm.pyramid import boxes_from_offsets, sample_offsets
    from kernels.context_fusion import context_fusion_reference

    patch, grid = (4, 8, 8), (2, 4, 4)  # 2x2x2 pixel tokens
    offsets = sample_offsets(6, 3, patch, torch.Generator().manual_seed(3))
    boxes = boxes_from_offsets(offsets, patch).double()

    def centres(box):  # [B, t, h, w, 3] token centres in normalised video coordinates
        axes = [box[:, d:d + 1] + (torch.arange(n, dtype=torch.float64) + 0.5) / n * (box[:, d + 3:d + 4] - box[:, d:d + 1])
                for d, n in enumerate(grid)]
        return torch.stack(torch.broadcast_tensors(axes[0][:, :, None, None], axes[1][:, None, :, None],
                                                   axes[2][:, None, None, :]), dim=-1)

    for level in (1, 2):
        ctx = torch.stack([centres(boxes[:, k]) for k in range(level)], dim=1)  # [B, K, t, h, w, 3]
        out = context_fusion_reference(torch.zeros(6, *grid, 3, dtype=torch.float64), ctx, boxes[:, level], boxes[:, :level])
        fine = centres(boxes[:, level])
        expected = torch.stack([torch.maximum(torch.minimum(fine, c.amax(dim=(1, 2, 3), keepdim=True)),
                                              c.amin(dim=(1, 2, 3), keepdim=True)) for c in ctx.unbind(1)]).mean(0)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        assert not torch.allclose(out, centres(boxes[:, level - 1]))  # the boxes do matter
