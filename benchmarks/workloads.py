"""The models and batch shapes the benchmark runs on, all built from configs (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


@dataclass(frozen=True)
class Workload:
    """A model config plus the shapes of one training batch and of one generation call."""

    name: str
    model_type: str
    config: dict
    target_modules: tuple[str, ...]
    lora_target_modules: tuple[str, ...]  # for PEFT LoRA and X-LoRA, which refuse Mamba's out_proj
    batch: int
    seq_len: int
    prompt_len: int
    new_tokens: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    notes: str = field(default="", compare=False)

    def build(self, seed: int = 0) -> PreTrainedModel:
        """The base model, randomly initialised (the same weights for every row of a run)."""
        return model_from_config(self.model_type, self.config, seed, self.dtype).to(self.device)

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]


def model_from_config(model_type: str, config: dict, seed: int, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM built from a config and randomly initialised from `seed`: the same weights on every call, nothing
    downloaded. The benchmarks' models and the demo's tiny Llama are built here."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=dtype)


_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

WORKLOADS: dict[str, Workload] = {
    "llama-cpu": Workload(
        name="llama-cpu",
        model_type="llama",
        config=dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=4096,
            max_position_embeddings=1024,
        ),
        target_modules=_QKVO,
        lora_target_modules=_QKVO,
        batch=4,
        seq_len=256,
        prompt_len=192,
        new_tokens=64,
    ),
    "mamba-cpu": Workload(
        name="mamba-cpu",
        model_type="mamba",
        config=dict(hidden_size=512, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4, vocab_size=4096),
        target_modules=("in_proj", "out_proj"),
        lora_target_modules=("in_proj",),
        batch=4,
        seq_len=256,
        prompt_len=192,
        new_tokens=64,
    ),
    # TinyLlama-like shapes (~1.1B parameters), bf16 weights
    "llama-1b-gpu": Workload(
        name="llama-1b-gpu",
        model_type="llama",
        config=dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        target_modules=_QKVO,
        lora_target_modules=_QKVO,
        batch=8,
        seq_len=1024,
        prompt_len=256,
        new_tokens=128,
        device="cuda",
        dtype=torch.bfloat16,
    ),
}


def miniature(workload: Workload) -> Workload:
    """`workload` shrunk to seconds on CPU, its code paths kept (its dtype, grouped-query attention, and 128 tokens
    per batch: the selected-experts path at E=64): what runs of a GPU workload on a machine without one."""
    config = dict(
        workload.config,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return replace(workload, device="cpu", config=config, batch=2, seq_len=128, prompt_len=8, new_tokens=2)


def default_workloads() -> list[str]:
    """The GPU workload when CUDA is present, else the two CPU workloads."""
    return ["llama-1b-gpu"] if torch.cuda.is_available() else ["llama-cpu", "mamba-cpu"]
