"""Streaming: the split across ranks and workers, shapes and labels, exact resume, layout changes."""
import json
import logging
import shutil
from collections import Counter

import pytest
import torch

from data_pipeline import DataConfig, build_loader
from data_pipeline.decode import ClipSpec, clip_indices


def _cfg(shards, **kw):
    base = dict(shards=shards, num_workers=0, shuffle_buffer=4, max_skip_fraction=0.0)
    return DataConfig(**{**base, **kw})


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batches_have_the_promised_shapes_and_labels(tiny_shards):
    loader = build_loader(_cfg(tiny_shards["many"]), frames=8, size=(24, 40), batch_size=3, train=False)
    batches = list(loader)
    assert [b["video"].shape for b in batches] == [(3, 8, 24, 40, 3)] * 4
    b = batches[0]
    assert b["video"].dtype == torch.uint8 and b["label"].dtype == torch.int64
    index = json.load(open(f"{tiny_shards['many']}/index.json"))
    for key, label, caption in zip(b["key"], b["label"].tolist(), b["caption"]):
        n = int(key[-6:])
        assert label == n % 4
        assert caption == "a " + ["red square moving left", "red square moving right", "red square moving up",
                                  "red square moving down"][label]
    assert index["num_samples"] == 12 and len(index["shards"]) == 12
    assert loader.stats["seen"] == 12 and loader.stats["skipped"] == 0
    assert sorted(k for b in batches for k in b["key"]) == sorted(f"clip{i:06d}" for i in range(12))
    assert [b["key"] for b in list(loader)] == [b["key"] for b in batches]  # eval: same pass every time


@pytest.mark.parametrize("kind", ["many", "one"])
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tiny_shards, kind):
    """Training, batch size 1: read until every worker of both ranks is in epoch 2; epochs 0 and 1 each hold
    every sample exactly once across the job (kind "one": fewer shards than workers, split by sample)."""
    per_epoch = {0: Counter(), 1: Counter()}
    for rank in range(2):
        loader = build_loader(_cfg(tiny_shards[kind], num_workers=2), frames=4, size=(16, 16), batch_size=1,
                              rank=rank, world_size=2, seed=3)
        it = iter(loader)
        while True:
            batch = next(it)
            st = loader.state_dict()
            w = (st["next_worker"] - 1) % 2
            epoch = st["workers"][w]["cursor"]["epoch"]
            if epoch in per_epoch:
                per_epoch[epoch].update(batch["key"])
            if all(s and s["cursor"]["epoch"] >= 2 for s in st["workers"]):
                break
    everything = Counter(f"clip{i:06d}" for i in range(12))
    assert per_epoch[0] == everything
    assert per_epoch[1] == everything


@pytest.mark.parametrize("kind,workers", [("many", 2), ("one", 0)])
def test_resume_after_k_batches_equals_the_uninterrupted_run(tiny_shards, kind, workers):
    cfg = _cfg(tiny_shards[kind], num_workers=workers, shuffle_buffer=5)
    kw = dict(frames=6, size=(16, 24), batch_size=2, seed=7)
    full = _take(build_loader(cfg, **kw), 11)  # 22 samples: crosses the end of epoch 0 on every worker
    first = build_loader(cfg, **kw)
    head = _take(first, 3)  # odd: with 2 workers the resumed run must ask worker 1 first
    state = json.loads(json.dumps(first.state_dict()))  # what the trainer checkpoints
    assert state["next_worker"] == (1 if workers == 2 else 0)
    second = build_loader(cfg, **kw)
    second.load_state_dict(state)
    tail = _take(second, 8)
    for a, b in zip(full, head + tail):
        assert a["key"] == b["key"]
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
    assert second.stats["seen"] == 22 and second.stats["skipped"] == 0  # counts resume too
    assert [b["key"] for b in full] != [b["key"] for b in _take(build_loader(cfg, **{**kw, "seed": 8}), 11)]


def test_training_epochs_reshuffle_and_augment(tiny_shards):
    loader = build_loader(_cfg(tiny_shards["many"], shuffle_buffer=3), frames=4, size=(16, 16), batch_size=12)
    e0, e1 = _take(loader, 2)
    assert sorted(e0["key"]) == sorted(e1["key"]) and e0["key"] != e1["key"]


