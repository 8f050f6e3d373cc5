"""Frozen text encoders for text-to-video: any Hugging Face encoder (T5, UMT5, MT5, or an ``AutoModel`` with an
encoder), from a local folder or a model name already in the Hugging Face cache. hpdm never downloads one:
fetch it first (``huggingface-cli download google/t5-v1_1-xxl``).

Captions become ``[N, max_tokens, width]`` embeddings (padding zeroed) and a ``[N, max_tokens]`` mask, so every
batch has the same shape whatever its captions.
"""
from __future__ import annotations

import os

import torch

from hpdm.errors import UserError

# T5-style models whose encoder loads without the decoder (T5-11B's decoder alone is 6B parameters).
ENCODER_ONLY = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel"}


class TextEncoderError(UserError):
    """An encoder that cannot be loaded or does not fit the model."""


class TextEncoder:
    """A frozen encoder and its tokenizer. ``option`` names where ``source`` came from, for error messages;
    given ``text_dim`` (the model's width), a mismatch is refused before the weights load."""

    def __init__(self, source: str, max_tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, option: str = "--encoder", text_dim: int | None = None):
        try:
            import transformers  # noqa: PLC0415 (slow to import; only text-conditioned runs need it)
        except ImportError as e:
            raise TextEncoderError(f"{option}: needs the transformers package ({e}): pip install 'hpdm[text]'") from None

        device = torch.device(device)
        self.source, self.max_tokens, self.device = source, max_tokens, device
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        path = os.path.expanduser(source)
        if os.path.exists(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise TextEncoderError(f"{option}: {source} is not a Hugging Face model folder (no config.json)")
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            self.width = int(getattr(config, "d_model", None) or config.hidden_size)
            if text_dim is not None and self.width != text_dim:
                raise TextEncoderError(f"{option}: {source} gives {self.width}-wide embeddings but model.text_dim is "
                                       f"{text_dim}")
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            cls = getattr(transformers, ENCODER_ONLY.get(config.model_type, "AutoModel"))
            model = cls.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError) as e:
            if not os.path.exists(path):
                raise TextEncoderError(f"{option}: {source} is neither a folder nor a model in the Hugging Face cache "
                                       f"(hpdm never downloads one: run `huggingface-cli download {source}` first)") from None
            raise TextEncoderError(f"{option}: cannot load a text encoder from {source}: {str(e).splitlines()[0]}") from None
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model.to(device).eval().requires_grad_(False)
        self.name = getattr(config, "_name_or_path", "") or source

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
