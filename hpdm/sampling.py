"""Hierarchical tiled sampling: level 0 whole, then every finer level tile by tile on a full-resolution canvas.

Design (see docs/sampling.md):
- Level 0 (the whole video at the coarsest resolution) is one patch; it is sampled with the stochastic
  second-order EDM sampler (churn + Heun), ``diffusion.steps`` steps.
- Level l >= 1 runs its own EDM schedule (default steps halved per level, deterministic Euler) on a canvas of
  the whole level-l video, from pure noise, or with ``fine_start`` > 0 from the coarser level upsampled 2x
  (trilinear) plus noise of that sigma, so that the finer level keeps the coarser one's layout. Each step
  denoises every tile of the canvas and blends the tiles' denoised estimates with a separable Hann window that
  has a floor (every pixel gets positive total weight); the step is then taken on the whole canvas, so
  overlapping tiles agree by construction.
- Tiles see the coarser levels as training did: one noise level shared by all levels of a sample. The
  coarser levels' finished videos are re-noised to the current step's sigma with noise drawn once per level
  and video (fixed across steps and tiles, so overlapping tiles see the same context). ``coarse="clean"``
  feeds them clean at sigma_min instead (for models trained with independent noise levels).
- Parents: a tile at offset o (level-l pixels) takes, per dimension, the level-(l-1) box at
  floor(o / p) * p/2, clamped into the coarser level (always a valid nesting, as in training); the chain
  continues up to level 0. These boxes coincide with a 50 %-overlap tiling of the coarser level, so with 50 %
  overlap each parent holds up to 8 tiles.
- Cache: per step, the coarser levels' per-block projected token states (``HPDM.coarse_context``) are computed
  once per (video, parent) in a tile batch and reused by every tile inside that parent
  (``HPDM.forward_level``); tiles are ordered by parent so that parents rarely straddle batches.
- Tiles of all videos in the batch are run ``tile_batch`` at a time (classifier-free guidance doubles the rows).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hpdm.config import Config
from hpdm.diffusion import EDM, Condition
from hpdm.errors import UsageError, UserError
from hpdm.pyramid import boxes_from_offsets, level_resolution

log = logging.getLogger(__name__)
MAX_GUIDANCE = 100.0  # --guidance: far beyond any useful scale, and the guided estimate overflows long before 1e30


@dataclass
class SampleOptions:
    steps: tuple[int, ...] = ()  # per level, or one number for level 0 (halved per level); empty: diffusion.steps
    guidance: float | None = None  # classifier-free guidance; None: diffusion.guidance
    overlap: str = "half"  # half (50 %, metrics) | full (stride of one token, visualisations) | a fraction in [0, 1)
    s_churn: float | None = None  # level-0 stochasticity; None: diffusion.s_churn
    level0_order: int = 2  # 2: Heun correction, 1: Euler
    fine_order: int = 1
    fine_churn: float = 0.0  # finer levels: deterministic by default
    coarse: str = "renoise"  # how tiles see coarser levels: renoise (at the current sigma) | clean
    fine_start: float | None = None  # > 0: finer levels start at this sigma from the coarser level upsampled;
    # 0: from noise; None: diffusion.fine_start
    tile_batch: int = 16  # tiles per network call
    window_floor: float = 1e-3

    def __post_init__(self) -> None:
        """Check the values that ``hpdm sample`` and the evaluations take from their options (named in errors)."""
        if self.steps and min(self.steps) < 1:
            raise UsageError(f"--steps: every entry must be >= 1; got {','.join(map(str, self.steps))}")
        for option, value, hint in (("--guidance", self.guidance, ""), ("--churn", self.s_churn, ""),
                                    ("--fine-start", self.fine_start, " (0: finer levels start from noise)")):
            if value is not None and not (math.isfinite(value) and value >= 0):  # NaN fails every comparison
                raise UsageError(f"{option}: must be a finite number >= 0{hint}; got {value}")
        if self.guidance is not None and self.guidance > MAX_GUIDANCE:
            raise UsageError(f"--guidance: must be <= {MAX_GUIDANCE:g}; got {self.guidance:g}")
        if self.coarse not in ("renoise", "clean"):
            raise UsageError(f"--coarse: must be renoise or clean; got {self.coarse!r}")
        for option, order in (("--level0-order", self.level0_order), ("--fine-order", self.fine_order)):
            if order not in (1, 2):
                raise UsageError(f"{option}: must be 1 (Euler) or 2 (Heun); got {order}")
        if self.tile_batch < 1:
            raise UsageError(f"--tile-batch: must be >= 1; got {self.tile_batch}")
        overlap_fraction(self.overlap)

    def validate(self, levels: int) -> None:
        """The checks that need the model: one value of ``steps`` or one per level."""
        if len(self.steps) not in (0, 1, levels):
            want = ("1 value (the model has one level)" if levels == 1
                    else f"1 value or {levels} (one per level of the model)")
            raise UsageError(f"--steps: give {want}; got {','.join(map(str, self.steps))}")

    def settings(self, cfg) -> dict:
        """The settings in effect for a generator of config ``cfg``: its diffusion.* where an option is unset.
        Recorded beside samples and in evaluation results (``sampling_record``), so they can be drawn again."""
        d, levels = cfg.diffusion, cfg.model.levels
        steps = self.steps or (d.steps,)
        return {"steps": list(steps) if len(steps) == levels else level_steps(steps[0], levels),
                # an unconditional model's two branches are one: guidance would only double the work
                "guidance": 1.0 if cfg.model.cond == "none" else d.guidance if self.guidance is None else self.guidance,
                "s_churn": d.s_churn if self.s_churn is None else self.s_churn,
                "fine_start": d.fine_start if self.fine_start is None else self.fine_start,
                "overlap": self.overlap, "level0_order": self.level0_order, "fine_order": self.fine_order,
                "fine_churn": self.fine_churn, "coarse": self.coarse}


def sampling_record(net, cfg, opts: SampleOptions, seed: int, num: int, **extra) -> dict:
    """What ``num`` samples of the generator ``net`` (loaded by ``load_generator``) were drawn with: the weights
    (file, checkpoint step, EMA or raw), seed, count and sampler settings; written as ``sample.json`` beside
    sampled videos and into the results of the evaluations."""
    return {"generator": getattr(net, "provenance", None), "seed": seed, "videos": num, **extra,
            "sampler": opts.settings(cfg), "resolution": list(cfg.model.resolution)}


def overlap_fraction(overlap: str) -> float | None:
    """0.5 for half, None for full (one-token stride), else the given fraction."""
    if overlap == "half":
        return 0.5
    if overlap == "full":
        return None
    try:
        f = float(overlap)
    except ValueError:
        f = math.nan
    if not 0 <= f < 1:
        raise UsageError(f"--overlap: must be half, full or a fraction in [0, 1); got {overlap!r}")
    return f


def level_steps(base: int, levels: int) -> list[int]:
    return [max(1, base // 2 ** l) for l in range(levels)]


def tile_positions(size: int, patch: int, stride: int) -> list[int]:
    """Offsets of tiles along one dimension: every ``stride``, plus the last one flush with the end."""
    last = size - patch
    return sorted(set(range(0, last + 1, stride)) | {last})


def parent_offset(o: int, patch: int, parent_size: int) -> int:
    """Offset in the coarser level of the box that contains a tile at ``o`` (1-D; see the module docstring)."""
    lo, hi = max(0, -((patch - o) // 2)), min(parent_size - patch, o // 2)  # valid nesting: 2o' <= o <= 2o' + p
    return min(max((o // patch) * (patch // 2), lo), hi)


def blend_window(patch: tuple[int, int, int], floor: float) -> torch.Tensor:
    """Separable Hann-like weights [t,h,w] in (floor, 1]: small at a tile's border, 1 at its centre."""
    ws = [floor + (1 - floor) * torch.sin(math.pi * (torch.arange(p, dtype=torch.float64) + 0.5) / p) ** 2 for p in patch]
    return ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]


