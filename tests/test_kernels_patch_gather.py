"""The fused pyramid-gathering kernel against its reference (CPU: Triton interpreter; GPU: compiled)."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported (lazily)

import pytest  # noqa: E402

from hpdm.pyramid import sample_offsets  # noqa: E402
from kernels.patch_gather import gather_pyramid  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _video(B, T, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, H, W, 3), generator=g, dtype=torch.uint8).to(DEVICE)


def _tol(dtype):
    """Exact on CPU; on GPU a reference that multiplies by 1/count may sit one fp32 ulp away, which can flip
    one bf16 rounding."""
    return 2 ** -8 if dtype == torch.bfloat16 and DEVICE == "cuda" else 1e-6


def _both(video, offsets, patch, dtype, factors=None):
    fused = gather_pyramid(video, offsets, patch, dtype, impl="fused", factors=factors)
    ref = gather_pyramid(video, offsets, patch, dtype, impl="reference", factors=factors)
    return fused, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_nested_boxes_match_reference(dtype):
    patch = (2, 3, 5)  # odd sizes
    video = _video(2, 8, 12, 20)
    offsets = sample_offsets(2, 3, patch, torch.Generator().manual_seed(1))
    fused, ref = _both(video, offsets, patch, dtype)
    assert fused.shape == (2, 3, 3, *patch) and fused.dtype == dtype
    torch.testing.assert_close(fused, ref, rtol=0, atol=_tol(dtype))
    assert fused.min() >= -1 and fused.max() <= 1


def test_boxes_at_the_borders():
    patch, L = (1, 3, 3), 2
    video = _video(1, 2, 6, 12)
    # level 1 (full res): offset 0 and the largest offset; level 0 (2x down): 0 and max
    for lo in (True, False):
        offsets = torch.tensor([[[0, 0, 0] if lo else [0, 0, 3], [0, 0, 0] if lo else [1, 3, 9]]])
        fused, ref = _both(video, offsets, patch, torch.float32)
        torch.testing.assert_close(fused, ref, rtol=0, atol=1e-6)


def test_per_level_per_dimension_factors():
    patch = (2, 2, 3)
    factors = ((1, 4, 4), (1, 2, 2), (1, 1, 1))  # time kept at full rate, space halved per level
    video = _video(1, 2, 8, 12)
    offsets = torch.tensor([[[0, 0, 0], [0, 1, 2], [0, 5, 7]]])
    fused, ref = _both(video, offsets, patch, torch.float32, factors)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-6)
    block = video[0, 0:1, 0:4, 0:4].float().mean()  # level 0, channel-averaged first output value
    assert abs(fused[0, 0, :, 0, 0, 0].mean().item() - (block.item() / 127.5 - 1)) < 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_any_shape_factor_and_alignment_matches_reference(seed):
    """The kernel reads 4-byte words: rows of 3*W bytes that are not a multiple of 4, boxes starting inside a
    word, a video at an odd address (a slice) and a byte count not a multiple of 4 must not change a value."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    L = r(1, 3)
    factors = [tuple(r(1, 5) for _ in range(3)) for _ in range(L)]
    patch = (r(1, 2), r(1, 4), r(1, 9))
    shape = [max(p * f[d] for f in factors) + r(0, 3) for d, p in enumerate(patch)]
    B = r(1, 2)
    if seed % 3 == 2:  # an odd byte count
        B, shape = 1, [n | 1 for n in shape]
    flat = _video(1, 1, 1, B * math.prod(shape) + 1, seed=seed).view(-1)
    video = flat[seed % 2:][:B * math.prod(shape) * 3].view(B, *shape, 3)  # at an odd address for odd seeds
    offsets = torch.tensor([[[r(0, shape[d] // f[d] - patch[d]) for d in range(3)] for f in factors]
                            for _ in range(B)])
    fused, ref = _both(video, offsets, patch, torch.float32, factors)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-6)


def test_box_outside_the_video_is_rejected():
    video = _video(1, 2, 6, 6)
    with pytest.raises(ValueError, match="level 1 box"):
        gather_pyramid(video, torch.tensor([[[0, 0, 0], [0, 4, 0]]]), (1, 3, 3), impl="fused")


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_offsets_of_another_batch_or_not_integers_are_rejected(impl):
    """The kernel read out of bounds for offsets of another batch (a segfault on CPU) and truncated float ones."""
    video = _video(3, 2, 6, 6)
    with pytest.raises(ValueError, match=r"offsets must be \[B,L,3\] for the video's batch of 3, got \(1, 2, 3\)"):
        gather_pyramid(video, torch.zeros(1, 2, 3, dtype=torch.int64), (1, 3, 3), impl=impl)
    with pytest.raises(ValueError, match="offsets must be an integer tensor, got torch.float32"):
        gather_pyramid(video, torch.full((3, 2, 3), 0.5), (1, 3, 3), impl=impl)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only behaviour")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gather_pyramid(_video(1, 2, 4, 4), torch.zeros(1, 2, 3, dtype=torch.long), (1, 2, 2), impl="fused")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_on_gpu(dtype):
    patch = (16, 64, 64)
    video = _video(16, 64, 256, 256)
    offsets = sample_offsets(16, 3, patch, torch.Generator().manual_seed(2))
    fused, ref = _both(video, offsets, patch, dtype)
    torch.testing.assert_close(fused, ref, rtol=0, atol=_tol(dtype))
    factors = ((1, 8, 8), (1, 4, 4), (1, 2, 2))  # DESIGN.md's 16x512x512 clips
    video = _video(16, 16, 512, 512)
    offsets = torch.stack([torch.zeros(16, 3), torch.tensor([0, 17, 40]).expand(16, 3),
                           torch.tensor([0, 100, 191]).expand(16, 3)], 1).long()
    fused, ref = _both(video, offsets, patch, dtype, factors)
    torch.testing.assert_close(fused, ref, rtol=0, atol=_tol(dtype))
