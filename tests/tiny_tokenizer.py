"""A word-level tokenizer built offline for the tiny models: words `w0` ... `w124` plus `<pad>`, `<eos>`, `<unk>`."""

from __future__ import annotations

from tiny_models import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<eos>", "<unk>"]


def word(index: int) -> str:
    """The word of token `len(SPECIAL) + index`."""
    return f"w{index}"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words mapped to the ids of the tiny models' vocabulary (no download, no merges)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + [word(i) for i in range(VOCAB - len(SPECIAL))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
