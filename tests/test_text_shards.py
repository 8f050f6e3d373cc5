"""embed-text: caption embeddings as shards parallel to the video shards (same keys, same order), equal to the
encoder's output, resumable, never mixed across settings; make-shards --encoder writes the same ones; local and S3."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

import hpdm.cli
from data_pipeline import DataConfig, DataError, make_shards, prepare_dataset
from data_pipeline.loader import matching_text_urls
from data_pipeline.shardlist import resolve_shards
from data_pipeline.storage import Storage
from data_pipeline.tario import iter_records
from data_pipeline.text_shards import embed_shards, read_text_index, text_shard_urls
from hpdm.text_encoder import TextEncoder, encoder_digest
from tests.tiny_t5 import save_tiny_t5

TOKENS = 16


@pytest.fixture(scope="module")
def encoder(tiny_t5):
    enc = TextEncoder(str(tiny_t5), TOKENS)
    return enc, {"encoder": str(tiny_t5), "width": enc.width, "max_tokens": TOKENS, "digest": enc.digest}


def records(storage, url) -> list:
    with storage.open(url) as f:
        return [(r.key, r.fields) for r in iter_records(f)]


def video_shards(storage, folder) -> list[str]:
    return [f"{folder}/{s['name']}" for s in json.loads(storage.read_bytes(f"{folder}/index.json"))["shards"]]


def check_embeddings(enc, video_urls, emb, dtype=torch.bfloat16, storage=None) -> dict:
    """Every embedding shard holds its video shard's keys in order, each the encoder's output for that caption
    restricted to its mask; returns {key: tensor}."""
    storage = storage or Storage()
    found = {}
    for url, turl in zip(video_urls, text_shard_urls(video_urls, emb)):
        videos, texts = records(storage, url), records(storage, turl)
        assert [k for k, _ in texts] == [k for k, _ in videos] and all(set(f) == {"safetensors"} for _, f in texts)
        for (key, fields), (_, tfields) in zip(videos, texts):
            caption = json.loads(fields["json"])["caption"]
            t = load(tfields["safetensors"])["text"]
            ref, mask = enc.encode([caption])
            n = min(len(enc.tokenizer(caption)["input_ids"]), TOKENS)
            assert t.dtype == dtype and t.shape == (n, enc.width) and int(mask.sum()) == n
            torch.testing.assert_close(t.float(), ref[0][mask[0]], rtol=2e-2, atol=2e-2)
            found[key] = t
    return found


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("which, dtype", [("many", "bfloat16"), ("one", "float16")])
def test_embeddings_are_the_encoders_in_the_video_shards_order(tiny_shards, encoder, tmp_path, which, dtype):
    enc, meta = encoder
    shards = str(tmp_path / "videos")
    shutil.copytree(tiny_shards[which], shards)
    index = embed_shards(shards, enc.encode, meta, batch=5, dtype=dtype, progress=False)  # default: SHARDS/text
    urls = video_shards(Storage(), shards)
    assert index == read_text_index(Storage(), f"{shards}/text")
    assert {k: index[k] for k in ("encoder", "width", "max_tokens", "digest", "dtype", "videos")} == {
        **meta, "dtype": dtype, "videos": shards}
    assert index["shards"] == {u.rsplit("/", 1)[-1]: {"samples": 12 // len(urls), "bytes": os.path.getsize(u),
                                                       "source": index["shards"][u.rsplit("/", 1)[-1]]["source"]}
                               for u in urls}
    assert len(check_embeddings(enc, urls, f"{shards}/text", getattr(torch, dtype))) == 12
    with pytest.raises(DataError, match=rf"{tmp_path}/none: no text embeddings there .*run `hpdm embed-text SHARDS "
                                        rf"--encoder PATH` --out {tmp_path}/none"):
        read_text_index(Storage(), str(tmp_path / "none"))
    with pytest.raises(DataError, match="a/x.tar and b/x.tar have the same name 'x.tar'"):
        text_shard_urls(["a/x.tar", "b/x.tar"], "emb")


def test_rerun_redoes_only_unfinished_shards_and_refuses_other_settings(tiny_shards, encoder, tmp_path):
    enc, meta = encoder
    out = tmp_path / "emb"
    index = embed_shards(tiny_shards["many"], enc.encode, meta, out=str(out), progress=False)
    before = snapshot(out)
    (out / "shard-000003.tar").unlink()  # lost, and shard 7 as if killed while writing it
    side = out / "shard-000007.meta.json"
    side.write_text(json.dumps(json.loads(side.read_text()) | {"state": "writing"}))
    assert embed_shards(tiny_shards["many"], enc.encode, meta, out=str(out), progress=False) == index
    after = snapshot(out)
    redone = {f"shard-00000{i}.{ext}" for i in (3, 7) for ext in ("tar", "meta.json")} | {"index.json"}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n not in redone)  # bytes and mtimes: not touched
    assert all(after[n][0] == before[n][0] and after[n][1] > before[n][1] for n in redone)  # rewritten, same bytes
    ours = f"encoder={meta['encoder']} width=32 max_tokens=16 dtype=bfloat16 digest={enc.digest}"
    for changed, theirs in (({"max_tokens": 8}, f"encoder={meta['encoder']} width=32 max_tokens=8"),
                            ({"encoder": "other-t5"}, "encoder=other-t5 width=32 max_tokens=16")):
        with pytest.raises(DataError, match=rf"{out} holds embeddings made with {ours}, not {theirs} dtype=bfloat16 "
                                            rf"digest={enc.digest}; "
                                            r"embeddings are never mixed or overwritten: write these to another folder "
                                            r"with --out"):
            embed_shards(tiny_shards["many"], enc.encode, meta | changed, out=str(out), progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=rf"{out}/notes.txt: embed-text did not write this"):
        embed_shards(tiny_shards["many"], enc.encode, meta, out=str(out), progress=False)
    assert snapshot(out) == after | {"notes.txt": (b"mine", (out / "notes.txt").stat().st_mtime_ns)}


def test_a_missing_caption_is_named_and_long_captions_are_cut(tiny_manifest, encoder, tmp_path):
    enc, meta = encoder
    for i in range(3):
        shutil.copy(tiny_manifest.parent / f"clip{i:06d}.mp4", tmp_path)
    long = " ".join(["a red square moving left"] * 5)  # 26 tokens: cut at TOKENS
    rows = [{"path": "clip000000.mp4", "caption": long}, {"path": "clip000001.mp4", "caption": "a blue circle"},
            {"path": "clip000002.mp4", "caption": " "}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(str(tmp_path / "m.jsonl"), str(tmp_path / "ds"), progress=False)
    shutil.copytree(tmp_path / "ds", tmp_path / "plain", ignore=shutil.ignore_patterns("*.json"))  # tars only
    for shards in ("ds", "plain"):  # captions from make-shards' sidecar, and from the tar's .json members
        with pytest.raises(DataError, match=rf"{tmp_path}/{shards}/shard-000000.tar: sample 'clip000002' has no "
                                            r"caption; give every video a caption in the manifest"):
            embed_shards(str(tmp_path / shards), enc.encode, meta, out=str(tmp_path / f"{shards}-text"), progress=False)
    assert not (tmp_path / "ds-text").exists()  # the sidecar's captions are checked before anything is written
    fixed = rows[:2] + [{**rows[2], "caption": "a green triangle"}]  # as the message says (it said: a new folder)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed))
    make_shards(str(tmp_path / "m.jsonl"), str(tmp_path / "ds"), progress=False)
    embed_shards(str(tmp_path / "ds"), enc.encode, meta, out=str(tmp_path / "ds-text"), progress=False)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    make_shards(str(tmp_path / "m.jsonl"), str(tmp_path / "ok"), progress=False)
    embed_shards(str(tmp_path / "ok"), enc.encode, meta, progress=False)
    texts = check_embeddings(enc, video_shards(Storage(), str(tmp_path / "ok")), str(tmp_path / "ok" / "text"))
    assert texts["clip000000"].shape == (TOKENS, 32) and texts["clip000001"].shape == (4, 32)


def test_embed_text_cli_errors(tiny_shards, tiny_t5, tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "embed-text", tiny_shards["one"], "--encoder",
                           str(tmp_path / "no-t5"), "--out", str(tmp_path / "emb")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"hpdm embed-text: error: --encoder: {tmp_path}/no-t5 is neither a "
                                                   "folder nor a model in the Hugging Face cache")
    config = tmp_path / "t2v.yaml"
    config.write_text("model:\n  cond: text\n  text_dim: 64\n  text_tokens: 16\n")
    base = ["embed-text", tiny_shards["one"], "--encoder", str(tiny_t5), "--out", str(tmp_path / "emb"), "--config",
            str(config)]
    for extra, error in (([], f"--encoder: {tiny_t5} gives 32-wide embeddings but model.text_dim is 64"),
                         (["--max-tokens", "8"], f"--max-tokens: 8, but model.text_tokens is 16 in {config}"),
                         (["--batch", "0"], "--batch: must be >= 1; got 0")):
        assert hpdm.cli.main(base + extra) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"hpdm embed-text: error: {error}")
    assert not (tmp_path / "emb").exists()


def test_make_shards_with_encoder_writes_what_embed_text_writes(tiny_manifest, tiny_t5, encoder, tmp_path, capsys):
    dest, other, plain = tmp_path / "ds", tmp_path / "other", tmp_path / "plain"
    common = ["--encoder", str(tiny_t5), "--max-tokens", str(TOKENS), "--no-progress"]
    assert hpdm.cli.main(["make-shards", str(tiny_manifest), str(dest), "--shard-size-mb", "0.02", "--workers", "1",
                          *common]) == 0  # in this process: the subprocess of the test above already ran the command
    assert f"their captions' embeddings in {dest}/text" in capsys.readouterr().out
    sides = [json.loads(p.read_text()) for p in dest.glob("*.meta.json")]
    assert sides and all(len(s["captions"]) == len(s["keys"]) for s in sides)
    assert hpdm.cli.main(["embed-text", str(dest), "--out", str(other), *common]) == 0
    out = capsys.readouterr().out
    assert (f"embed-text: 12 captions of {len(list(dest.glob('*.tar')))} shards at {other} "
                                f"({tiny_t5}, 32 wide, up to {TOKENS} tokens, bfloat16)") in out
    shutil.copytree(dest, plain, ignore=shutil.ignore_patterns("*.json", "text"))  # no sidecars: captions from tars
    enc, meta = encoder
    embed_shards(str(plain), enc.encode, meta, out=str(plain / "text"), progress=False)
    tars = sorted(p.name for p in dest.glob("*.tar"))
    assert tars == sorted(p.name for p in (dest / "text").glob("*.tar")) and len(tars) > 1
    for name in tars:
        made = (dest / "text" / name).read_bytes()
        assert made == (other / name).read_bytes() == (plain / "text" / name).read_bytes()
    check_embeddings(enc, video_shards(Storage(), str(dest)), str(dest / "text"))
    before = snapshot(dest)  # make-shards again over its own work with text/ beside it: nothing to do
    make_shards(str(tiny_manifest), str(dest), shard_size_mb=0.02, progress=False,
                embed={"encode": enc.encode, "encoder_meta": meta})
    assert {n: v for n, v in snapshot(dest).items() if not n.endswith("index.json")} == \
        {n: v for n, v in before.items() if not n.endswith("index.json")}
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "text").write_text("a file, not the embeddings folder")
    with pytest.raises(DataError, match=rf"{tmp_path}/f/text: make-shards did not write this"):
        make_shards(str(tiny_manifest), str(tmp_path / "f"), progress=False)


def test_synthetic_treats_index_and_text_as_the_users_data(tiny_shards, encoder, tmp_path):
    enc, meta = encoder
    data = tmp_path / "data"
    shutil.copytree(tiny_shards["one"], data)
    embed_shards(str(data), enc.encode, meta, progress=False)
    before = snapshot(data)
    cfg = DataConfig(shards=str(data), synthetic=True, flip=False, synthetic_videos=4, num_workers=0)
    assert prepare_dataset(cfg, (4, 16, 16), num_classes=4)["num_samples"] == 12
    for name in os.listdir(data):  # only the embeddings are left: still not a place for the synthetic set
        if name != "text":
            os.remove(data / name)
    left = snapshot(data)
    with pytest.raises(DataError, match=rf"data.shards {data} holds 1 file: text, but no index.json"):
        prepare_dataset(cfg, (4, 16, 16), num_classes=4)
    assert snapshot(data) == left and set(left) < set(before)


def test_embeddings_on_s3(s3_server, monkeypatch, tiny_manifest, tiny_shards, encoder):
    s3_server.env(monkeypatch)
    enc, meta = encoder
    storage, base = Storage(), f"s3://{s3_server.bucket}/t2v"
    embed = {"encode": enc.encode, "encoder_meta": meta, "batch": 3}
    make_shards(str(tiny_manifest), f"{base}/ds", shard_size_mb=0.02, progress=False, embed=embed)  # -> ds/text
    for tar in Path(tiny_shards["many"]).glob("*.tar"):  # shards without sidecars: captions streamed from S3
        storage.upload(str(tar), f"{base}/plain/{tar.name}")
    index = embed_shards(f"{base}/plain", enc.encode, meta, out=f"{base}/plain-text", storage=storage, progress=False)
    assert index["num_samples"] == 12 == read_text_index(storage, f"{base}/ds/text")["num_samples"]
    a = check_embeddings(enc, video_shards(storage, f"{base}/ds"), f"{base}/ds/text", storage=storage)
    plain = sorted(u for u in storage.list(f"{base}/plain", ".tar"))
    b = check_embeddings(enc, plain, f"{base}/plain-text", storage=storage)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=2e-2) for k in a)
    stamp = {u: storage.read_bytes(u) for u in storage.contents(f"{base}/ds/text")}
    make_shards(str(tiny_manifest), f"{base}/ds", shard_size_mb=0.02, progress=False, embed=embed)  # all done
    assert {u: storage.read_bytes(u) for u in storage.contents(f"{base}/ds/text")} == stamp


def test_an_encoder_named_by_its_hugging_face_cache_entry(tiny_shards, tiny_t5, encoder, tmp_path):
    """`--encoder ORG/NAME` finds a model already in the Hugging Face cache (the hub's own layout, offline), the
    same encoder as its folder; a name not in the cache is refused without a download."""
    hub = tmp_path / "hub"
    snapshot_dir = hub / "models--hpdm-test--tiny-t5" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_t5, snapshot_dir)
    (hub / "models--hpdm-test--tiny-t5" / "refs").mkdir()
    (hub / "models--hpdm-test--tiny-t5" / "refs" / "main").write_text("0123456789abcdef")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    shards = str(tmp_path / "videos")
    shutil.copytree(tiny_shards["one"], shards)
    for name, ok in (("hpdm-test/tiny-t5", True), ("hpdm-test/not-there", False)):
        proc = subprocess.run([sys.executable, "-m", "hpdm.cli", "embed-text", shards, "--encoder", name,
                               "--max-tokens", str(TOKENS)], capture_output=True, text=True, timeout=300, env=env)
        if ok:
            assert proc.returncode == 0, proc.stderr
            index = read_text_index(Storage(), f"{shards}/text")
            assert (index["encoder"], index["width"]) == (name, 32)
            assert len(check_embeddings(encoder[0], video_shards(Storage(), shards), f"{shards}/text")) == 12
        else:
            assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith(
                f"hpdm embed-text: error: --encoder: {name} is neither a folder nor a model in the Hugging Face cache")


def shards_of(tiny_manifest, tmp_path, name, word="", size_mb=1024.0) -> str:
    """make-shards of the 12 tiny clips into ``tmp_path/name`` (one shard by default), ``word`` ending every caption."""
    clips = tmp_path / "clips"
    clips.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in tiny_manifest.read_text().splitlines()]
    for r in rows:
        shutil.copy(tiny_manifest.parent / r["path"], clips)
    (clips / "m.jsonl").write_text("".join(json.dumps(r | {"caption": r["caption"] + word}) + "\n" for r in rows))
    make_shards(str(clips / "m.jsonl"), str(tmp_path / name), shard_size_mb=size_mb, progress=False)
    return str(tmp_path / name)


def made_for(shards: str, emb: str, tokens: int = TOKENS) -> list[str]:
    cfg = DataConfig(shards=shards, text_embeddings=emb)
    return matching_text_urls(cfg, Storage(), resolve_shards(Storage(), shards)[0], tokens, 32)


def test_embeddings_of_other_videos_are_never_overwritten(tiny_manifest, encoder, tmp_path):
    """Another set's shards of the same names into A's embedding folder: refused before anything is written; the
    same videos moved elsewhere (text/ with them) reuse their embeddings."""
    enc, meta = encoder
    a, b = shards_of(tiny_manifest, tmp_path, "a", size_mb=1e-6), shards_of(tiny_manifest, tmp_path, "b", " over",
                                                                             size_mb=1e-6)
    embed_shards(a, enc.encode, meta, progress=False)
    before = snapshot(Path(a) / "text")
    with pytest.raises(DataError, match=rf"{a}/text holds the embeddings of the video shards at {a}, not of {b} "
                                        rf"\(shard-000000.tar differs\): write these to another folder with --out"):
        embed_shards(b, enc.encode, meta, out=f"{a}/text", progress=False)
    assert snapshot(Path(a) / "text") == before
    shutil.copytree(a, tmp_path / "moved")
    index = embed_shards(str(tmp_path / "moved"), enc.encode, meta, progress=False)
    assert index["videos"] == str(tmp_path / "moved")
    assert {n: v[0] for n, v in snapshot(tmp_path / "moved" / "text").items() if n != "index.json"} == \
        {n: v[0] for n, v in before.items() if n != "index.json"}


def test_an_encoder_replaced_at_its_path_is_not_mixed_in(tiny_t5, tiny_shards, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5, folder)
    first = TextEncoder(str(folder), TOKENS)
    meta = {"encoder": str(folder), "width": 32, "max_tokens": TOKENS}
    embed_shards(tiny_shards["many"], first.encode, meta | {"digest": first.digest}, out=str(tmp_path / "emb"), progress=False)
    assert read_text_index(Storage(), str(tmp_path / "emb"))["digest"] == first.digest == encoder_digest(str(folder))
    (tmp_path / "emb" / "shard-000005.tar").unlink()  # the rest is embedded again, by another model at that path
    save_tiny_t5(folder, d_model=32, seed=1)
    second = TextEncoder(str(folder), TOKENS)
    assert second.digest != first.digest
    with pytest.raises(DataError, match=rf"made with encoder={folder} .* digest={first.digest}, not .* "
                                        rf"digest={second.digest}; embeddings are never mixed"):
        embed_shards(tiny_shards["many"], second.encode, meta | {"digest": second.digest}, out=str(tmp_path / "emb"),
                     progress=False)


def test_stale_or_foreign_embeddings_are_refused_at_training_start(tiny_manifest, encoder, tmp_path, caplog):
    enc, meta = encoder
    a, b = shards_of(tiny_manifest, tmp_path, "a"), shards_of(tiny_manifest, tmp_path, "b", " over")
    for shards in (a, b):
        embed_shards(shards, enc.encode, meta | {"max_tokens": 8}, progress=False)
    with caplog.at_level("WARNING"):
        assert made_for(a, f"{a}/text") == [f"{a}/text/shard-000000.tar"]
    assert f"{a}/text: the embeddings have up to 8 tokens but model.text_tokens is 16" in caplog.text
    with pytest.raises(DataError, match=rf"{b}/text: the embeddings of shard-000000.tar do not match "
                                        rf"{a}/shard-000000.tar \(its keys or captions differ\); they were made for "
                                        rf"the videos at {b}: give these videos their own with `hpdm embed-text {a} "):
        made_for(a, f"{b}/text")
    shards_of(tiny_manifest, tmp_path, "a", " left")  # make-shards again with other captions, embed-text not rerun
    with pytest.raises(DataError, match=rf"{a}/text: the embeddings of shard-000000.tar do not match "
                                        rf"{a}/shard-000000.tar \(its keys or captions differ\); the videos changed "
                                        rf"since they were embedded: embed them again with `hpdm embed-text {a} "
                                        rf"--encoder {meta['encoder']} --max-tokens 8`$"):
        made_for(a, f"{a}/text", 8)
    embed_shards(a, enc.encode, meta | {"max_tokens": 8}, progress=False)
    made_for(a, f"{a}/text", 8)


def test_a_plain_tar_replaced_in_place_is_embedded_again(tiny_shards, encoder, tmp_path):
    enc, meta = encoder
    plain = tmp_path / "plain"
    shutil.copytree(tiny_shards["many"], plain, ignore=shutil.ignore_patterns("*.json"))  # tars only, no sidecars
    embed_shards(str(plain), enc.encode, meta, progress=False)
    shutil.copy(plain / "shard-000005.tar", plain / "shard-000003.tar")
    embed_shards(str(plain), enc.encode, meta, progress=False)
    assert [k for k, _ in records(Storage(), str(plain / "text" / "shard-000003.tar"))] == ["clip000005"]


def test_float16_overflow_is_refused_before_it_is_stored(tiny_shards, tmp_path):
    def huge(captions):
        return torch.full((len(captions), 4, 32), 1e5), torch.ones(len(captions), 4, dtype=torch.bool)

    meta = {"encoder": "huge", "width": 32, "max_tokens": 4}
    with pytest.raises(DataError, match=rf"--dtype float16: the embedding of {tiny_shards['one']}/shard-000000.tar "
                                        r"sample 'clip000000' is not finite in float16 \(the encoder's largest value "
                                        r"is 1e\+05\); use --dtype bfloat16"):
        embed_shards(tiny_shards["one"], huge, meta, out=str(tmp_path / "emb"), dtype="float16", progress=False)
    assert not (tmp_path / "emb" / "shard-000000.tar").exists()
    embed_shards(tiny_shards["one"], huge, meta, out=str(tmp_path / "bf16"), progress=False)
