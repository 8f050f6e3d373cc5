"""Text-to-video end to end (issue 12): the loader joins each sample's caption embedding from the parallel
embedding shards and resumes exactly; still images join video batches; `hpdm train` on the tiny text-to-video
config learns from precomputed embeddings (and from an encoder on the fly), resumes bit for bit, and samples
from a prompt."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import DataConfig, DataError, build_loader, build_train_loader, make_shards
from data_pipeline.synthetic import render
from data_pipeline.text_shards import embed_shards
from hpdm.config import load_config
from hpdm.doctor import check_resume
from hpdm.text_encoder import TextEncoder
from tests.helpers import run_hpdm
from tests.tiny_t5 import save_tiny_t5

TOKENS, WIDTH = 16, 32


@pytest.fixture(scope="module")
def encoder(tiny_t5):
    return TextEncoder(str(tiny_t5), TOKENS)


@pytest.fixture(scope="module")
def embedded(tiny_shards, encoder, tiny_t5, tmp_path_factory):
    """The tiny shards' caption embeddings, written outside the (shared) shard folders."""
    root = tmp_path_factory.mktemp("embedded")
    meta = {"encoder": str(tiny_t5), "width": WIDTH, "max_tokens": TOKENS}
    for kind in ("many", "one"):
        embed_shards(tiny_shards[kind], encoder.encode, meta, out=str(root / kind), progress=False)
    return {kind: str(root / kind) for kind in ("many", "one")}


def _cfg(shards, text, **kw):
    return DataConfig(**{**dict(shards=shards, text_embeddings=text, num_workers=0, shuffle_buffer=5), **kw})


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batches_carry_each_samples_caption_embedding(tiny_shards, embedded, encoder):
    loader = build_loader(_cfg(tiny_shards["many"], embedded["many"], num_workers=2), frames=4, size=(16, 16),
                          batch_size=3, seed=2, text=(TOKENS, WIDTH))
    for batch in _take(loader, 6):  # more than an epoch, through the shuffle buffer
        assert batch["text"].shape == (3, TOKENS, WIDTH) and batch["text_mask"].shape == (3, TOKENS)
        want, mask = encoder.encode(batch["caption"])
        assert torch.equal(batch["text_mask"], mask)
        assert torch.allclose(batch["text"].float(), want, atol=2e-2, rtol=1e-2)  # stored as bf16
        assert not batch["text"][~batch["text_mask"]].any()  # padding is zero


@pytest.mark.parametrize("kind,workers", [("many", 2), ("one", 0)])
def test_resume_with_text_equals_the_uninterrupted_run(tiny_shards, embedded, kind, workers):
    cfg = _cfg(tiny_shards[kind], embedded[kind], num_workers=workers)
    kw = dict(frames=4, size=(16, 24), batch_size=2, seed=7, text=(TOKENS, WIDTH))
    full = _take(build_loader(cfg, **kw), 11)  # crosses the end of epoch 0
    first = build_loader(cfg, **kw)
    head = _take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    assert any(len(ref) == 3 for st in state["workers"] if st for ref in st["cursor"]["buffer"])  # embedding offsets
    second = build_loader(cfg, **kw)
    second.load_state_dict(state)
    for a, b in zip(full, head + _take(second, 8)):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])
        assert torch.equal(a["text"], b["text"]) and torch.equal(a["text_mask"], b["text_mask"])


@pytest.mark.parametrize("saved_with", ["embeddings", "encoder"])
def test_a_resume_that_switches_between_embeddings_and_an_encoder_restarts_the_epoch(tiny_shards, embedded, saved_with,
                                                                                   caplog):
    """Precomputed embeddings need cursors into their shards; an encoder on the fly (no text in the loader) has
    none. A resume across the switch raised a TypeError one way and blamed intact embeddings the other."""
    cfg = _cfg(tiny_shards["many"], embedded["many"])
    kw = dict(frames=4, size=(16, 16), batch_size=2, seed=7)
    with_text, without = dict(kw, text=(TOKENS, WIDTH)), kw
    before, after = (with_text, without) if saved_with == "embeddings" else (without, with_text)
    first = build_loader(cfg, **before)
    _take(first, 3)
    second = build_loader(cfg, **after)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert "text_embeddings" in caplog.text and "restarting every worker at the start of epoch 0" in caplog.text
    batches = _take(second, 8)  # more than an epoch (12 clips)
    assert [b["key"] for b in batches] == [b["key"] for b in _take(build_loader(cfg, **after), 8)]
    assert all(("text" in b) == ("text" in after) for b in batches)


