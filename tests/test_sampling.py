"""Hierarchical tiled sampling: geometry, the window-weighted blend of tiles, NFE counts, caching, `hpdm sample`."""
import itertools

import av
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from hpdm.config import Config, load_config
from hpdm.diffusion import Condition
from hpdm.errors import UsageError
from hpdm.generate import conditions, share
from hpdm.model import HPDM
from hpdm.pyramid import boxes_from_offsets, level_resolution, sample_offsets
from hpdm.sampling import SampleOptions, TiledSampler, blend_window, parent_offset, tile_index, tile_positions
from tests.helpers import randomize, tiny_model_config


def export_model(model: HPDM, cfg: Config, path) -> str:
    """What `hpdm export` writes: weights plus the run config as metadata."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": yaml.safe_dump(cfg.to_dict(), sort_keys=False)})
    return str(path)


class Counter:
    """Counts the network's calls and rows per entry point (forward, coarse_context, forward_level)."""

    def __init__(self, net):
        self.calls, self.rows = {}, {}
        for name in ("forward", "coarse_context", "forward_level"):
            fn = getattr(net, name)

            def wrapped(x, *a, _fn=fn, _name=name, **k):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                self.rows[_name] = self.rows.get(_name, 0) + x.shape[0]
                return _fn(x, *a, **k)
            setattr(net, name, wrapped)


def test_parent_boxes_nest_and_tiles_cover():
    p = 8
    for level in range(1, 4):
        size, parent = p * 2 ** level, p * 2 ** (level - 1)
        for o in range(size - p + 1):
            q = parent_offset(o, p, parent)
            assert 0 <= q <= parent - p and 2 * q <= o and o + p <= 2 * q + 2 * p, (level, o, q)
        for stride in (1, 4, 5, 8):
            pos = tile_positions(size, p, stride)
            covered = set(itertools.chain.from_iterable(range(o, o + p) for o in pos))
            assert covered == set(range(size)) and pos[-1] == size - p
    w = blend_window((4, 16, 16), 1e-3)
    assert w.min() > 0 and w.max() <= 1 and torch.allclose(w, w.flip(0).flip(1).flip(2))


