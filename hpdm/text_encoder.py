"""Frozen text encoders for text-to-video: any Hugging Face encoder (T5, UMT5, MT5, the text tower of CLIP or
SigLIP, or an ``AutoModel`` with an encoder), from a local folder or a model name already in the Hugging Face
cache. hpdm never downloads one (fetch it first: ``hf download google/t5-v1_1-xxl``) and never runs
a model's own code: a folder that needs it (``auto_map``), pickle weights, or no tokenizer is refused up front.

Captions become ``[N, max_tokens, width]`` embeddings (padding zeroed) and a ``[N, max_tokens]`` mask, so every
batch has the same shape whatever its captions. A tokenizer without a pad token pads with its end-of-sequence
token (the mask marks padding either way). ``encoder_digest`` (also ``TextEncoder.digest``) identifies the
model by its files, so embeddings of two models kept at one path are never taken for one set.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from hpdm.errors import UserError

# T5-style models whose encoder loads without the decoder (T5-11B's decoder alone is 6B parameters), and the text
# towers of text-image models (their config's text_config).
ENCODER_ONLY = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel",
                "clip": "CLIPTextModel", "siglip": "SiglipTextModel"}
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.json",
                   "vocab.txt")
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PROBE = "a red square moving left over a blue background"  # a tokenizer must know most of these words
MIB = 1 << 20
SAFE = {"local_files_only": True, "trust_remote_code": False}  # never download, never run a folder's code


class TextEncoderError(UserError):
    """An encoder that cannot be loaded or does not fit the model."""


def encoder_digest(path: str) -> str:
    """A cheap identity of the model folder ``path``: sha256 (16 hex digits) over each file's name, size and
    bytes (the first and last MiB only of files over 2 MiB: weights are never read whole). Hidden files and
    ``*.md`` are left out."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or name.lower().endswith(".md") or not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        with open(full, "rb") as f:
            h.update(f.read(MIB if size > 2 * MIB else -1))
            if size > 2 * MIB:
                f.seek(size - MIB)
                h.update(f.read())
    return h.hexdigest()[:16]