def test_missing_or_mismatched_embeddings_stop_with_a_clear_error(tiny_shards, embedded, tmp_path):
    many = tiny_shards["many"]
    kw = dict(frames=4, size=(16, 16), batch_size=2, text=(TOKENS, WIDTH))
    with pytest.raises(DataError, match=r"no text embeddings there .*hpdm embed-text"):
        build_loader(_cfg(many, str(tmp_path / "nothing")), **kw)
    with pytest.raises(DataError, match=r"32 wide .* model.text_dim is 64"):
        build_loader(_cfg(many, embedded["many"]), **{**kw, "text": (TOKENS, 64)})
    with pytest.raises(DataError, match=r"up to 16 tokens but model.text_tokens is 8"):
        build_loader(_cfg(many, embedded["many"]), **{**kw, "text": (8, WIDTH)})
    with pytest.raises(DataError, match=r"pattern of shards"):
        build_loader(_cfg(many + "/shard-{000000..000011}.tar", ""), **kw)
    # The single shard's embeddings given for the twelve shards: shards 1..11 have none.
    with pytest.raises(DataError, match=r"shard-0000\d\d.tar has no text embeddings .*hpdm embed-text"):
        _take(build_loader(_cfg(many, embedded["one"], shuffle_buffer=0), **kw), 7)


def test_embeddings_of_other_shards_with_the_same_names_are_refused(tiny_manifest, embedded, tmp_path):
    """Shards rewritten from another manifest (so with other keys) beside the old embeddings: no silent mix-up."""
    rows = [json.loads(r) for r in open(tiny_manifest).read().splitlines()]
    manifest = tmp_path / "moved.jsonl"
    manifest.write_text("".join(json.dumps({**r, "path": str(tiny_manifest.parent / r["path"])}) + "\n" for r in rows))
    make_shards(str(manifest), str(tmp_path / "moved"), shard_size_mb=1024, progress=False)
    with pytest.raises(DataError, match=r"the embeddings of shard-000000.tar do not match .*moved/shard-000000.tar \(its "
                                        r"keys or captions differ\); they were made for the videos at "):
        build_loader(_cfg(str(tmp_path / "moved"), embedded["one"], shuffle_buffer=0), frames=4, size=(16, 16),
                     batch_size=2, text=(TOKENS, WIDTH))


