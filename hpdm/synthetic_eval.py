"""A quality measure for the synthetic moving-shapes set, from its known structure (``data_pipeline.synthetic``).

Every synthetic clip shows one shape of a class-given colour and kind, moving in a class-given direction (wrapping
around the edges) over a static background that varies only from row to row. So a generated video can be checked
frame by frame without any learned detector:

- background: the per-row median colour over all columns and frames (the shape covers at most a third of a row
  and moves, so the median is the background);
- shape: the pixels farther than ``threshold`` from their row's background, grouped into 8-connected blobs on the
  torus (the set wraps around the edges); a frame *shows one shape* when exactly one blob is larger than a speck
  and it has a plausible area and few stray pixels around it;
- colour: the nearest of the set's colours to the blob's mean colour; kind: whichever of a square, a circle and
  a triangle, drawn by the renderer's own rule in the blob's bounding box, overlaps it best; a video's colour and kind are the majority over
  its frames (a few pixels decide between a small square and a circle, so single frames are noisy);
- direction: the dominant axis and sign of the blob's centre's movement over the video (wrap-aware).

``class_correct`` is, averaged over videos, the fraction of frames that show one shape, counted only in videos
whose colour, kind and direction of motion are the class's. Real clips score close to 1, noise 0.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.storage import without_userinfo
from data_pipeline.synthetic import COLOURS, SHAPES, class_name, shape_mask
from hpdm.errors import UsageError
from hpdm.pyramid import level_resolution

log = logging.getLogger(__name__)

# Shape half-size r is drawn from [0.1, 0.18] x the short side (at least 3 pixels); areas run from a small triangle
# (2 r^2) to a big square ((2 r + 1)^2). A frame's blob must lie within these bounds, widened for blur and compression.
RADIUS_RANGE = (0.1, 0.18)
COLOUR_TABLE = np.array(list(COLOURS.values()), dtype=np.float64)


@dataclass
class FrameShape:
    area: int
    centre: tuple[float, float]  # (y, x) in pixels
    colour: str
    kind: str


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Labels of the 8-connected components of ``mask`` [N,H,W] on the torus (0: background): every pixel takes
    the largest pixel id of its component, spread by 3x3 max pooling and sped up by pointer jumping (a pixel also
    takes the label of the pixel its label names, which lies in its component), until nothing changes."""
    N, H, W = mask.shape
    keep = mask.reshape(N, H * W).float()
    ids = torch.arange(1, H * W + 1, dtype=torch.float32).expand(N, H * W)
    lab = ids * keep
    while True:
        grown = F.max_pool2d(F.pad(lab.view(N, 1, H, W), (1, 1, 1, 1), mode="circular"), 3, stride=1).view(N, H * W)
        grown = grown * keep
        jumped = torch.maximum(grown, grown.gather(1, (grown.long() - 1).clamp(min=0)) * keep)
        if torch.equal(jumped, lab):
            return lab.view(N, H, W).long()
        lab = jumped


def _circular_mean(coords: np.ndarray, size: int) -> float:
    a = coords * (2 * math.pi / size)
    return (math.atan2(np.sin(a).mean(), np.cos(a).mean()) * size / (2 * math.pi)) % size


def _kind(blob: np.ndarray) -> str:
    """Square, circle or triangle: the shape, drawn by the renderer's own rule in the blob's bounding box (sizes
    and centres within a pixel of it), that overlaps the blob best. ``blob`` is centred (no wrap)."""
    ys, xs = np.nonzero(blob)
    # Every candidate shape lies within a pixel of the bounding box: compare there only.
    y0, x0 = max(ys.min() - 2, 0), max(xs.min() - 2, 0)
    blob = blob[y0:ys.max() + 3, x0:xs.max() + 3]
    cy, cx = (ys.min() + ys.max()) / 2 - y0, (xs.min() + xs.max()) / 2 - x0
    r0 = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2
    y, x = np.mgrid[0:blob.shape[0], 0:blob.shape[1]]
    best: dict[str, float] = {}
    for kind in SHAPES:
        for r in (r0 - 0.5, r0, r0 + 0.5):
            for dy in (-0.5, 0.0, 0.5):
                for dx in (-0.5, 0.0, 0.5):
                    t = shape_mask(kind, x - cx - dx, y - cy - dy, r)
                    best[kind] = max(best.get(kind, 0.0), (blob & t).sum() / (blob | t).sum())
    return max(best, key=best.get)


