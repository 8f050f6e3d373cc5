"""`hpdm sample` from prompts (issue 12): the real command with a tiny random T5 encoder (tests/tiny_t5.py) and
untrained text-conditioned generators; names, prompts.json, the captioned grid, determinism, the prompt path
against precomputed embeddings, guidance, and each user mistake as one line naming the option."""
import json
import re

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hpdm.cli import main
from hpdm.config import Config
from hpdm.errors import UsageError
from hpdm.generate import conditions, video_rows
from hpdm.model import HPDM
from hpdm.prompts import CAPTION_HEIGHT, SLUG_CHARS, read_prompts, slug
from tests.helpers import randomize, run_hpdm, tiny_model_config
from tests.test_sampling import export_model

A, B, C = "a red square moving left", "The blue circle", "the green triangle"
SAMPLE = ("--steps", "4", "--guidance", "3", "--tile-batch", "64")


def generator(path, seed: int = 0, **model) -> str:
    """An exported random (gates included, so the condition matters) tiny generator: 1 level, video 4x16x16."""
    cfg = Config(model=tiny_model_config(**{"levels": 1, "levels_per_block": (1, 1, 1, 1), "cond": "text",
                                            "text_dim": 32, "text_tokens": 8, **model}))
    return export_model(randomize(HPDM(cfg.model), std=0.05, seed=seed), cfg, path)


def frames(path) -> np.ndarray:
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sample(*args: str) -> None:
    """`hpdm sample` in this process (the same parser and code; no second import of torch and transformers)."""
    assert main(["sample", *args]) == 0


@pytest.fixture(scope="module")
def gen(tmp_path_factory, tiny_t5):
    tmp = tmp_path_factory.mktemp("sample_text")
    return {"tmp": tmp, "enc": str(tiny_t5), "text": generator(tmp / "text.safetensors"),
            "two": generator(tmp / "two.safetensors", levels=2, levels_per_block=(1, 1, 2, 2)),
            "narrow": generator(tmp / "narrow.safetensors", text_dim=16),
            "class": generator(tmp / "class.safetensors", cond="class")}


@pytest.fixture(scope="module")
def runs(gen):
    """The sampled folders: two prompts for 3 videos (the real command in a subprocess), a prompt file, A's
    precomputed embedding, A at guidance 1, and A on a 2-level model."""
    from hpdm.text_encoder import TextEncoder  # noqa: PLC0415

    tmp, enc = gen["tmp"], gen["enc"]
    out = {k: tmp / k for k in ("two", "file", "emb", "g1", "levels2")}
    run_hpdm("sample", gen["text"], "--out", str(out["two"]), "--prompt", A, "--prompt", B, "-n", "3", "--encoder", enc,
             *SAMPLE)
    (tmp / "prompts.txt").write_text(f"# a comment\n\n  {A}  \n{C}\n")
    sample(gen["text"], "--out", str(out["file"]), "--prompt-file", str(tmp / "prompts.txt"), "--encoder", enc, *SAMPLE)
    emb, mask = TextEncoder(enc, max_tokens=8).encode([A])
    save_file({"text": emb[0].contiguous(), "mask": mask[0].contiguous()}, str(tmp / "a.safetensors"))
    sample(gen["text"], "--out", str(out["emb"]), "--text-emb", str(tmp / "a.safetensors"), "-n", "1", *SAMPLE)
    sample(gen["text"], "--out", str(out["g1"]), "--prompt", A, "--encoder", enc, *SAMPLE, "--guidance", "1")
    sample(gen["two"], "--out", str(out["levels2"]), "--prompt", A, "--encoder", enc, *SAMPLE, "--steps", "4,2")
    return out


def test_videos_are_named_after_their_prompts(runs):
    a, b, c = slug(A), slug(B), slug(C)
    assert (a, b) == ("a-red-square-moving-left", "the-blue-circle")
    names = {"00000_" + a + ".mp4": A, "00001_" + b + ".mp4": B, "00002_" + a + ".mp4": A}  # video i: prompt i % 2
    assert json.loads((runs["two"] / "prompts.json").read_text()) == names
    assert {p.name for p in runs["two"].glob("*.mp4")} == set(names)
    assert {p.name for p in runs["file"].glob("*.mp4")} == {f"00000_{a}.mp4", f"00001_{c}.mp4"}  # -n: one per prompt
    assert [p.name for p in runs["emb"].glob("*.mp4")] == ["video_00000.mp4"]  # no prompts: today's names
    assert [p.name for p in runs["levels2"].glob("*.mp4")] == [f"00000_{a}.mp4"]
    assert frames(runs["levels2"] / f"00000_{a}.mp4").shape == (8, 32, 32, 3)
    assert slug("  Über: a  CAT_on   the mat!! ") == "über-a-cat-on-the-mat" and slug("?!") == "prompt"
    long = slug("word " * 40)
    assert len(long) <= SLUG_CHARS and not long.endswith("-")