def _folder(source: str, option: str) -> str:
    """The local folder of ``source``: itself, or its snapshot in the Hugging Face cache (never downloaded)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    missing = f"{option}: {source} is neither a folder nor a model in the Hugging Face cache"
    if os.path.exists(path):
        raise TextEncoderError(f"{option}: {source} is a file, not a Hugging Face model folder")
    parent = os.path.dirname(path)
    if path.startswith((".", os.sep)) or path.count("/") > 1 or (parent and os.path.isdir(parent)):
        raise TextEncoderError(f"{missing}: there is no folder {os.path.abspath(path)}")  # a path: not a model name
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        return snapshot_download(source, local_files_only=True)
    except (OSError, ValueError):
        raise TextEncoderError(f"{missing} (hpdm never downloads one: run `hf download {source}` "
                               "first)") from None


def _check_files(folder: str, source: str, option: str) -> None:
    """Refuse, before transformers sees it, a folder that would run its own code, unpickle or lack a tokenizer."""
    files = os.listdir(folder)
    if "config.json" not in files:
        raise TextEncoderError(f"{option}: {source} is not a Hugging Face model folder (no config.json)")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"{option}: {source}/config.json cannot be read ({e})") from None
    if isinstance(config, dict) and "auto_map" in config:
        raise TextEncoderError(f"{option}: {source} needs its own Python code (auto_map in config.json), which hpdm "
                               "never runs; use a model that transformers supports without it")
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(PICKLES))
        raise TextEncoderError(
            f"{option}: {source}/{pickles[0]} is a pickle, which cannot be loaded safely; convert the weights to "
            "safetensors (model.safetensors)" if pickles else f"{option}: {source} has no weights (*.safetensors)")
    if not any(f in TOKENIZER_FILES for f in files):
        raise TextEncoderError(f"{option}: {source} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy "
                               "the model's tokenizer files into it")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def encoder_config(source: str, option: str = "--encoder"):
    """(folder, config, text config, width) of encoder ``source``, refused as loading it would be, without reading
    its weights (`hpdm doctor` checks ``data.text_encoder`` with it)."""
    import transformers  # noqa: PLC0415 (slow to import; only text-conditioned runs need it)

    folder = _folder(source, option)
    _check_files(folder, source, option)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **SAFE)
    except (OSError, ValueError, KeyError) as e:
        raise TextEncoderError(f"{option}: {source} cannot be loaded as a text encoder: {_first_line(e)}") from None
    text_config = config.text_config if config.model_type in ENCODER_ONLY and hasattr(config, "text_config") else config
    width = getattr(text_config, "d_model", None) or getattr(text_config, "hidden_size", None)
    if width and not getattr(text_config, "vocab_size", None):  # a vision or audio model: it failed deep in its call
        raise TextEncoderError(f"{option}: {source} is a {config.model_type} model, which reads no text (it has no "
                               "vocabulary); give a text encoder (T5, UMT5, MT5, CLIP or SigLIP text towers)")
    if not width:
        raise TextEncoderError(f"{option}: {source} is a {config.model_type} model, which has no text encoder hpdm "
                               "knows (T5, UMT5, MT5, CLIP or SigLIP text towers, or a model with hidden_size)")
    return folder, config, text_config, int(width)


def text_identity(cfg) -> dict | None:
    """Which encoder a text model's run trains on, {"encoder", "digest"}: ``data.text_encoder`` (its folder's
    digest), else the one recorded in the embeddings' index (digest None when they were made without one); None
    for a model that is not text-conditioned. Recorded in checkpoints and exports, checked on resume and sampling."""
    if cfg.model.cond != "text":
        return None
    if cfg.data.text_encoder:
        return {"encoder": cfg.data.text_encoder,
                "digest": encoder_digest(encoder_config(cfg.data.text_encoder, "data.text_encoder")[0])}
    from data_pipeline.loader import text_location  # noqa: PLC0415
    from data_pipeline.storage import Storage  # noqa: PLC0415
    from data_pipeline.text_shards import read_text_index  # noqa: PLC0415

    index = read_text_index(Storage(cfg.data.endpoint_url), text_location(cfg.data))
    return {"encoder": index["encoder"], "digest": index.get("digest")}


def encoder_change(recorded: dict | None, now: dict | None) -> str | None:
    """``text encoder: A (digest a) -> B (digest b)`` when both digests are known and differ, else None."""
    if not (recorded and now and recorded.get("digest") and now.get("digest")) or recorded["digest"] == now["digest"]:
        return None
    return (f"text encoder: {recorded['encoder']} (digest {recorded['digest']}) -> {now['encoder']} (digest "
            f"{now['digest']})")


class TextEncoder:
    """A frozen encoder and its tokenizer. ``option`` names where ``source`` came from, for error messages;
    given ``text_dim`` (the model's width), a mismatch is refused before the weights load. ``digest``:
    :func:`encoder_digest` of its folder."""

    def __init__(self, source: str, max_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, option: str = "--encoder", text_dim: int | None = None):
        try:
            import transformers  # noqa: PLC0415 (slow to import; only text-conditioned runs need it)
            from safetensors import SafetensorError  # noqa: PLC0415
        except ImportError as e:
            raise TextEncoderError(f"{option}: needs the transformers package ({e}): pip install 'hpdm[text]'") from None

        device = torch.device(device)
        self.source, self.max_tokens, self.device = source, max_tokens, device
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        folder, config, text_config, self.width = encoder_config(source, option)
        self.digest = encoder_digest(folder)
        try:
            if text_dim is not None and self.width != text_dim:
                raise TextEncoderError(f"{option}: {source} gives {self.width}-wide embeddings but model.text_dim is "
                                       f"{text_dim}")
            limit = getattr(text_config, "max_position_embeddings", None)
            if limit and max_tokens > limit:
                raise TextEncoderError(f"{option}: {source} reads at most {limit} tokens, fewer than the {max_tokens} "
                                       "asked (--max-tokens or model.text_tokens)")
            self.tokenizer = self._tokenizer(transformers, folder, source, option)
            cls = getattr(transformers, ENCODER_ONLY.get(config.model_type, "AutoModel"))
            model = cls.from_pretrained(folder, dtype=self.dtype, use_safetensors=True, **SAFE)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            raise TextEncoderError(f"{option}: {source} cannot be loaded as a text encoder: {_first_line(e)}") from None
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model.to(device).eval().requires_grad_(False)
        self.name = source

    @staticmethod
    def _tokenizer(transformers, folder: str, source: str, option: str):
        """The folder's tokenizer, padding with its end-of-sequence token when it has no pad token; refused when it
        turns most words of a plain caption into unknown tokens (an empty or wrong vocabulary)."""
        tok = transformers.AutoTokenizer.from_pretrained(folder, **SAFE)
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise TextEncoderError(f"{option}: {source}'s tokenizer has neither a pad nor an end-of-sequence token")
            tok.pad_token = tok.eos_token
        ids = tok(PROBE, add_special_tokens=False)["input_ids"]
        if not ids or (tok.unk_token_id is not None and 2 * ids.count(tok.unk_token_id) > len(ids)):
            raise TextEncoderError(f"{option}: {source}'s tokenizer knows almost no words (a plain caption becomes "
                                   f"{tok.unk_token or 'unknown'} tokens); give the folder the model's own tokenizer")
        return tok

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (embeddings [N, max_tokens, width] in ``self.dtype``, mask [N, max_tokens] bool), on the
        encoder's device. Longer captions are cut at ``max_tokens`` tokens."""
        tok = self.tokenizer(list(captions), padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        mask = mask.bool()
        return emb.masked_fill(~mask[..., None], 0), mask