def frame_shapes(video: np.ndarray, threshold: float = 50.0) -> list[FrameShape | None]:
    """Per frame of a uint8 [T,H,W,3] video, its one shape, or None where it does not show exactly one."""
    T, H, W, _ = video.shape
    v = video.astype(np.float64)
    background = np.median(v.transpose(1, 0, 2, 3).reshape(H, T * W, 3), axis=1)  # [H,3]
    dist = np.linalg.norm(v - background[None, :, None], axis=-1)  # [T,H,W]
    mask = dist > threshold
    labels = _components(torch.from_numpy(mask)).numpy()
    short = min(H, W)
    r_lo, r_hi = (max(3, int(f * short)) for f in RADIUS_RANGE)
    lo, hi = 0.5 * 2 * r_lo ** 2, 1.6 * (2 * r_hi + 1) ** 2
    speck = max(2, int(0.25 * lo))
    out: list[FrameShape | None] = []
    for t in range(T):
        ids, counts = np.unique(labels[t][labels[t] > 0], return_counts=True)
        big = ids[counts >= speck]
        if len(big) != 1:
            out.append(None)
            continue
        area = int(counts[counts >= speck][0])
        stray = int(mask[t].sum()) - area
        if not lo <= area <= hi or stray > 0.25 * area:
            out.append(None)
            continue
        blob = labels[t] == big[0]
        # Blur (of downsampling, motion, compression) widens the blob: judge kind and colour at half maximum.
        peak = np.percentile(dist[t][blob], 90)
        core = blob & (dist[t] >= 0.5 * peak)
        ys, xs = np.nonzero(core)
        cy, cx = _circular_mean(ys, H), _circular_mean(xs, W)
        centred = np.roll(core, (H // 2 - int(round(cy)), W // 2 - int(round(cx))), axis=(0, 1))
        mean = v[t][blob & (dist[t] >= 0.75 * peak)].mean(0)
        colour = list(COLOURS)[int(np.argmin(np.linalg.norm(COLOUR_TABLE - mean, axis=1)))]
        out.append(FrameShape(area, (cy, cx), colour, _kind(centred)))
    return out


def direction(shapes: list[FrameShape | None], size: tuple[int, int]) -> str | None:
    """The dominant direction of motion of the shape (left/right/up/down), or None if it barely moves."""
    H, W = size
    dy = dx = 0.0
    for a, b in zip(shapes, shapes[1:]):
        if a is not None and b is not None:
            dy += (b.centre[0] - a.centre[0] + H / 2) % H - H / 2
            dx += (b.centre[1] - a.centre[1] + W / 2) % W - W / 2
    travel = max(abs(dx), abs(dy))
    if travel < 0.1 * min(H, W) or min(abs(dx), abs(dy)) > 0.5 * travel:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _majority(values: list[str]) -> str | None:
    """The most frequent value; None when there is none or two tie (a set's order would pick one at random)."""
    top = Counter(values).most_common(2)
    return None if not top or len(top) == 2 and top[0][1] == top[1][1] else top[0][0]


def video_report(video: np.ndarray, label: int | None) -> dict:
    """Measures of one uint8 [T,H,W,3] video against class ``label`` (None: unconditional, judged against the
    class the video shows). Colour and kind are the majority over the frames that show one shape."""
    shapes = frame_shapes(video)
    seen = [s for s in shapes if s is not None]
    got = (_majority([s.colour for s in seen]), _majority([s.kind for s in seen]), direction(shapes, video.shape[1:3]))
    if label is None:
        want = got if None not in got else ("", "", "")
    else:
        colour, kind, _, moving = class_name(label).split(" ")
        want = (colour, kind, moving)
    ok = [g == w for g, w in zip(got, want)]
    one = len(seen) / len(shapes)
    return {"one_shape": one, "colour": float(ok[0]), "kind": float(ok[1]), "direction": float(ok[2]),
            "class_correct": one * float(all(ok))}


def coarse_to_fine(levels: list[torch.Tensor]) -> list[float]:
    """RMS difference, in [-1, 1] units, between each level area-downsampled 2x and the level below it.
    ``levels``: canvases [V,3,T,H,W], coarsest first."""
    return [float((F.avg_pool3d(fine.float().clamp(-1, 1), 2) - coarse.float().clamp(-1, 1)).pow(2).mean().sqrt())
            for coarse, fine in zip(levels, levels[1:])]


def evaluate_videos(videos: list[np.ndarray], labels: list[int | None]) -> dict:
    """Mean of the per-video measures over uint8 [T,H,W,3] videos."""
    reports = [video_report(v, l) for v, l in zip(videos, labels)]
    return {k: float(np.mean([r[k] for r in reports])) for k in reports[0]} | {"videos": len(videos)}


def level_reports(levels: list[torch.Tensor], labels: list[int | None]) -> dict:
    """The measures of every level's videos (canvases [V,3,T,H,W] in [-1, 1], coarsest first), the last level's
    as the headline, plus the coarse-to-fine RMS differences."""
    from hpdm.video_io import to_uint8  # noqa: PLC0415

    per_level = [evaluate_videos([to_uint8(x) for x in canvas], labels) for canvas in levels]
    return {**per_level[-1], "levels": per_level, "coarse_to_fine_rms": coarse_to_fine(levels)}


def evaluate_generator(generator: str, num: int, opts, seed: int = 0, batch: int = 4, raw: bool = False,
                       progress: bool = True) -> dict:
    """Sample ``num`` videos from a generator (classes in turn; unconditional models judged by consistency) and
    measure every level."""
    from hpdm.export import load_generator  # noqa: PLC0415
    from hpdm.generate import MAX_VIDEOS, at_least, check_seed, default_device  # noqa: PLC0415
    from hpdm.monitor import sample_levels  # noqa: PLC0415
    from hpdm.sampling import check_finite, sampling_record  # noqa: PLC0415

    at_least("-n", num, high=MAX_VIDEOS)
    at_least("--batch", batch)
    check_seed(seed)
    device = default_device()
    cfg, net = load_generator(generator, raw=raw, device=device)
    if cfg.model.cond == "text":
        raise UsageError(f"{generator} is text-conditioned; the synthetic measure takes class-conditional or "
                         "unconditional models")
    if not cfg.data.synthetic:  # its shards may still be the synthetic set, written by an earlier run
        log.warning(
            "%s was trained with data.synthetic false (data.shards %s): the measure judges the synthetic set's "
            "colours, shapes and directions by class, so its scores mean nothing unless those shards are that set",
            generator, without_userinfo(cfg.data.shards))
    m = cfg.model
    held = num * 4 * 3 * sum(math.prod(level_resolution(l, m.patch)) for l in range(m.levels))  # every level, fp32
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if held > memory:
        raise UsageError(f"-n: {num:,} videos keep {held / 2**30:,.0f} GiB of canvases in memory for the measure, more "
                         f"than this machine's {memory / 2**30:,.0f} GiB; give fewer")
    levels, labels = sample_levels(net, cfg, num, seed, device, opts, batch, progress)
    check_finite(levels, opts.settings(cfg)["guidance"])
    return {**level_reports(levels, labels), "sampled": sampling_record(net, cfg, opts, seed, num)}


def report_table(result: dict) -> str:
    keys = ("one_shape", "colour", "kind", "direction", "class_correct")
    rows = [f"{'level':<7}" + "".join(f"{k:>14}" for k in keys)]
    for l, r in enumerate(result["levels"]):
        rows.append(f"{l:<7}" + "".join(f"{r[k]:>14.3f}" for k in keys))
    if result["coarse_to_fine_rms"]:
        rows.append("coarse-to-fine RMS (level l, 2x down, vs level l-1): "
                    + ", ".join(f"{l + 1}: {v:.3f}" for l, v in enumerate(result["coarse_to_fine_rms"])))
    return "\n".join(rows)
