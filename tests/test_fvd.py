"""FVD/IS: Fréchet distance against scipy, and `hpdm eval-fvd` end to end with TorchScript stand-in detectors."""
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from hpdm import eval_fvd, fvd
from hpdm.cli import main
from hpdm.config import Config
from hpdm.errors import UsageError
from hpdm.model import HPDM
from hpdm.video_io import write_mp4
from tests.helpers import tiny_model_config
from tests.test_sampling import export_model


class StandInI3D(torch.nn.Module):
    """StyleGAN-V's I3D interface: uint8 [B,3,T,H,W] -> features; the detector rescales itself."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        x = x.float()
        if rescale:
            x = x / 127.5 - 1
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), motion, x[:, :, :, ::8, ::8].mean(dim=(1, 2)).flatten(1)], 1)


class StandInC3D(torch.nn.Module):
    """C3D interface: uint8 [B,3,T,H,W] -> class logits."""

    def forward(self, x: torch.Tensor):
        m = x.float().mean(dim=(2, 3, 4)) / 255
        return torch.cat([m, 1 - m], 1) * 5


def _scripted(module, path):
    torch.jit.script(module).save(str(path))
    return str(path)


def _videos(folder, n, seed, frames=16, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(40, 200, size=3)
        v = np.clip(base + rng.normal(0, 30, size=(frames, size, size, 3)) * (i % 3 + 1) / 3, 0, 255).astype(np.uint8)
        write_mp4(folder / f"v{i:03d}.mp4", v)
    return str(folder)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 12)), rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    (m1, s1), (m2, s2) = fvd.feature_stats(a), fvd.feature_stats(b)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert fvd.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)
    assert abs(fvd.frechet_distance(m1, s1, m1, s1)) < 1e-9
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False, bias=True), atol=1e-12)


def test_inception_score_bounds():
    k = 5
    assert fvd.inception_score(np.eye(k)[np.arange(100) % k], splits=1)[0] == pytest.approx(k, rel=1e-6)
    assert fvd.inception_score(np.full((50, k), 1 / k), splits=2)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 videos, 4 needed for 2 splits"):  # 1 video per split always scores 1
        fvd.inception_score(np.eye(k)[:3], splits=2)


def test_frechet_distance_of_identical_low_rank_statistics_is_zero():
    """Rounding in the square roots of near-zero eigenvalues made it -0.003 here; it is clamped at 0."""
    m, s = fvd.feature_stats(np.random.default_rng(0).normal(100, 30, size=(4, 40)))
    assert fvd.frechet_distance(m, s, m, s) == 0.0


def test_eval_fvd_end_to_end_with_stand_in_detectors(tmp_path):
    i3d = _scripted(StandInI3D(), tmp_path / "i3d.pt")
    c3d = _scripted(StandInC3D(), tmp_path / "c3d.pt")
    fake, real = _videos(tmp_path / "fake", 20, 0), _videos(tmp_path / "real", 20, 1)  # IS: 2 videos per split
    args = ["eval-fvd", "--i3d", i3d, "--c3d", c3d, "--fake", fake, "--real", real, "--num-fake", "20", "--batch", "8",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")]
    assert main(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["num_fake"] == 20 and r["size"] == [32, 32] and not r["real_stats_cached"]
    assert r["i3d_sha256"] == fvd.sha256(i3d) and np.isfinite(r["is_mean"])
    # the same number computed by hand from the decoded clips
    det = fvd.Detector(i3d, "cpu")
    feats = [det(torch.from_numpy(np.stack([c for _, c in fvd.mp4_clips(d, 20, 16, (32, 32), 0, 1)]))) for d in (fake, real)]
    assert r["fvd"] == pytest.approx(fvd.frechet_distance(*fvd.feature_stats(feats[0]), *fvd.feature_stats(feats[1])), rel=1e-9)
    assert r["fvd"] > 0
    assert main(args) == 0  # second run: real statistics come from the cache
    r2 = json.loads((tmp_path / "r.json").read_text())
    assert r2["real_stats_cached"] and r2["fvd"] == pytest.approx(r["fvd"], rel=1e-12)
    args[args.index(real)] = fake  # identical sets: distance 0
    assert main(args) == 0
    assert abs(json.loads((tmp_path / "r.json").read_text())["fvd"]) < 1e-6


def test_a_short_or_corrupt_video_is_named(tmp_path):
    """A video shorter than --frames (the tiny models' 8-frame samples under the default 16) or a corrupt one ends
    the evaluation with its path, not a traceback from the decoder."""
    folder = _videos(tmp_path / "v", 2, 0, frames=8, size=16)
    says = r"v/v000.mp4: video has 8 frames; a clip needs 16 \(--frames 16\); every video must decode"
    with pytest.raises(UsageError, match=says):
        list(fvd.mp4_clips(folder, 2, 16, (16, 16), 0, 1))
    (tmp_path / "v" / "v001.mp4").write_bytes(b"not an mp4")
    with pytest.raises(UsageError, match=r"v/v001.mp4: cannot decode"):
        list(fvd.mp4_clips(folder, 2, 8, (16, 16), 1, 2))


def test_rank_shares_cover_the_videos_once(tmp_path):
    folder = _videos(tmp_path / "v", 5, 2, frames=4, size=16)
    seen = [i for rank in range(2) for i, _ in fvd.mp4_clips(folder, 5, 4, (16, 16), rank, 2)]
    assert sorted(seen) == list(range(5))
    idx, vals = np.array([3, 0, 2]), np.array([[3.0], [0.0], [2.0]])
    assert fvd.gather(idx, vals).ravel().tolist() == [0.0, 2.0, 3.0]


def test_eval_fvd_samples_on_the_fly_and_reads_shards(tmp_path, tiny_shards):
    cfg = Config(model=tiny_model_config())  # videos of 16x64x64
    torch.manual_seed(0)
    gen = export_model(HPDM(cfg.model), cfg, tmp_path / "g.safetensors")
    i3d = _scripted(StandInI3D(), tmp_path / "i3d.pt")
    assert main(["eval-fvd", "--i3d", i3d, "--generator", gen, "--real-shards", tiny_shards["one"], "--num-fake", "3",
                 "--steps", "1", "--tile-batch", "64", "--batch", "3", "--cache-dir", str(tmp_path / "c"),
                 "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["num_fake"] == 3 and r["size"] == [64, 64] and np.isfinite(r["fvd"])
    # what the fake videos were: a --generator's settings, or the sample.json of `hpdm sample`'s folder
    assert r["sampled"]["generator"]["weights"] == gen and r["sampled"]["seed"] == 0 and r["sampled"]["videos"] == 3
    assert r["sampled"]["sampler"]["steps"] == [1, 1, 1] and "fake" not in r
    assert main(["sample", gen, "--out", str(tmp_path / "s"), "-n", "3", "--steps", "1", "--tile-batch", "64"]) == 0
    assert main(["eval-fvd", "--i3d", i3d, "--fake", str(tmp_path / "s"), "--real-shards", tiny_shards["one"],
                 "--num-fake", "3", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fake"] == str(tmp_path / "s") and r["sampled"] == json.loads((tmp_path / "s" / "sample.json").read_text())


def test_detector_errors_name_the_option(tmp_path):
    junk = tmp_path / "c3d.pt"
    junk.write_text("not a model")
    with pytest.raises(UsageError, match=r"^--c3d: .*c3d.pt is not a TorchScript model \(.*not a ZIP archive\)$"):
        fvd.Detector(junk, "cpu", "c3d")
    with pytest.raises(UsageError, match=r"^--c3d: detector file not found: .*none.pt"):
        fvd.Detector(tmp_path / "none.pt", "cpu", "c3d")
    with pytest.raises(UsageError, match=r"^--c3d-sha256: .*c3d.pt has SHA-256 [0-9a-f]{64}, not the expected ABC$"):
        fvd.Detector(junk, "cpu", "c3d", expect_sha256="ABC")
    with pytest.raises(UsageError, match="^--real: no such folder"):
        eval_fvd.evaluate(str(junk), fake=str(tmp_path), real=str(tmp_path / "none"))
    with pytest.raises(UsageError, match="^--num-real: must be >= 1; got 0"):
        eval_fvd.evaluate(str(junk), fake=str(tmp_path), real=str(tmp_path), num_real=0)


def test_real_cache_follows_the_real_files(tmp_path, caplog):
    """New videos at the same path are not served stale statistics; an unreadable cache file is rebuilt."""
    i3d = _scripted(StandInI3D(), tmp_path / "i3d.pt")
    fake, real = _videos(tmp_path / "fake", 3, 0, size=16), _videos(tmp_path / "real", 3, 1, size=16)
    kw = dict(fake=fake, real=real, num_fake=3, cache_dir=tmp_path / "cache")
    first = eval_fvd.evaluate(i3d, **kw)
    shutil.rmtree(real)
    _videos(tmp_path / "real", 3, 2, size=16)
    r = eval_fvd.evaluate(i3d, **kw)
    fresh = eval_fvd.evaluate(i3d, **{**kw, "cache_dir": tmp_path / "fresh"})
    assert not r["real_stats_cached"] and r["fvd"] == fresh["fvd"] != first["fvd"]
    cache = Path(r["real_stats"])
    for junk in (b"garbage", cache.read_bytes()[:100]):  # not a zip; a truncated one
        cache.write_bytes(junk)
        caplog.clear()
        again = eval_fvd.evaluate(i3d, **kw)
        assert not again["real_stats_cached"] and again["fvd"] == r["fvd"]
        assert f"ignoring the unreadable real statistics cache {cache}" in caplog.text
    assert eval_fvd.evaluate(i3d, **kw)["real_stats_cached"]


def test_concurrent_saves_of_one_key_do_not_collide(tmp_path):
    path, errors = tmp_path / "real_k.npz", []

    def save():
        try:
            for _ in range(25):
                fvd.save_stats(path, np.zeros(3), np.eye(3))
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [p.name for p in tmp_path.iterdir()] == ["real_k.npz"]
    np.testing.assert_array_equal(fvd.load_stats(path)[1], np.eye(3))


class TupleI3D(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        return x.float().mean(dim=(2, 3, 4)), x.float().std(dim=(2, 3, 4))


class FlatI3D(torch.nn.Module):
    """A custom detector of [B,T,H,W,3] clips (--layout bthwc) with StyleGAN-V's keywords."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        return x.float().mean(dim=(1, 2, 3)) @ torch.ones(3, 4)


class NaNI3D(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        return x.float().mean(dim=(2, 3, 4)) * float("nan")


def test_detector_call_mistakes_are_one_line(tmp_path):
    x = torch.zeros(2, 16, 8, 8, 3, dtype=torch.uint8)
    c3d = _scripted(StandInC3D(), tmp_path / "c3d.pt")
    says = (r"^--i3d: .*c3d.pt failed on uint8 clips \[B,3,T,H,W\] \(--layout stylegan-v\) of shape \[2, 3, 16, 8, 8\]: "
            r"forward\(\) expected at most 2 argument\(s\) but received 5 argument\(s\); is it StyleGAN-V's "
            r"i3d_torchscript.pt\? \(a custom detector taking \[B,T,H,W,3\] needs --layout bthwc\)$")
    with pytest.raises(UsageError, match=says):
        fvd.Detector(c3d, "cpu", "i3d")(x)
    with pytest.raises(UsageError, match=r"^--i3d: .*flat.pt failed on .*: RuntimeError: mat1 and mat2 shapes cannot be "
                       r"multiplied \(2x8 and 3x4\); is it"):  # the gist of the TorchScript traceback
        fvd.Detector(_scripted(FlatI3D(), tmp_path / "flat.pt"), "cpu", "i3d")(x)
    with pytest.raises(UsageError, match=r"^--i3d: .*tuple.pt returned a tuple, not a 2-D float tensor of 2 rows"):
        fvd.Detector(_scripted(TupleI3D(), tmp_path / "tuple.pt"), "cpu", "i3d")(x)
    # non-finite features stop the evaluation before any statistics are computed or cached
    videos = _videos(tmp_path / "v", 2, 0, size=16)
    with pytest.raises(UsageError, match=r"^--i3d: .*nan.pt returned NaN or infinite outputs for 2 of 2 videos$"):
        eval_fvd.evaluate(_scripted(NaNI3D(), tmp_path / "nan.pt"), fake=videos, real=videos, num_fake=2,
                          cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_too_few_videos_are_refused_or_flagged(tmp_path, caplog):
    i3d = _scripted(StandInI3D(), tmp_path / "i3d.pt")
    videos = _videos(tmp_path / "v", 3, 0, size=16)
    kw = dict(fake=videos, real=videos, cache_dir=tmp_path / "cache")
    with pytest.raises(UsageError, match=r"^--num-fake: FVD needs 2 videos or more \(it compares covariances\); got 1$"):
        eval_fvd.evaluate(i3d, num_fake=1, **kw)
    with pytest.raises(UsageError, match=r"^--num-fake: IS \(--c3d\) averages 10 splits of 2 videos or more, so needs "
                       r"20 or more; got 3$"):
        eval_fvd.evaluate(i3d, num_fake=3, c3d=i3d, **kw)
    assert eval_fvd.evaluate(i3d, num_fake=3, **kw)["fvd"] == 0.0
    assert "FVD of 3 generated and 3 real videos is not comparable with published numbers, which use 2048" in caplog.text
    assert "videos of" not in caplog.text
    _videos(tmp_path / "v2", 1, 0, size=24)  # another model's video among them: resized without a word
    shutil.copy(tmp_path / "v2" / "v000.mp4", tmp_path / "v" / "v003.mp4")
    eval_fvd.evaluate(i3d, num_fake=4, **kw)
    assert "--fake: videos of 2 sizes, 16x16 (v000.mp4), 24x24 (v003.mp4): all are resized to the first" in caplog.text


def test_a_text_conditioned_generator_is_refused_first(tmp_path):
    """eval-fvd has no prompts: it says how to sample with them, before loading the detectors (none exists here)."""
    cfg = Config(model=tiny_model_config(cond="text", text_dim=12))
    gen = export_model(HPDM(cfg.model), cfg, tmp_path / "t2v.safetensors")
    with pytest.raises(UsageError, match=r"^--generator: .*t2v.safetensors is text-conditioned and eval-fvd has no prompts: "
                       r"sample the videos first with `hpdm sample .* --prompt-file FILE --encoder ENC -n N --out DIR`, "
                       r"then evaluate them with `hpdm eval-fvd --fake DIR ...`$"):
        eval_fvd.evaluate(str(tmp_path / "none.pt"), generator=gen, real=str(tmp_path))