def test_changed_world_size_restarts_at_the_saved_epoch(tiny_shards, caplog):
    cfg = _cfg(tiny_shards["many"])
    kw = dict(frames=4, size=(16, 16), batch_size=4, seed=1)
    one = build_loader(cfg, **kw)
    _take(one, 4)  # 16 samples of 12: epoch 1
    state = one.state_dict()
    two = build_loader(cfg, rank=1, world_size=2, **kw)
    with caplog.at_level(logging.DEBUG, logger="data_pipeline.loader"):
        two.load_state_dict(state)
    # said by rank 0 only (every rank warned, rank 1 of "rank 0 -> 1", which is by design, and of "batch_size")
    said = [r for r in caplog.records if "data position" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG] and "epoch 1" in caplog.text
    assert "saved with processes 1 -> 2;" in said[0].getMessage() and "rank" not in caplog.text
    assert two.epoch == 1 and two.stats["seen"] == one.stats["seen"]
    batch = _take(two, 1)[0]
    assert batch["video"].shape == (4, 4, 16, 16, 3)


def test_another_dataset_with_as_many_shards_restarts_at_the_saved_epoch(tiny_shards, tmp_path, caplog):
    """The saved cursors (shard, byte offset) were applied to another dataset's shards when it had as many, and
    the samples they missed were counted as bad data. The same dataset moved elsewhere resumes exactly, and so does
    a state saved before the dataset was recorded."""
    kw = dict(frames=4, size=(16, 16), batch_size=4, seed=1)
    one = build_loader(_cfg(tiny_shards["many"]), **kw)
    _take(one, 4)
    state = one.state_dict()
    shutil.copytree(tiny_shards["many"], tmp_path / "moved")
    with caplog.at_level(logging.WARNING):
        build_loader(_cfg(str(tmp_path / "moved")), **kw).load_state_dict(state)
    assert "restarting every worker" not in caplog.text
    shutil.copytree(tiny_shards["many"], tmp_path / "other")
    index = json.loads((tmp_path / "other" / "index.json").read_text())  # as many shards, of other sizes
    for entry in index["shards"]:
        entry["bytes"] += 512
    (tmp_path / "other" / "index.json").write_text(json.dumps(index))
    other = build_loader(_cfg(str(tmp_path / "other")), **kw)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert "the data position was saved with dataset " in caplog.text and ", shards " not in caplog.text
    assert "epoch 1" in caplog.text
    assert other.epoch == 1 and other.state_dict()["workers"] != state["workers"]
    caplog.clear()
    old = json.loads(json.dumps(state))
    del old["layout"]["dataset"]
    same = build_loader(_cfg(tiny_shards["many"]), **kw)
    same.load_state_dict(old)
    assert "restarting every worker" not in caplog.text and same.state_dict()["workers"] == state["workers"]


def test_clip_indices_follow_fps_and_stride():
    spec = ClipSpec(frames=4, size=(8, 8), stride=2, fps=12.0, train=False)
    assert clip_indices(40, 24.0, spec, None) == [0, 4, 8, 12]  # 24 -> 12 fps doubles the step, stride doubles it again
    spec = ClipSpec(frames=3, size=(8, 8), fps=48.0, train=False)
    assert clip_indices(10, 24.0, spec, None) == [0, 1, 1]  # upsampling repeats frames


@pytest.mark.parametrize("counts, world, workers, starved", [
    ([1], 2, 1, 1),  # one clip, two processes: rank 0 met a gloo traceback when rank 1 stopped
    ([2, 2], 1, 4, 1),  # 4 samples for 4 workers, but shard 1's samples fall to the workers of shard 0's
    ([3, 3], 1, 4, 0),
    ([1], 1, 1, 0),
])
def test_a_loader_worker_without_any_sample_is_refused_up_front(counts, world, workers, starved):
    from data_pipeline.storage import Storage
    from data_pipeline.stream import DataError, ShardStream

    make = lambda rank: ShardStream(urls=[f"s{i}.tar" for i in range(len(counts))], counts=counts, storage=Storage(),  # noqa: E731
                                    spec=ClipSpec(frames=4, size=(8, 8), train=True), batch_size=1, rank=rank,
                                    world_size=world, workers=workers)
    for rank in range(world):  # every rank says it, before any reading
        if starved:
            with pytest.raises(DataError, match=rf"gives {starved} of the {world * workers} loader workers"):
                make(rank)
        else:
            make(rank)  # every worker has a sample: no error
