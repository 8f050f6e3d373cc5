import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from hpdm.pyramid import boxes_from_offsets, level_resolution, sample_offsets
from kernels import gather_pyramid_reference

PATCH = (4, 8, 6)


def test_level_patch_is_crop_of_downsampled_video():
    levels, B = 3, 4
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (B, *(p * 4 for p in PATCH), 3), dtype=torch.uint8, generator=g)
    offsets = sample_offsets(B, levels, PATCH, g)
    out = gather_pyramid_reference(video, offsets, PATCH)
    assert out.shape == (B, levels, 3, *PATCH) and out.dtype == torch.float32
    whole = video.permute(0, 4, 1, 2, 3).float()
    for l in range(levels):
        f = 2 ** (levels - 1 - l)
        down = F.avg_pool3d(whole, f) if f > 1 else whole
        assert down.shape[2:] == level_resolution(l, PATCH)
        for b in range(B):
            t, h, w = offsets[b, l].tolist()
            crop = down[b, :, t:t + PATCH[0], h:h + PATCH[1], w:w + PATCH[2]] / 127.5 - 1
            torch.testing.assert_close(out[b, l], crop, rtol=0, atol=1e-5)


def test_gather_rejects_box_outside_video():
    video = torch.zeros(1, 8, 16, 12, 3, dtype=torch.uint8)
    offsets = torch.tensor([[[0, 0, 0], [5, 0, 0]]])  # level 1 is 8 frames long: a 4-frame box at 5 overflows
    with pytest.raises(ValueError, match="outside the video"):
        gather_pyramid_reference(video, offsets, PATCH)


def test_boxes_nested_and_inside_video():
    levels = 4
    offsets = sample_offsets(5000, levels, PATCH, torch.Generator().manual_seed(1))
    for l in range(levels):
        res = torch.tensor(level_resolution(l, PATCH))
        assert (offsets[:, l] >= 0).all() and (offsets[:, l] + torch.tensor(PATCH) <= res).all()
    boxes = boxes_from_offsets(offsets, PATCH)
    assert torch.allclose(boxes[:, 0], torch.tensor([0, 0, 0, 1, 1, 1.0]))  # level 0 is the whole video
    eps = 1e-6
    assert (boxes[:, 1:, :3] >= boxes[:, :-1, :3] - eps).all()
    assert (boxes[:, 1:, 3:] <= boxes[:, :-1, 3:] + eps).all()
    # each finer box is half the size of its parent in every dimension
    size = boxes[..., 3:] - boxes[..., :3]
    torch.testing.assert_close(size[:, 1:] * 2, size[:, :-1])


def test_positions_uniform_inside_parent():
    levels, n = 3, 20000
    offsets = sample_offsets(n, levels, PATCH, torch.Generator().manual_seed(2))
    for l in range(1, levels):
        rel = offsets[:, l] - 2 * offsets[:, l - 1]  # position inside the parent box, in {0..patch}
        for d, p in enumerate(PATCH):
            counts = torch.bincount(rel[:, d], minlength=p + 1)
            assert counts.numel() == p + 1, "positions beyond the parent box"
            chi2 = stats.chisquare(counts.numpy())
            assert chi2.pvalue > 1e-4, f"level {l} dim {d}: not uniform (p={chi2.pvalue:.2e}, counts {counts.tolist()})"
