"""Prompts for ``hpdm sample``: read them (``--prompt``, ``--prompt-file``), encode them with the frozen text encoder
(``--encoder``), name the videos after them and caption the PNG grid with them."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from hpdm.errors import UsageError

CAPTION_HEIGHT = 16  # pixels of the caption strip above each row of the grid
SLUG_CHARS = 60
ENCODE_BATCH = 32  # captions per encoder call: a prompt file of thousands must not hold all activations at once


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """The ``--prompt`` values, then the lines of ``--prompt-file`` (UTF-8, with or without the byte-order mark that
    Notepad and Excel write; blank lines and ``#`` comments skipped)."""
    out = [p.strip() for p in prompts or []]
    if any(not p for p in out):
        raise UsageError("--prompt: a prompt is empty")
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise UsageError(f"--prompt-file: no such file: {prompt_file}")
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file: {prompt_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        found = [ln for ln in lines if ln and not ln.startswith("#")]
        if not found:
            raise UsageError(f"--prompt-file: {prompt_file} holds no prompts (one per line; blank lines and lines "
                             "starting with # are skipped)")
        out += found
    return out


def slug(prompt: str) -> str:
    """File-name form of a prompt: lower case, runs of non-alphanumerics as one '-', at most ~60 characters."""
    s = re.sub(r"[\W_]+", "-", prompt.lower()).strip("-")
    return s[:SLUG_CHARS].rstrip("-") or "prompt"


def video_name(i: int, prompt: str | None) -> str:
    """``{i:05d}_{slug}.mp4`` for a prompt, else today's ``video_{i:05d}.mp4``."""
    return f"video_{i:05d}.mp4" if prompt is None else f"{i:05d}_{slug(prompt)}.mp4"


def encode_prompts(prompts: list[str], source: str, max_tokens: int, text_dim: int,
                   device: torch.device, trained_with: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts through the frozen encoder (bf16 on CUDA, else fp32): fp32 embeddings [P, max_tokens, text_dim]
    and the bool mask [P, max_tokens], on the CPU. The encoder is freed before sampling starts. ``trained_with``:
    the generator's recorded encoder ({"encoder", "digest"}); another one is refused."""
    from hpdm.text_encoder import TextEncoder, encoder_change  # noqa: PLC0415 (imports transformers)

    enc = TextEncoder(source, max_tokens, device, option="--encoder", text_dim=text_dim)
    if encoder_change(trained_with, {"encoder": source, "digest": enc.digest}):
        raise UsageError(f"--encoder: {source} (digest {enc.digest}) is not the encoder the generator was trained "
                         f"with, {trained_with['encoder']} (digest {trained_with['digest']}): give that one")
    parts = [enc.encode(prompts[i:i + ENCODE_BATCH]) for i in range(0, len(prompts), ENCODE_BATCH)]
    text = torch.cat([e for e, _ in parts]).float().cpu()
    mask = torch.cat([m for _, m in parts]).cpu()
    del enc, parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return text, mask


def caption_strip(text: str, width: int, height: int = CAPTION_HEIGHT) -> np.ndarray:
    """uint8 [height, width, 3]: ``text`` in white on black with Pillow's default font, cut with '...' to fit."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    font = ImageFont.load_default()
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap fallback font knows Latin-1 only
        text = text.encode("latin-1", "replace").decode("latin-1")
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    room = width - 4
    if draw.textlength(text, font=font) > room:
        text = text[:room]  # no glyph is narrower than a pixel
        while text and draw.textlength(text + "...", font=font) > room:
            text = text[:-1]
        text = text.rstrip() + "..."
    draw.text((2, 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)