def tile_index(shape: torch.Size, videos: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Flat indices [n,C,t,h,w] into a contiguous canvas of ``shape`` [V,C,T,H,W] of the tiles of ``videos`` [n] at
    ``offsets`` [n,3]: ``canvas.view(-1)[index]`` cuts them out in one gather, ``index_add_`` pastes them back."""
    (_, C, T, H, W), d, n = shape, videos.device, len(videos)
    o = offsets.to(d)
    v = videos.view(n, 1, 1, 1, 1)
    c = torch.arange(C, device=d).view(1, C, 1, 1, 1)
    t = (o[:, 0, None] + torch.arange(patch[0], device=d)).view(n, 1, -1, 1, 1)
    h = (o[:, 1, None] + torch.arange(patch[1], device=d)).view(n, 1, 1, -1, 1)
    w = (o[:, 2, None] + torch.arange(patch[2], device=d)).view(n, 1, 1, 1, -1)
    return (((v * C + c) * T + t) * H + h) * W + w


@dataclass
class LevelStats:
    level: int
    steps: int
    order: int
    tiles_per_video: int
    tile_evals: int = 0  # denoiser evaluations of one tile (CFG's two branches count once)
    coarse_evals: int = 0  # coarse-context passes (one per parent and evaluation)
    net_calls: int = 0
    seconds: float = 0.0
    videos: int = 0

    def add(self, other: "LevelStats") -> "LevelStats":
        for k in ("tile_evals", "coarse_evals", "net_calls", "seconds", "videos"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def row(self) -> dict:
        v = max(self.videos, 1)
        return {"level": self.level, "steps": self.steps, "order": self.order, "tiles_per_video": self.tiles_per_video,
                "nfe_per_tile": self.tile_evals / v / self.tiles_per_video, "tile_evals_per_video": self.tile_evals / v,
                "coarse_evals_per_video": self.coarse_evals / v, "net_calls": self.net_calls,
                "seconds_per_video": self.seconds / v}


@dataclass
class _Level:
    """Geometry of one level: tile offsets, their parent chains, the blend weights."""
    offsets: list[tuple[int, int, int]]  # per tile, in this level's pixels
    chains: torch.Tensor  # int64 [n_tiles, level+1, 3]: the offsets of the tile's parents (level 0 first) and its own
    window: torch.Tensor  # [t,h,w]
    weight_sum: torch.Tensor  # [T,H,W]
    parent: list[int] = field(default_factory=list)  # parent id per tile


class TiledSampler:
    """Samples full-resolution videos from an HPDM; ``hook(level, step, video, offset, denoised)`` sees every tile."""

    def __init__(self, net, cfg: Config, opts: SampleOptions = SampleOptions(), device=None, hook=None):
        self.net, self.cfg, self.m = net, cfg, cfg.model
        opts.validate(self.m.levels)
        self.opts, self.hook = opts, hook
        self.device = device or next(net.parameters()).device
        self.edm = EDM(cfg.diffusion)
        settings = opts.settings(cfg)
        self.steps, self.guidance = settings["steps"], settings["guidance"]
        untrained = self.m.cond != "none" and self.m.cond_dropout == 0  # guidance's unconditional branch
        if os.environ.get("RANK", "0") == "0":
            if self.guidance != 1 and untrained:
                log.warning("guidance %g (%s) needs a model trained with model.cond_dropout > 0, and this one's is 0: "
                            "its unconditional branch was not trained, so the videos may be meaningless; use "
                            "--guidance 1", self.guidance, "diffusion.guidance" if opts.guidance is None else "--guidance")
            if self.m.cond == "none" and opts.guidance not in (None, 1):
                log.warning("--guidance: no effect on an unconditional model (it has no condition to drop)")
            fine = [o for o, v, unset in (("--fine-start", opts.fine_start, None), ("--coarse", opts.coarse, "renoise"),
                                          ("--fine-order", opts.fine_order, 1)) if v != unset]
            if self.m.levels == 1 and fine:
                log.warning("%s: no effect on a one-level model (they set how finer levels are sampled)", ", ".join(fine))
        self.fine_start, self.s_churn = settings["fine_start"], settings["s_churn"]
        if self.fine_start > cfg.diffusion.sigma_max:  # the schedule would start above any trained noise level
            option = "diffusion.fine_start" if opts.fine_start is None else "--fine-start"
            raise UsageError(f"{option}: must be <= the model's diffusion.sigma_max ({cfg.diffusion.sigma_max:g}); "
                             f"got {self.fine_start:g}")
        self.geometry = [self._geometry(l) for l in range(self.m.levels)]

    # ---- geometry ------------------------------------------------------------------------------------------
    def _stride(self) -> tuple[int, ...]:
        f = overlap_fraction(self.opts.overlap)
        if f is None:
            return tuple(self.m.patchify)
        return tuple(max(q, round(p * (1 - f) / q) * q) for p, q in zip(self.m.patch, self.m.patchify))

    def _geometry(self, level: int) -> _Level:
        P = self.m.patch
        res = level_resolution(level, P)
        pos = [tile_positions(r, p, s) for r, p, s in zip(res, P, self._stride())]
        chains = []
        for o in itertools.product(*pos):
            chain = [tuple(o)]
            for k in range(level - 1, -1, -1):
                chain.insert(0, tuple(parent_offset(c, p, r) for c, p, r in zip(chain[0], P, level_resolution(k, P))))
            chains.append(chain)
        chains.sort()  # tiles that share a parent chain are adjacent
        parents = {tuple(c[:-1]): None for c in chains}
        ids = {k: i for i, k in enumerate(parents)}
        window = blend_window(P, self.opts.window_floor)
        wsum = torch.zeros(res, dtype=torch.float64)
        for c in chains:
            t, h, w = c[-1]
            wsum[t:t + P[0], h:h + P[1], w:w + P[2]] += window
        return _Level([c[-1] for c in chains], torch.tensor(chains, dtype=torch.int64).view(len(chains), level + 1, 3),
                      window, wsum, [ids[tuple(c[:-1])] for c in chains])

    # ---- sampling ------------------------------------------------------------------------------------------
    def _noise(self, gens: list[torch.Generator], shape) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]).to(self.device)

    def _guide(self, d: torch.Tensor, n: int) -> torch.Tensor:
        return d if self.guidance == 1.0 else d[n:] + self.guidance * (d[:n] - d[n:])

    def _rows(self, cond: Condition, vids: torch.Tensor) -> Condition:
        c = cond.rows(vids)
        return c if self.guidance == 1.0 else c.cat(c.unconditional())

    def _double(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.guidance == 1.0 else torch.cat([x, x])

    def _denoise_level0(self, x: torch.Tensor, sigma: float, cond: Condition, st: LevelStats) -> torch.Tensor:
        V = x.shape[0]
        c_skip, c_out, c_in = self.edm.precondition(sigma)
        xin = self._double(x[:, None])
        n = xin.shape[0]
        boxes = boxes_from_offsets(torch.zeros(n, 1, 3, dtype=torch.int64), self.m.patch).to(self.device)
        c = self._rows(cond, torch.arange(V))
        f = self.net((c_in * xin).float(), torch.full((n, 1), math.log(sigma) / 4, device=self.device), boxes,
                     c.labels, c.text, c.text_mask)
        st.tile_evals += V
        st.net_calls += 1
        d = self._guide(c_skip * xin + c_out * f.double(), V)[:, 0]
        if self.hook is not None:
            for v in range(V):
                self.hook(0, sigma, v, (0, 0, 0), d[v])
        return d

    def _denoise_tiles(self, level: int, x: torch.Tensor, sigma: float, coarse: list[torch.Tensor], cond: Condition,
                       st: LevelStats) -> torch.Tensor:
        """Blended denoised estimate of the level canvas x [V,3,T,H,W] (float64)."""
        geo, P = self.geometry[level], self.m.patch
        V, n_tiles = x.shape[0], len(geo.offsets)
        c_skip, c_out, c_in = self.edm.precondition(sigma)
        s_coarse = sigma if self.opts.coarse == "renoise" else self.cfg.diffusion.sigma_min
        _, _, c_in_c = self.edm.precondition(s_coarse)
        acc = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        window = geo.window.to(self.device)
        rows = [(v, i) for v in range(V) for i in range(n_tiles)]
        for start in range(0, len(rows), self.opts.tile_batch):
            chunk = rows[start:start + self.opts.tile_batch]
            vids = torch.tensor([v for v, _ in chunk], device=self.device)
            tiles = torch.tensor([i for _, i in chunk])
            pkeys = {}  # (video, parent id) -> row in the coarse batch, in order of first appearance
            for v, i in chunk:
                pkeys.setdefault((v, geo.parent[i]), i)
            prow = {k: r for r, k in enumerate(pkeys)}
            pindex = torch.tensor([prow[(v, geo.parent[i])] for v, i in chunk], device=self.device)
            pfirst = list(pkeys.values())  # a tile of each parent: its chain holds the parent's boxes
            pvids = torch.tensor([v for v, _ in pkeys], device=self.device)
            chains = geo.chains[tiles]  # [n, level+1, 3]
            at = tile_index(x.shape, vids, chains[:, -1], P)
            xs = x.reshape(-1)[at]
            cin = torch.stack([c.reshape(-1)[tile_index(c.shape, pvids, geo.chains[pfirst, k], P)]
                               for k, c in enumerate(coarse)], 1)  # [m, level, 3, p...]
            m = cin.shape[0]
            pboxes = self._double(boxes_from_offsets(geo.chains[pfirst, :level], P).to(self.device))
            pcond = self._rows(cond, pvids)
            ctx = self.net.coarse_context((c_in_c * self._double(cin)).float(),
                                          torch.full(pboxes.shape[:2], math.log(s_coarse) / 4, device=self.device),
                                          pboxes, pcond.labels, pcond.text, pcond.text_mask)
            idx = pindex if self.guidance == 1.0 else torch.cat([pindex, pindex + m])
            ctx = [None if c is None else c[idx] for c in ctx]
            xin = self._double(xs[:, None])
            tcond = self._rows(cond, vids)
            f = self.net.forward_level((c_in * xin).float(), torch.full((xin.shape[0], 1), math.log(sigma) / 4, device=self.device),
                                       self._double(boxes_from_offsets(chains, P).to(self.device)), ctx,
                                       tcond.labels, tcond.text, tcond.text_mask)
            d = self._guide(c_skip * xin + c_out * f.double(), len(chunk))[:, 0]
            st.tile_evals += len(chunk)
            st.coarse_evals += m
            st.net_calls += 1
            # in tile order, as the blend weights were summed (on a GPU index_add_ adds in any order)
            acc.view(-1).index_add_(0, at.view(-1), (window * d).view(-1))
            if self.hook is not None:
                for (v, _), offset, dv in zip(chunk, chains[:, -1].tolist(), d):
                    self.hook(level, sigma, v, tuple(offset), dv)
        return acc / geo.weight_sum.to(self.device)

    def _solve(self, denoise, x: torch.Tensor, steps: int, churn: float, order: int, gens, bar, start=None) -> torch.Tensor:
        sigma_max = None if start is None else self.fine_start
        return self.edm.solve(denoise, x, steps, churn, order, lambda shape: self._noise(gens, shape),
                              on_step=None if bar is None else (lambda: bar.update(1)), start=start, sigma_max=sigma_max)

    @torch.no_grad()
    def sample(self, cond: Condition, seeds: list[int], progress: bool = False) -> tuple[list[torch.Tensor], list[LevelStats]]:
        """Videos for ``seeds`` (one per video; a video depends only on its seed and condition).

        Returns every level's canvas [V,3,T,H,W] (unclamped; the last is the full-resolution video) and per-level stats.
        """
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        V, P = len(seeds), self.m.patch
        levels, stats = [], []
        bar = tqdm(total=sum(self.steps), unit="step", desc="sampling", disable=not progress, dynamic_ncols=True)
        for l in range(self.m.levels):
            st = LevelStats(l, self.steps[l], self.opts.level0_order if l == 0 else self.opts.fine_order,
                            len(self.geometry[l].offsets), videos=V)
            t0 = time.perf_counter()
            x0 = self._noise(gens, (3, *level_resolution(l, P)))
            if l == 0:
                x = self._solve(lambda x, s: self._denoise_level0(x, s, cond, st), x0, self.steps[0], self.s_churn,
                                st.order, gens, bar)
            else:
                fixed = [self._noise(gens, (3, *level_resolution(k, P))) for k in range(l)]
                def denoise(x, s, l=l, fixed=fixed, st=st):
                    ctx = [levels[k].clamp(-1, 1) + s * fixed[k] if self.opts.coarse == "renoise" else levels[k].clamp(-1, 1)
                           for k in range(l)]
                    return self._denoise_tiles(l, x, s, ctx, cond, st)
                start = None
                if self.fine_start > 0:
                    start = F.interpolate(levels[l - 1].clamp(-1, 1), scale_factor=2, mode="trilinear", align_corners=False)
                x = self._solve(denoise, x0, self.steps[l], self.opts.fine_churn, st.order, gens, bar, start)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            st.seconds = time.perf_counter() - t0
            levels.append(x)
            stats.append(st)
        bar.close()
        return [x.float() for x in levels], stats


def check_finite(levels: list[torch.Tensor], guidance: float) -> None:
    """A UserError when sampled canvases hold NaN or infinite values, before they are written (as black or grey
    videos) or measured."""
    bad = next((l for l, x in enumerate(levels) if not torch.isfinite(x).all()), None)
    if bad is not None:
        raise UserError(f"the network produced non-finite values at level {bad} with guidance {guidance:g}; stopped "
                        "before writing or measuring them (try a lower --guidance, or another checkpoint)")


def cost_table(stats: list[LevelStats]) -> str:
    head = f"{'level':>5} {'steps':>5} {'order':>5} {'tiles':>6} {'NFE/tile':>8} {'tile NFE/video':>14} {'coarse NFE/video':>16} {'s/video':>9}"
    rows = [head]
    for s in stats:
        r = s.row()
        rows.append(f"{r['level']:>5} {r['steps']:>5} {r['order']:>5} {r['tiles_per_video']:>6} {r['nfe_per_tile']:>8.0f} "
                    f"{r['tile_evals_per_video']:>14.0f} {r['coarse_evals_per_video']:>16.0f} {r['seconds_per_video']:>9.3f}")
    return "\n".join(rows)