def test_grid_has_a_caption_per_row(runs):
    grid, plain = png(runs["two"] / "grid.png"), png(runs["emb"] / "grid.png")
    assert grid.shape == (3 * (16 + CAPTION_HEIGHT), 4 * 16, 3) and plain.shape == (16, 4 * 16, 3)
    rows = grid.reshape(3, 16 + CAPTION_HEIGHT, 4 * 16, 3)
    for r in rows:
        assert (r[:CAPTION_HEIGHT] > 128).any() and (r[:CAPTION_HEIGHT] == 0).mean() > 0.5, "white text on black"
    # the same video (A, seed 0) without captions: the strip is all that differs
    np.testing.assert_array_equal(rows[0, CAPTION_HEIGHT:], plain)
    assert not np.array_equal(rows[0, :CAPTION_HEIGHT], rows[1, :CAPTION_HEIGHT]), "each row has its own caption"
    assert png(runs["levels2"] / "grid.png").shape == (32 + CAPTION_HEIGHT, 8 * 32, 3)


def test_the_prompt_decides_the_video_and_the_seed_repeats_it(runs):
    a, b, c = slug(A), slug(B), slug(C)
    first = frames(runs["two"] / f"00000_{a}.mp4")
    assert first.std() > 1, "the untrained model must not saturate, or nothing could differ"
    np.testing.assert_array_equal(frames(runs["file"] / f"00000_{a}.mp4"), first)  # same prompt, same seed
    assert np.abs(frames(runs["file"] / f"00001_{c}.mp4").astype(int)  # other prompt, same seed (video 1)
                  - frames(runs["two"] / f"00001_{b}.mp4")).mean() > 1


def test_the_prompt_path_feeds_exactly_its_embedding(runs):
    np.testing.assert_array_equal(frames(runs["emb"] / "video_00000.mp4"), frames(runs["two"] / f"00000_{slug(A)}.mp4"))


def test_guidance_changes_the_video(runs):
    a = slug(A)
    assert np.abs(frames(runs["g1"] / f"00000_{a}.mp4").astype(int) - frames(runs["two"] / f"00000_{a}.mp4")).mean() > 1


