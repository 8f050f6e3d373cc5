"""Loading a frozen text encoder: folders that would run code, unpickle, tokenize everything to <unk> or do not
load are refused in one line naming the folder; CLIP's text tower and tokenizers without a pad token work; the
encoder's digest identifies its files cheaply."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import hpdm.cli
from hpdm.text_encoder import TextEncoder, TextEncoderError, encoder_digest


def broken(tiny_t5, folder):
    """Ways to break a copy of the tiny T5 folder: name -> (make it so, what the error says after the folder)."""
    def no_tokenizer():
        for f in folder.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                f.unlink()

    def empty_vocabulary():
        from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
        from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

        tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)

    def remote_code():
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "modeling.Model"}}))

    def pickle():
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()

    def vision():  # a tiny ViT: it took the tokens as if they were pixels (a traceback; doctor said ok)
        (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "image_size": 16,
                                                        "patch_size": 8, "num_hidden_layers": 1}))

    def truncated():
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])

    return {"no tokenizer": (no_tokenizer, " has no tokenizer (none of tokenizer.json, spiece.model"),
            "empty vocabulary": (empty_vocabulary, "'s tokenizer knows almost no words (a plain caption becomes <unk>"),
            "remote code": (remote_code, " needs its own Python code (auto_map in config.json), which hpdm never runs"),
            "pickle": (pickle, "/pytorch_model.bin is a pickle, which cannot be loaded safely; convert the weights to "
                               "safetensors"),
            "truncated": (truncated, " cannot be loaded as a text encoder: Error while deserializing header"),
            "vision model": (vision, " is a vit model, which reads no text (it has no vocabulary)")}


@pytest.mark.parametrize("name", ["no tokenizer", "empty vocabulary", "remote code", "pickle", "truncated",
                                  "vision model"])
def test_unusable_encoder_folders_are_refused_in_one_line(tiny_t5, tiny_shards, tmp_path, name, capsys):
    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5, folder)
    make, says = broken(tiny_t5, folder)[name]
    make()
    with pytest.raises(TextEncoderError, match="^" + re.escape(f"data.text_encoder: {folder}{says}")):
        TextEncoder(str(folder), 8, option="data.text_encoder")
    assert hpdm.cli.main(["embed-text", tiny_shards["one"], "--encoder", str(folder), "--out",
                          str(tmp_path / "emb")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]
    assert err == [ln for ln in err if ln.startswith(f"hpdm embed-text: error: --encoder: {folder}{says}")] != []


def test_a_missing_path_is_not_looked_up_as_a_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for source in ("./my-t5", "models/my-t5", str(tmp_path / "a" / "b")):
        with pytest.raises(TextEncoderError) as err:
            TextEncoder(source, 8)
        assert str(err.value).endswith(f"there is no folder {tmp_path / source}") and "download" not in str(err.value)


def test_clip_text_tower_and_a_tokenizer_without_pad_token(tiny_t5, tmp_path):
    from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2Model, PreTrainedTokenizerFast  # noqa: PLC0415

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=small | {"vocab_size": 30, "max_position_embeddings": 16}, projection_dim=16,
                         vision_config=small | {"image_size": 32, "patch_size": 16})).save_pretrained(tmp_path / "clip")
    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=30)).save_pretrained(tmp_path / "gpt2")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_t5 / "tokenizer.json"), eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(tmp_path / "gpt2")  # no pad token: padded with </s>, masked out
    PreTrainedTokenizerFast.from_pretrained(tiny_t5).save_pretrained(tmp_path / "clip")
    for name in ("clip", "gpt2"):
        enc = TextEncoder(str(tmp_path / name), 8)
        emb, mask = enc.encode(["a red square moving left", "blue"])
        assert enc.width == 32 and emb.shape == (2, 8, 32) and mask.sum(1).tolist() == [6, 2]
        assert emb[1, 2:].abs().sum() == 0 and emb[1, :2].abs().sum() > 0
    with pytest.raises(TextEncoderError, match=f"--encoder: {tmp_path}/clip reads at most 16 tokens, fewer than the "
                                               "20 asked"):
        TextEncoder(str(tmp_path / "clip"), 20)


def test_encoder_digest_reads_only_the_ends_of_large_files(tiny_t5, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_t5, copy)
    (copy / "README.md").write_text("notes")
    assert encoder_digest(str(copy)) == encoder_digest(str(tiny_t5)) == TextEncoder(str(copy), 8).digest
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert encoder_digest(str(copy)) != encoder_digest(str(tiny_t5))
    big = tmp_path / "big"
    big.mkdir()
    data = bytearray(3 << 20)
    (big / "model.safetensors").write_bytes(data)
    first = encoder_digest(str(big))
    data[(3 << 20) // 2] = 1  # the middle MiB is not read
    (big / "model.safetensors").write_bytes(data)
    assert encoder_digest(str(big)) == first
    data[-1] = 1
    (big / "model.safetensors").write_bytes(data)
    assert encoder_digest(str(big)) != first
