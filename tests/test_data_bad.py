"""Bad data is skipped, counted and logged with shard and key; the skip ceiling stops the job."""
import io
import json
import logging
import os

import pytest

from data_pipeline import DataConfig, DataError, build_loader
from data_pipeline.synthetic import render
from data_pipeline.tario import TarWriter
from data_pipeline.video import encode, probe

GOOD = [f"good{i}" for i in range(6)]


def _sample(n, frames=24):
    data = encode(render(n % 4, frames, 32, 32, seed=n), 24.0)
    meta = probe(data) | {"label": n % 4, "caption": f"clip {n}"}
    return {"mp4": data, "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Shard 0: good samples mixed with every kind of bad sample. Shard 1: a tar cut inside its second sample.
    Shard 2: a tar cut at a member boundary (the index still promises 3 samples). Shard 3: listed with 2 samples,
    missing."""
    root = tmp_path_factory.mktemp("bad")
    good = {k: _sample(i) for i, k in enumerate(GOOD)}
    w = TarWriter(str(root / "shard-000000.tar"))
    w.write("good0", good["good0"])
    w.write("corrupt", {"mp4": os.urandom(5000), "json": good["good1"]["json"]})
    w.write("good1", good["good1"])
    w.write("truncated_mp4", {"mp4": good["good2"]["mp4"][: len(good["good2"]["mp4"]) // 2], "json": good["good2"]["json"]})
    w.write("no_json", {"mp4": good["good2"]["mp4"]})
    w.write("no_video", {"json": good["good2"]["json"]})
    w.write("short", _sample(9, frames=4))
    w.write("named_label", {"mp4": good["good2"]["mp4"], "json": json.dumps({**json.loads(good["good2"]["json"]),
                                                                           "label": "B"}).encode()})
    w.write("good2", good["good2"])
    w.close()
    for name, keys in (("shard-000001.tar", ["good3", "cut", "lost"]), ("shard-000002.tar", ["good4", "good5", "gone"])):
        w = TarWriter(str(root / name))
        for k in keys:
            w.write(k, good.get(k) or _sample(7))
        w.close()
    data = (root / "shard-000001.tar").read_bytes()
    (root / "shard-000001.tar").write_bytes(data[: data.index(b"cut.mp4") + 512 + 100])  # inside cut.mp4's bytes
    data = (root / "shard-000002.tar").read_bytes()
    (root / "shard-000002.tar").write_bytes(data[: data.index(b"gone.json")])  # the name opens its header
    index = {"format": "hpdm-shards/1", "class_names": [], "num_samples": 15,
             "shards": [{"name": "shard-000000.tar", "samples": 9}, {"name": "shard-000001.tar", "samples": 3},
                        {"name": "shard-000002.tar", "samples": 3}, {"name": "shard-000003.tar", "samples": 2}]}
    (root / "index.json").write_text(json.dumps(index))
    return str(root)


def test_each_kind_of_bad_sample_is_skipped_counted_and_logged(bad_shards, caplog):
    cfg = DataConfig(shards=bad_shards, num_workers=0, max_skip_fraction=1.0)
    loader = build_loader(cfg, frames=8, size=(16, 16), batch_size=2, train=False)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(GOOD)
    reasons = loader.stats["reasons"]
    # a missing shard counts as the samples its index entry promised: 2, so that data.max_skip_fraction sees them
    assert reasons == {"corrupt_video": 2, "missing_field": 2, "short_video": 1, "truncated_tar": 3, "missing_shard": 2,
                       "bad_metadata": 1}
    assert loader.stats["skipped"] == 11 and loader.stats["seen"] == 17
    for key in ("'corrupt'", "'truncated_mp4'", "'no_json'", "'no_video'", "'short'", "'named_label'"):
        assert f"{key} in {bad_shards}/shard-000000.tar" in caplog.text
    assert f"in {bad_shards}/shard-000001.tar: truncated_tar" in caplog.text
    assert "shard ended after 2 of 3 samples" in caplog.text
    assert f"{bad_shards}/shard-000003.tar: missing_shard" in caplog.text


def test_training_goes_on_through_bad_data(bad_shards):
    cfg = DataConfig(shards=bad_shards, num_workers=2, shuffle_buffer=3, max_skip_fraction=1.0)
    it = iter(build_loader(cfg, frames=8, size=(16, 16), batch_size=2))
    keys = [k for _ in range(9) for k in next(it)["key"]]  # 18 good samples: three epochs' worth
    assert set(keys) == set(GOOD)


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_ceiling_stops_the_job_with_a_clear_message(bad_shards, workers):
    """Also from a loader worker process: the message as the worker raised it, not inside DataLoader's report
    of the worker's traceback (which made the CLI's one-line error 750 characters long)."""
    cfg = DataConfig(shards=bad_shards, num_workers=workers, max_skip_fraction=0.2, skip_check_after=4)
    with pytest.raises(DataError, match=r"^loader worker 0: .*max_skip_fraction = 20.0%.*reasons: .*corrupt_video") as e:
        for _ in build_loader(cfg, frames=8, size=(16, 16), batch_size=2, train=False):
            pass
    assert "Traceback" not in str(e.value)


def test_shards_gone_during_training_say_where(tmp_path):
    """A deleted bucket or prefix mid-run: every shard a missing_shard skip, and the error never said where."""
    cfg = DataConfig(shards=f"{tmp_path}/gone/shard-{{000000..000001}}.tar", num_workers=0, max_skip_fraction=1.0)
    with pytest.raises(DataError, match=rf"skipped: {{'missing_shard': 2}} \(none of the shards under {tmp_path}/gone "
                                        r"is there any more: was the bucket or prefix deleted or moved"):
        next(iter(build_loader(cfg, frames=4, size=(8, 8), batch_size=1)))


def test_skip_ceiling_waits_for_the_minimum_sample_count(bad_shards):
    cfg = DataConfig(shards=bad_shards, num_workers=0, max_skip_fraction=0.2, skip_check_after=1000)
    assert len([b for b in build_loader(cfg, frames=8, size=(16, 16), batch_size=2, train=False)]) == 3


def test_a_tar_cut_between_a_samples_members_counts_as_truncated(tmp_path, caplog):
    """Cut after a sample's json and before its video, the tar looked whole and the sample was 'missing_field'."""
    from data_pipeline.tario import iter_records

    w = TarWriter(str(tmp_path / "shard-000000.tar"))
    for key, n in (("good0", 0), ("halved", 1)):
        w.write(key, _sample(n))
    w.close()
    whole = (tmp_path / "shard-000000.tar").read_bytes()
    assert [r.cut_off for r in iter_records(io.BytesIO(whole))] == [False, False]
    cut = whole[: whole.index(b"halved.mp4")]  # the writer puts json first: halved.json stays, its video goes
    cut = cut[: len(cut) - len(cut) % 512]  # at the video member's header
    (tmp_path / "shard-000000.tar").write_bytes(cut)
    assert [(r.key, sorted(r.fields), r.cut_off) for r in iter_records(io.BytesIO(cut))] == [
        ("good0", ["json", "mp4"], False), ("halved", ["json"], True)]
    index = {"format": "hpdm-shards/1", "class_names": [], "num_samples": 2,
             "shards": [{"name": "shard-000000.tar", "samples": 2}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    loader = build_loader(DataConfig(shards=str(tmp_path), num_workers=0, max_skip_fraction=1.0), frames=8,
                          size=(16, 16), batch_size=1, train=False)
    with caplog.at_level(logging.WARNING):
        assert [k for b in loader for k in b["key"]] == ["good0"]
    assert loader.stats["reasons"] == {"truncated_tar": 1}
    assert "'halved'" in caplog.text and "the tar ends inside this sample (no video; found json)" in caplog.text


def test_clips_longer_than_every_video_say_so_not_raise_the_fraction(tiny_shards):
    """data.fps, data.frame_stride or model.patch asking for more frames than the videos hold: the error advised
    raising data.max_skip_fraction, which cannot help."""
    cfg = DataConfig(shards=tiny_shards["many"], num_workers=0, skip_check_after=4)
    with pytest.raises(DataError, match=r"samples were bad .* reasons: short_video: \d+\. Every video is shorter than "
                                        r"one clip, see the warnings: use longer videos, or fewer frames per clip"):
        next(iter(build_loader(cfg, frames=64, size=(16, 16), batch_size=2)))
