"""A small randomly initialised T5 encoder and a word-level tokenizer, saved like a Hugging Face model folder,
so that text-to-video tests run without downloading anything."""
from __future__ import annotations

from pathlib import Path

WORDS = ("a an the red green blue yellow purple orange square circle triangle moving left right up down "
         "shape over background").split()


def save_tiny_t5(folder: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """Write config, weights and tokenizer of a 2-layer T5 encoder of width ``d_model`` to ``folder``."""
    import torch  # noqa: PLC0415
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel  # noqa: PLC0415

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=fast.vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                    num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    folder = Path(folder)
    fast.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
