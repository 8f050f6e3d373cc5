"""Learning made visible while it happens: samples of the EMA weights every ``train.sample_every`` steps as a PNG
grid (every level, coarse to fine), the synthetic measure where the data is the synthetic set, and a PNG of the
loss and of that measure over training, drawn from the run's ``metrics.jsonl``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from data_pipeline.local_files import write_atomic
from hpdm.config import Config
from hpdm.diffusion import Condition
from hpdm.generate import frame_grid, video_seed, write_png
from hpdm.sampling import SampleOptions, TiledSampler
from hpdm.video_io import to_uint8


def sample_levels(net, cfg: Config, videos: int, seed: int, device, opts: SampleOptions | None = None,
                  batch: int = 0, progress: bool = False,
                  cond: tuple[Condition, list[int]] | None = None) -> tuple[list[torch.Tensor], list[int | None]]:
    """``videos`` samples (classes in turn where class-conditioned; text models take ``cond``: a condition
    row and the label of the clip it came from per video), ``batch`` at a time (0: all at once): every level's
    canvas [V,3,T,H,W] on the CPU, and the labels. Video i depends only on ``seed``, i and its condition."""
    m = cfg.model
    if m.cond == "text":
        if cond is None:
            raise ValueError("a text-conditioned model samples given text embeddings (cond)")
        given, labels = cond
    else:
        labels = [i % m.num_classes if m.cond == "class" else None for i in range(videos)]
        given = Condition(labels=torch.tensor(labels)) if m.cond == "class" else Condition()
    sampler = TiledSampler(net, cfg, opts or SampleOptions(), device=device)
    chunks = []
    for start in range(0, videos, batch or videos):
        ids = range(start, min(videos, start + (batch or videos)))
        levels, _ = sampler.sample(given.rows(list(ids), device), [video_seed(seed, i) for i in ids], progress=progress)
        chunks.append([x.cpu() for x in levels])
    return [torch.cat(parts) for parts in zip(*chunks)], labels


def level_grid(levels: list[torch.Tensor], columns: int = 8, min_side: int = 64) -> np.ndarray:
    """uint8 image: per video, one row per level (each enlarged to the finest level's size, and small videos to
    ``min_side`` pixels), ``columns`` frames."""
    T, H, W = levels[-1].shape[2:]
    zoom = max(1, min_side // min(H, W))
    rows = []
    for v in range(levels[0].shape[0]):
        for x in levels:
            f = (T // x.shape[2], zoom * H // x.shape[3], zoom * W // x.shape[4])
            big = x[v].repeat_interleave(f[0], 1).repeat_interleave(f[1], 2).repeat_interleave(f[2], 3)
            rows.append(to_uint8(big))
    return frame_grid(rows, columns)


def synthetic_metrics(levels: list[torch.Tensor], labels: list[int | None]) -> dict[str, float]:
    """The synthetic measure as flat metric names: the finest level's, level 0's and the coarse-to-fine RMS."""
    from hpdm.synthetic_eval import level_reports  # noqa: PLC0415

    r = level_reports(levels, labels)
    out = {f"synthetic/{k}": r[k] for k in ("one_shape", "colour", "kind", "direction", "class_correct")}
    if len(levels) > 1:
        out["synthetic/level0_class_correct"] = r["levels"][0]["class_correct"]
        out.update({f"synthetic/coarse_to_fine_rms_{l + 1}": v for l, v in enumerate(r["coarse_to_fine_rms"])})
    return out


def sample_and_measure(net, cfg: Config, step: int, run_dir: Path, device,
                       cond: tuple[Condition, list[int]] | None = None) -> tuple[dict[str, float], Path, list[torch.Tensor]]:
    """Sample ``train.sample_videos`` videos (text models: ``cond``, see sample_levels), write
    ``samples/step_N.png``; returns the synthetic metrics (empty unless the data is synthetic), the grid's path
    and the sampled levels."""
    t = cfg.train
    levels, labels = sample_levels(net, cfg, t.sample_videos, t.seed, device, cond=cond)
    path = Path(run_dir) / "samples" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, level_grid(levels))
    return (synthetic_metrics(levels, labels) if cfg.data.synthetic else {}), path, levels


def plot_progress(run_dir: Path) -> Path | None:
    """``progress.png``: training loss and (where logged) the synthetic measure against clips seen."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    loss = [(r["samples"], r["loss"]) for r in rows if "loss" in r]
    measure = [(r["samples"], r["synthetic/class_correct"]) for r in rows if "synthetic/class_correct" in r]
    fig, axes = plt.subplots(1, 2 if measure else 1, figsize=(11 if measure else 6, 4), squeeze=False)
    if loss:
        axes[0, 0].semilogy(*zip(*loss))
    axes[0, 0].set(xlabel="clips seen", ylabel="training loss", title="loss")
    if measure:
        ax = axes[0, 1]
        ax.plot(*zip(*measure), marker="o", label="class_correct (finest level)")
        one = [(r["samples"], r["synthetic/one_shape"]) for r in rows if "synthetic/one_shape" in r]
        ax.plot(*zip(*one), marker=".", label="frames with one shape")
        ax.set(xlabel="clips seen", ylim=(0, 1.02), title="synthetic measure of samples")
        ax.legend(loc="lower right")
    fig.tight_layout()
    out, buf = Path(run_dir) / "progress.png", io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    plt.close(fig)
    write_atomic(out, buf.getvalue())
    return out