@pytest.fixture(scope="module")
def stills(tmp_path_factory, encoder, tiny_t5):
    """Six captioned png stills (first frames of synthetic clips) as one shard, with their embeddings."""
    root = tmp_path_factory.mktemp("stills")
    rows = []
    for i in range(6):
        Image.fromarray(render(i % 4, 1, 32, 48, seed=100 + i)[0]).save(root / f"still{i}.png")
        rows.append({"path": f"still{i}.png", "label": i % 4, "caption": "a red square"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(str(root / "manifest.jsonl"), str(root / "shards"), progress=False,
                embed={"encode": encoder.encode, "encoder_meta": {"encoder": str(tiny_t5), "width": WIDTH,
                                                                  "max_tokens": TOKENS}})
    return str(root / "shards")


def test_joint_batches_end_with_still_images_and_resume_exactly(tiny_shards, embedded, stills):
    cfg = _cfg(tiny_shards["many"], embedded["many"], image_shards=stills, image_batch_fraction=0.5)
    kw = dict(frames=4, size=(16, 16), micro=4, seed=5, text=(TOKENS, WIDTH))
    full = _take(build_train_loader(cfg, **kw), 5)
    for b in full:
        assert b["video"].shape == (4, 4, 16, 16, 3) and b["text"].shape == (4, TOKENS, WIDTH)
        assert all(k.startswith("clip") for k in b["key"][:2]) and all(k.startswith("still") for k in b["key"][2:])
        assert (b["video"][2:] == b["video"][2:, :1]).all()  # a still repeated along time
        assert not (b["video"][:2] == b["video"][:2, :1]).all()  # videos move
    first = build_train_loader(cfg, **kw)
    head = _take(first, 2)
    second = build_train_loader(cfg, **kw)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(full, head + _take(second, 3)):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"]) and torch.equal(a["text"], b["text"])
    assert second.stats["seen"] == 20 and second.stats["skipped"] == 0


def test_a_resume_that_adds_or_removes_image_shards_goes_on(tiny_shards, embedded, stills, caplog):
    """Each way, the saved state was of the other loader's kind: a traceback ("saved without data.image_shards",
    "unsupported version None")."""
    joint = _cfg(tiny_shards["many"], embedded["many"], image_shards=stills, image_batch_fraction=0.5)
    alone = _cfg(tiny_shards["many"], embedded["many"])
    kw = dict(frames=4, size=(16, 16), micro=4, seed=5, text=(TOKENS, WIDTH))
    for before, after, said in ((alone, joint, "was not set"), (joint, alone, "was set")):
        first = build_train_loader(before, **kw)
        _take(first, 2)
        second = build_train_loader(after, **kw)
        caplog.clear()
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert f"data.image_shards {said} when this data position was saved" in caplog.text
        batch = _take(second, 1)[0]
        assert batch["video"].shape[0] == 4 and any(k.startswith("still") for k in batch["key"]) == (after is joint)


def _train(*args, check=True):
    cmd = [sys.executable, "-m", "hpdm.cli", "train", "--config", "configs/tiny_t2v.yaml", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=900)
    assert proc.returncode == (0 if check else 2), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1] if not check else proc.stdout + proc.stderr


def _losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_tiny_t2v_trains_on_embeddings_resumes_exactly_and_samples_a_prompt(tmp_path, tiny_t5, stills):
    data = tmp_path / "data"
    common = [f"data.shards={data}", "data.synthetic_videos=24", "train.log_every=1", "train.batch_size=4",
              "diffusion.steps=4", "train.sample_videos=2"]
    # The synthetic set is written, but a text model cannot train on shards without embeddings.
    error = _train(f"train.run_dir={tmp_path / 'none'}", *common, "train.steps=1", check=False)
    assert error.startswith("hpdm train: error: ") and "hpdm embed-text" in error, error
    run_hpdm("embed-text", str(data), "--encoder", str(tiny_t5), "--config", "configs/tiny_t2v.yaml")

    full, part = tmp_path / "full", tmp_path / "part"
    _train(f"train.run_dir={full}", *common, "train.steps=6", "train.save_every=3", "train.sample_every=3")
    _train(f"train.run_dir={part}", *common, "train.steps=3", "train.save_every=3", "train.sample_at_end=false")
    out = _train(f"train.run_dir={part}", *common, "train.steps=6", "train.save_every=3", "train.sample_at_end=false")
    assert "resumed from" in out
    assert _losses(part) == _losses(full) and len(_losses(full)) == 6  # bit for bit, text and dropout included
    measured = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in measured if "synthetic/one_shape" in r] == [3, 6]  # samples of the first captions
    assert (full / "samples" / "step_00000003.png").is_file()

    out = run_hpdm("sample", str(full), "--out", str(tmp_path / "s"), "--prompt", "a red square moving left",
                   "--encoder", str(tiny_t5), "--steps", "4")
    assert "wrote 1 videos of 8x24x32" in out
    assert (tmp_path / "s" / "00000_a-red-square-moving-left.mp4").stat().st_size > 0
    # Another encoder of the same width was taken silently, at sampling and on resume; the export says which it was.
    other = save_tiny_t5(tmp_path / "t5b", d_model=WIDTH, seed=1)
    run_hpdm("export", str(full), str(tmp_path / "full.safetensors"))
    wrong = subprocess.run([sys.executable, "-m", "hpdm.cli", "sample", str(tmp_path / "full.safetensors"), "--out",
                            str(tmp_path / "s2"), "--prompt", "a red square", "--encoder", str(other)],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and f"--encoder: {other} (digest " in wrong.stderr and \
        f"is not the encoder the generator was trained with, {tiny_t5} (digest " in wrong.stderr, wrong.stderr[-2000:]
    error = _train(f"train.run_dir={part}", *common, "train.steps=7", f"data.text_encoder={other}", check=False)
    assert f"text encoder: {tiny_t5} (digest " in error and f"-> {other} (digest " in error, error
    row = check_resume(load_config("configs/tiny_t2v.yaml", [f"train.run_dir={part}", *common, f"data.text_encoder={other}"]))
    assert row[0][1] == "FAIL" and f"text encoder: {tiny_t5} (digest " in row[0][2], row  # doctor says so beforehand

    # Captions encoded on the fly equal the precomputed embeddings up to their bf16 storage.
    online = tmp_path / "online"
    _train(f"train.run_dir={online}", *common, "train.steps=3", f"data.text_encoder={tiny_t5}",
           "train.sample_at_end=false")
    assert _losses(online) == pytest.approx({s: v for s, v in _losses(full).items() if s <= 3}, rel=1e-3)

    # Joint training: every micro-batch also holds still images (with their own embeddings).
    joint = tmp_path / "joint"
    _train(f"train.run_dir={joint}", *common, "train.steps=2", f"data.image_shards={stills}",
           "train.sample_at_end=false")
    last = [json.loads(line) for line in (joint / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 2 and np.isfinite(last["loss"]) and last["data/skipped"] == 0
