"""The synthetic measure: real clips of the set score close to 1, noise and wrong videos score 0."""
import io

import av
import numpy as np
import pytest
import torch

from data_pipeline.synthetic import class_name, render
from data_pipeline.video import encode
from hpdm.synthetic_eval import _components, _majority, coarse_to_fine, evaluate_videos, frame_shapes, video_report
from kernels import gather_pyramid

CLASSES = 36  # every direction, kind and the first three colours


def _decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def clips():
    """24 real clips of 32 frames at 128x128 (as the tiny config's full resolution), through H.264 and back."""
    videos = [_decode(encode(render(i % CLASSES, 48, 128, 128, seed=i)[:32], 24.0)) for i in range(24)]
    return videos, [i % CLASSES for i in range(24)]


def test_real_clips_score_close_to_one(clips):
    videos, labels = clips
    result = evaluate_videos(videos, labels)
    assert result["one_shape"] == 1.0 and result["direction"] == 1.0
    assert result["class_correct"] >= 0.95, result


def test_real_clips_score_close_to_one_at_the_coarsest_level(clips):
    """Level 0 of the tiny config: 4x down in time and space (motion blur, 6-pixel shapes)."""
    videos, labels = clips
    offsets = torch.zeros(len(videos), 1, 3, dtype=torch.long)
    x = gather_pyramid(torch.from_numpy(np.stack(videos)), offsets, (8, 32, 32), factors=[(4, 4, 4)])[:, 0]
    small = [((v.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy() for v in x]
    result = evaluate_videos(small, labels)
    assert result["one_shape"] >= 0.95 and result["class_correct"] >= 0.9, result


def test_noise_and_blank_videos_score_zero(clips):
    g = np.random.default_rng(0)
    videos, labels = clips
    noise = [g.integers(0, 256, v.shape, dtype=np.uint8) for v in videos[:6]]
    noisy = [np.clip(v + g.normal(0, 60, v.shape), 0, 255).astype(np.uint8) for v in videos[:6]]
    blank = [np.broadcast_to(v[:, :, :1].mean((0, 2), keepdims=True), v.shape).astype(np.uint8) for v in videos[:6]]
    for bad in (noise, noisy, blank):
        result = evaluate_videos(bad, labels[:6])
        assert result["one_shape"] <= 0.05 and result["class_correct"] == 0.0, result


def test_wrong_class_two_shapes_and_reversed_motion_fail(clips):
    videos, labels = clips
    v, label = videos[0], labels[0]  # a red square moving left
    assert class_name(label) == "red square moving left"
    assert video_report(v, label)["class_correct"] > 0.95
    wrong = video_report(v, label + 4)  # a red circle moving left
    assert wrong["one_shape"] == 1.0 and wrong["kind"] == 0.0 and wrong["class_correct"] == 0.0
    assert video_report(v[::-1], label)["direction"] == 0.0  # moving right
    twice = np.maximum(v, np.roll(v, 64, axis=1))  # a second copy of the shape half a frame away
    assert video_report(twice, label)["one_shape"] == 0.0
    still = np.repeat(v[:1], len(v), axis=0)
    assert video_report(still, label)["direction"] == 0.0
    assert video_report(v, None)["class_correct"] > 0.95  # unconditional: judged against the class it shows


def test_shapes_wrapping_around_the_edges_count_once():
    v = render(1, 48, 64, 64, seed=3)  # a red square moving right
    cy, cx = frame_shapes(v)[0].centre
    straddling = np.roll(v, (32 - round(cy), -round(cx)), axis=(1, 2))  # frame 0's shape split by the left and right edges
    shapes = frame_shapes(straddling)
    assert all(s is not None and s.kind == "square" for s in shapes)
    assert min(shapes[0].centre[1], 64 - shapes[0].centre[1]) < 1.0
    assert video_report(straddling, 1)["class_correct"] == 1.0


def test_coarse_to_fine_is_zero_for_a_true_pyramid_and_large_for_unrelated_levels():
    g = torch.Generator().manual_seed(0)
    fine = torch.rand(2, 3, 8, 32, 32, generator=g) * 2 - 1
    coarse = torch.nn.functional.avg_pool3d(fine, 2)
    assert coarse_to_fine([coarse, fine])[0] < 1e-6
    assert coarse_to_fine([torch.rand(2, 3, 4, 16, 16, generator=g) * 2 - 1, fine])[0] > 0.3


def test_a_tied_majority_counts_as_none():
    """Colour and kind are majorities over frames; a tie is no majority (a set's order, which varies with
    PYTHONHASHSEED between processes, used to pick one, so one video could score differently run to run)."""
    assert _majority(["circle", "square", "square"]) == "square"
    assert _majority(["circle", "square", "square", "circle"]) is None
    assert _majority([]) is None


def _flood_fill(mask: np.ndarray) -> np.ndarray:
    """Plain flood-fill reference (depth-first): each 8-connected component on the torus gets its largest pixel id."""
    H, W = mask.shape
    out = np.zeros((H, W), np.int64)
    for start in zip(*np.nonzero(mask)):
        if out[start]:
            continue
        seen, todo = {start}, [start]
        while todo:
            y, x = todo.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    n = ((y + dy) % H, (x + dx) % W)
                    if mask[n] and n not in seen:
                        seen.add(n)
                        todo.append(n)
        label = max(y * W + x for y, x in seen) + 1
        for p in seen:
            out[p] = label
    return out


def test_components_match_a_flood_fill_on_the_torus():
    g = np.random.default_rng(0)
    for density in (0.1, 0.3, 0.45, 0.6, 0.9):
        masks = g.random((4, 13, 19)) < density
        got = _components(torch.from_numpy(masks)).numpy()
        for m, labels in zip(masks, got):
            np.testing.assert_array_equal(labels, _flood_fill(m))
    snake = np.zeros((15, 15), bool)  # one long winding component: many steps for plain propagation
    snake[1::4, 1:14] = True
    snake[2:5, 13] = snake[6:9, 1] = snake[10:13, 13] = True
    got = _components(torch.from_numpy(snake[None])).numpy()[0]
    np.testing.assert_array_equal(got, _flood_fill(snake))
    assert len(np.unique(got[snake])) == 1