def test_cached_context_reproduces_the_joint_forward():
    cfg = tiny_model_config()
    net = randomize(HPDM(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, *cfg.patch, generator=g)
    boxes = boxes_from_offsets(sample_offsets(2, 3, cfg.patch, g), cfg.patch)
    c, labels = torch.randn(2, 3, generator=g), torch.tensor([1, -1])
    full = net(x, c, boxes, labels)
    for K in (1, 2):
        ctx = net.coarse_context(x[:, :K], c[:, :K], boxes[:, :K], labels)
        out = net.forward_level(x[:, K:K + 1], c[:, K:K + 1], boxes[:, :K + 1], ctx, labels)
        torch.testing.assert_close(out[:, 0], full[:, K], rtol=0, atol=1e-6)


def test_tiles_blend_with_the_window_and_nfe_match_the_steps():
    cfg = Config(model=tiny_model_config())
    net = randomize(HPDM(cfg.model), std=0.05).eval()
    count = Counter(net)
    steps, V, guidance = (3, 2, 1), 2, 2.0
    last: dict = {}
    sampler = TiledSampler(net, cfg, SampleOptions(steps=steps, guidance=guidance, tile_batch=5),
                           hook=lambda l, s, v, o, d: last.setdefault((l, s), []).append((v, o, d.clone())))
    levels, stats = sampler.sample(Condition(labels=torch.tensor([1, 3])), seeds=[0, 1])
    P = cfg.model.patch
    assert [tuple(x.shape) for x in levels] == [(V, 3, *level_resolution(l, P)) for l in range(3)]
    window = blend_window(P, sampler.opts.window_floor)
    for l in (1, 2):
        final = min(s for (lv, s) in last if lv == l)  # the last step: sigma_hat of the step that lands on 0
        acc, wsum = torch.zeros(V, 3, *level_resolution(l, P), dtype=torch.float64), torch.zeros(level_resolution(l, P), dtype=torch.float64)
        hits = torch.zeros(V, *level_resolution(l, P), dtype=torch.int64)
        for v, (t, h, w), d in last[(l, final)]:
            sl = (slice(t, t + P[0]), slice(h, h + P[1]), slice(w, w + P[2]))
            acc[(v, slice(None), *sl)] += window * d
            hits[(v, *sl)] += 1
            if v == 0:
                wsum[sl] += window
        assert (hits > 0).all(), "a pixel was written by no tile"
        assert hits.max() == 8, "50 % overlap: inner pixels lie in 8 tiles"
        # the final Euler step to sigma 0 returns the denoised estimate: the window-weighted blend of the tiles
        torch.testing.assert_close(levels[l].double(), acc / wsum, rtol=0, atol=1e-5)
    # NFE: level 0 is Heun (2 per step, the last step first-order), finer levels Euler; CFG doubles the rows only
    n_tiles = [len(g.offsets) for g in sampler.geometry]
    assert n_tiles == [1, 27, 343]
    assert count.calls["forward"] == 2 * steps[0] - 1 and count.rows["forward"] == (2 * steps[0] - 1) * V * 2
    assert count.rows["forward_level"] == 2 * V * sum(n * s for n, s in zip(n_tiles[1:], steps[1:]))
    assert [s.tile_evals // V for s in stats] == [2 * steps[0] - 1, n_tiles[1] * steps[1], n_tiles[2] * steps[2]]
    assert count.calls["coarse_context"] == sum(s.net_calls for s in stats[1:])
    # the cache: one coarse pass per (video, parent) per tile batch, far fewer than one per tile
    assert stats[2].coarse_evals < stats[2].tile_evals / 2


def test_tile_index_cuts_and_pastes_like_slices():
    """One gather cuts every tile out of a canvas; index_add_ pastes overlapping tiles back bit for bit as adding
    them one slice at a time, in the same order (what the sampler's blend did tile by tile)."""
    g = torch.Generator().manual_seed(0)
    V, T, H, W, P = 3, 6, 10, 12, (2, 4, 8)
    canvas = torch.randn(V, 3, T, H, W, generator=g, dtype=torch.float64)
    videos = torch.tensor([0, 2, 2, 1, 2, 0])
    offsets = torch.stack([torch.randint(0, n - p + 1, (len(videos),), generator=g) for n, p in zip((T, H, W), P)], 1)
    offsets[1], offsets[2] = torch.tensor([1, 2, 1]), torch.tensor([2, 3, 3])  # overlapping tiles of one video
    index = tile_index(canvas.shape, videos, offsets, P)
    crops = [canvas[v, :, t:t + P[0], h:h + P[1], w:w + P[2]] for v, (t, h, w) in zip(videos, offsets.tolist())]
    assert torch.equal(canvas.view(-1)[index], torch.stack(crops))
    values = torch.randn(len(videos), 3, *P, generator=g, dtype=torch.float64) * 1e3
    pasted, looped = torch.zeros_like(canvas), torch.zeros_like(canvas)
    pasted.view(-1).index_add_(0, index.view(-1), values.view(-1))
    for v, (t, h, w), x in zip(videos, offsets.tolist(), values):
        looped[v, :, t:t + P[0], h:h + P[1], w:w + P[2]] += x
    assert torch.equal(pasted, looped) and pasted[2].abs().sum() > 0


def test_a_video_depends_only_on_its_seed_not_on_its_batch():
    cfg = Config(model=tiny_model_config())
    net = randomize(HPDM(cfg.model), std=0.05).eval()
    sampler = TiledSampler(net, cfg, SampleOptions(steps=(2, 1, 1), tile_batch=32))
    alone, _ = sampler.sample(Condition(labels=torch.tensor([2])), seeds=[7])
    both, _ = sampler.sample(Condition(labels=torch.tensor([0, 2])), seeds=[3, 7])
    torch.testing.assert_close(both[-1][1], alone[-1][0], rtol=0, atol=1e-4)
    assert sorted(share(10, 0, 3) + share(10, 1, 3) + share(10, 2, 3)) == list(range(10))
    assert share(10, 1, 3) == [1, 4, 7]


def test_fine_start_keeps_the_coarser_level():
    """With fine_start, a finer level starts from the coarser level upsampled plus noise of that sigma: an untrained
    network (zero output, so the exact denoiser of N(0, sigma_data^2) data) then ends within about that sigma of
    it; from noise (0, the paper's sampler) the finer level is unrelated to the coarser one."""
    cfg = Config(model=tiny_model_config())
    torch.manual_seed(0)
    net = HPDM(cfg.model).eval()
    cond = Condition(labels=torch.tensor([1, 3]))
    err = {}
    for start in (0.0, 0.02):
        sampler = TiledSampler(net, cfg, SampleOptions(steps=(4, 8, 8), fine_start=start, tile_batch=64))
        levels, _ = sampler.sample(cond, seeds=[5, 6])
        up = [F.interpolate(c.clamp(-1, 1), scale_factor=2, mode="trilinear", align_corners=False) for c in levels[:-1]]
        err[start] = [float((f - u).pow(2).mean().sqrt()) for f, u in zip(levels[1:], up)]
    assert max(err[0.02]) < 0.03 and min(err[0.0]) > 0.3, err
    cfg.diffusion.fine_start = 0.02  # the config's value is the default; an option overrides it
    assert TiledSampler(net, cfg).fine_start == 0.02
    assert TiledSampler(net, cfg, SampleOptions(fine_start=0.0)).fine_start == 0.0


def test_full_overlap_uses_a_one_token_stride():
    cfg = Config(model=tiny_model_config())
    sampler = TiledSampler(HPDM(cfg.model), cfg, SampleOptions(overlap="full"))
    assert len(sampler.geometry[1].offsets) == 5 * 5 * 5  # 8x32x32 canvas, 4x16x16 tiles, stride 1x4x4


@pytest.mark.parametrize("options,message", [
    (dict(overlap="1.5"), "--overlap: must be half, full or a fraction in [0, 1); got '1.5'"),
    (dict(overlap="most"), "--overlap: must be half, full or a fraction in [0, 1); got 'most'"),
    (dict(steps=(4, 0)), "--steps: every entry must be >= 1; got 4,0"),
    (dict(guidance=-1.0), "--guidance: must be a finite number >= 0; got -1.0"),
    (dict(s_churn=-2.0), "--churn: must be a finite number >= 0; got -2.0"),
    (dict(s_churn=float("nan")), "--churn: must be a finite number >= 0; got nan"),  # was taken as 0
    (dict(tile_batch=0), "--tile-batch: must be >= 1; got 0"),
    (dict(fine_order=3), "--fine-order: must be 1 (Euler) or 2 (Heun); got 3"),
    (dict(fine_start=-1.0), "--fine-start: must be a finite number >= 0 (0: finer levels start from noise); got -1.0"),
    (dict(fine_start=float("nan")), "--fine-start: must be a finite number >= 0 (0: finer levels start from noise); "
                                    "got nan"),
])
def test_bad_sample_options_name_the_option(options, message):
    with pytest.raises(UsageError) as err:
        SampleOptions(**options)
    assert str(err.value) == message


def test_steps_must_match_the_levels():
    SampleOptions(steps=(8,)).validate(3)
    SampleOptions(steps=(8, 4, 2)).validate(3)
    with pytest.raises(UsageError, match=r"--steps: give 1 value or 3 \(one per level of the model\); got 8,4"):
        SampleOptions(steps=(8, 4)).validate(3)
    with pytest.raises(UsageError, match=r"--steps: give 1 value \(the model has one level\); got 8,4"):
        SampleOptions(steps=(8, 4)).validate(1)


def test_hpdm_sample_writes_full_resolution_videos(tmp_path):
    from hpdm.cli import main

    cfg = load_config("configs/tiny.yaml")  # the demo: 3 levels of 8x32x32, video 32x128x128
    torch.manual_seed(0)
    path = export_model(HPDM(cfg.model), cfg, tmp_path / "demo.safetensors")
    out = tmp_path / "samples"
    assert main(["sample", path, "--out", str(out), "-n", "2", "--steps", "2,1,1", "--tile-batch", "64", "--batch", "2",
                 "--label", "3"]) == 0
    for i in range(2):
        with av.open(str(out / f"video_{i:05d}.mp4")) as f:
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(frames) == 32 and frames[0].shape == (128, 128, 3)
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cost = yaml.safe_load((out / "cost.json").read_text())["levels"]
    assert [r["tile_evals_per_video"] for r in cost] == [3, 27, 343]


def test_condition_errors_name_the_option(tmp_path):
    assert conditions("class", 5, 3, seed=0, label=4).labels.tolist() == [4, 4, 4]
    with pytest.raises(UsageError, match=r"^--label: 5 is outside the model's classes 0..4$"):
        conditions("class", 5, 3, seed=0, label=5)
    with pytest.raises(UsageError, match="^--label: the model is conditioned on 'none', not on a class$"):
        conditions("none", 5, 3, seed=0, label=1)
    with pytest.raises(UsageError, match="^--text-emb: no such file: .*none.safetensors$"):
        conditions("text", 5, 3, seed=0, text_emb=str(tmp_path / "none.safetensors"))
    save_file({"emb": torch.zeros(2, 4)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(UsageError, match="^--text-emb: .*t.safetensors has no tensor named 'text'"):
        conditions("text", 5, 3, seed=0, text_emb=str(tmp_path / "t.safetensors"))