def test_precomputed_embeddings_with_prompts_take_one_row_per_prompt(tmp_path):
    save_file({"text": torch.randn(2, 5, 32)}, str(tmp_path / "two.safetensors"))
    cond = conditions("text", 5, 5, seed=0, text_emb=str(tmp_path / "two.safetensors"), prompts=[A, B], text_dim=32)
    assert cond.text.shape == (2, 5, 32) and cond.text_mask.all()
    assert video_rows(cond, [0, 1, 2, 3, 4]) == [0, 1, 0, 1, 0]  # video i: prompt i % 2
    with pytest.raises(UsageError, match=r"^--text-emb: .*two.safetensors holds 2 embeddings for 3 prompts"):
        conditions("text", 5, 5, seed=0, text_emb=str(tmp_path / "two.safetensors"), prompts=[A, B, C])
    save_file({"text": torch.full((5, 32), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UsageError, match=r"^--text-emb: .*nan.safetensors: 'text' holds NaN or infinite values"):
        conditions("text", 5, 5, seed=0, text_emb=str(tmp_path / "nan.safetensors"), text_dim=32)


def test_a_prompt_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Notepad and Excel start UTF-8 files with a BOM: it made the first line's comment a prompt, or joined the
    first prompt (other token ids)."""
    for first in ("# a comment\n", ""):
        (tmp_path / "bom.txt").write_text(f"{first}{A}\n{C}\n", encoding="utf-8-sig")
        assert read_prompts(None, str(tmp_path / "bom.txt")) == [A, C]


BAD_EMB = {  # name: (tensors, what the error says after `--text-emb: FILE`); the model takes 8 tokens of width 32
    "more tokens than model.text_tokens": ({"text": torch.randn(9, 32)}, " holds 9 tokens per embedding but the "
                                           "generator's model.text_tokens is 8; give at most 8"),  # used in full
    "1-D text": ({"text": torch.randn(32)}, ": 'text' is [32]; it must be [tokens, dim] or [n, tokens, dim]"),
    "no tokens": ({"text": torch.randn(0, 32)}, ": 'text' [1, 0, 32] holds no tokens"),  # sampled unconditionally
    "all-False mask": ({"text": torch.randn(2, 4, 32), "mask": torch.tensor([[True] * 4, [False] * 4])},
                       ": 'mask' row 1 is all False, which would sample unconditionally"),  # likewise
}


@pytest.mark.parametrize("name", BAD_EMB)
def test_precomputed_embeddings_the_model_cannot_take_are_refused(tmp_path, name):
    tensors, says = BAD_EMB[name]
    path = str(tmp_path / "emb.safetensors")
    save_file(tensors, path)
    with pytest.raises(UsageError, match="^" + re.escape(f"--text-emb: {path}{says}")):
        conditions("text", 5, 2, seed=0, text_emb=path, text_dim=32, text_tokens=8)
    save_file({"text": torch.randn(8, 32), "mask": torch.arange(8) < 3}, path)  # exactly model.text_tokens: taken
    assert conditions("text", 5, 2, seed=0, text_emb=path, text_dim=32, text_tokens=8).text.shape == (1, 8, 32)


ERRORS = {  # name: (generator, arguments, what the error line says after `hpdm sample: error: `)
    "--prompt, class model": ("class", ("--prompt", A, "--encoder", "{enc}"),
                              "--prompt/--prompt-file: the model is conditioned on 'class', not on text"),
    "--prompt-file, class model": ("class", ("--prompt-file", "{tmp}/prompts.txt"),
                                   "--prompt/--prompt-file: the model is conditioned on 'class', not on text"),
    "no prompt": ("text", (), "--prompt: the model is text-conditioned: give --prompt TEXT (or --prompt-file FILE)"),
    "no encoder": ("text", ("--prompt", A), "--encoder: --prompt needs the text encoder the model was trained with"),
    "missing encoder": ("text", ("--prompt", A, "--encoder", "{tmp}/no_t5"),
                        "--encoder: {tmp}/no_t5 is neither a folder nor a model in the Hugging Face cache"),
    "empty prompt file": ("text", ("--prompt-file", "{tmp}/empty.txt", "--encoder", "{enc}"),
                          "--prompt-file: {tmp}/empty.txt holds no prompts"),
    "missing prompt file": ("text", ("--prompt-file", "{tmp}/none.txt"), "--prompt-file: no such file: {tmp}/none.txt"),
    "width": ("narrow", ("--prompt", A, "--encoder", "{enc}"),
              "--encoder: {enc} gives 32-wide embeddings but model.text_dim is 16"),
    "--text-emb width": ("narrow", ("--text-emb", "{tmp}/a.safetensors"),
                         "--text-emb: {tmp}/a.safetensors holds 32-wide embeddings but the generator's model.text_dim"),
    "--encoder and --text-emb": ("text", ("--prompt", A, "--encoder", "{enc}", "--text-emb", "{tmp}/a.safetensors"),
                                 "--encoder: give --encoder (to encode the prompts) or --text-emb (precomputed)"),
    "empty --prompt": ("text", ("--prompt", " ", "--encoder", "{enc}"), "--prompt: a prompt is empty"),
    "-n below the prompts": ("text", ("--prompt", A, "--prompt", B, "--prompt", C, "-n", "1", "--encoder", "{enc}"),
                             "-n: 1 is fewer than the 3 prompts, so some would get no video; give -n >= 3"),  # dropped
    "--text-emb tokens": ("text", ("--text-emb", "{tmp}/long.safetensors"),  # the generator's model.text_tokens
                          "--text-emb: {tmp}/long.safetensors holds 9 tokens per embedding but the generator's "
                          "model.text_tokens is 8"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_mistakes_are_one_line_naming_the_option(gen, runs, name, capsys):
    which, args, says = ERRORS[name]
    (gen["tmp"] / "empty.txt").write_text("# only a comment\n\n   \n")
    save_file({"text": torch.randn(9, 32)}, str(gen["tmp"] / "long.safetensors"))
    paths = {"tmp": gen["tmp"], "enc": gen["enc"]}
    capsys.readouterr()
    assert main(["sample", gen[which], "--out", str(gen["tmp"] / "bad"), *(a.format(**paths) for a in args)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]  # not progress bars
    assert len(err) == 1 and err[0].startswith(f"hpdm sample: error: {says.format(**paths)}"), err
