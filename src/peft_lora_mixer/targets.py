"""Default projections adapted by LoRA-Mixer, by `model_type`.

Attention projections (q/k/v/o, or the fused qkv) for decoders and encoder-decoders, the SSM input and output
projections for Mamba models, and both for hybrids. Every name was checked against the real module names of a
model built from its transformers config (see tests/test_architectures.py).
"""

from __future__ import annotations

_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
_SSM = ["in_proj", "out_proj"]

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{name: _QKVO for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],  # Conv1D; the MLP's c_proj is left alone
    "gpt_neox": ["query_key_value", "attention.dense"],
    "falcon": ["query_key_value", "self_attention.dense"],
    "t5": ["q", "k", "v", "o"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj"],
    **{name: _SSM for name in ("mamba", "mamba2", "falcon_mamba")},
    **{name: _QKVO + _SSM for name in ("jamba", "bamba", "zamba2")},
}
