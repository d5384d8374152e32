"""Tiny models built from configs for every architecture the mixer targets by default (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

VOCAB = 128
_ATTN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# model_type -> config overrides that keep each model a few hundred thousand parameters
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_ATTN),
    "mistral": dict(_ATTN),
    "qwen2": dict(_ATTN),
    "qwen3": dict(_ATTN, head_dim=8),
    "gemma": dict(_ATTN, head_dim=8),
    "gemma2": dict(_ATTN, head_dim=8),
    "gemma3_text": dict(_ATTN, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(_ATTN, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=0),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "bart": dict(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    ),
    "mamba": dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
    "mamba2": dict(
        hidden_size=32,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        num_heads=8,
        head_dim=8,
        n_groups=1,
        chunk_size=16,
    ),
    "falcon_mamba": dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
    "jamba": dict(
        _ATTN,
        num_hidden_layers=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=2,
        num_experts_per_tok=1,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),
    "bamba": dict(
        _ATTN,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_head=8,
        mamba_n_groups=1,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
    ),
    "zamba2": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_head_dim=16,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_headdim=8,
        mamba_ngroups=1,
        n_mamba_heads=8,
        chunk_size=16,
        layers_block_type=["mamba", "hybrid"],
        hybrid_layer_ids=[1],
        num_mem_blocks=1,
        intermediate_size=64,
        use_mem_rope=False,
    ),
}
SEQ2SEQ = {"t5", "bart"}


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny model of the given type, in eval mode."""
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **TINY_CONFIGS[model_type])
    auto = AutoModelForSeq2SeqLM if model_type in SEQ2SEQ else AutoModelForCausalLM
    torch.manual_seed(seed)
    return auto.from_config(config, dtype=dtype).eval()
