"""A tiny Llama written as a GGUF file with the `gguf` package, as llama.cpp's converter writes one (no download)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tiny_models import VOCAB, tiny_model
from transformers import PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

# llama.cpp's tensor names for a Llama layer's weights
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def byte_level_vocabulary() -> tuple[list[str], list[str]]:
    """`VOCAB` byte-level BPE tokens (end-of-text, space and printable ASCII, ' a' ... ' z', a few pairs) and their
    merges: enough to tokenize lower-case words."""
    spell = bytes_to_unicode()
    space = spell[ord(" ")]
    pairs = [(space, letter) for letter in string.ascii_lowercase]
    pairs += [(a, b) for a, b in zip(string.ascii_lowercase, string.ascii_lowercase[1:])]
    tokens = ["<|endoftext|>", *(spell[byte] for byte in range(32, 127))]
    pairs = pairs[: VOCAB - len(tokens)]
    return tokens + ["".join(pair) for pair in pairs], [" ".join(pair) for pair in pairs]


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k (rotary halves interleaved), which transformers undoes when it reads the file."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(path: Path) -> PreTrainedModel:
    """Write `tiny_model("llama")` and a byte-level tokenizer to `path` (float32 tensors); return the model."""
    import gguf

    model = tiny_model("llama")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(VOCAB)
    tokens, merges = byte_level_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))
    writer.add_token_merges(merges)
    writer.add_eos_token_id(0)
    writer.add_bos_token_id(0)
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    for layer in range(config.num_hidden_layers):
        for name, gguf_name in _LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{name}.weight"]
            if name == "self_attn.q_proj":
                weight = _permute(weight, config.num_attention_heads)
            elif name == "self_attn.k_proj":
                weight = _permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
