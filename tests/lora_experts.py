"""Helpers for tests with existing LoRA adapters as experts: build them with PEFT, snapshot models."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model
from torch import nn


def save_lora(folder: str, seed: int, base: nn.Module | None = None, **lora_kwargs) -> str:
    """Save a randomly initialised (non-zero) PEFT LoRA on a tiny llama (or `base`) into `folder`."""
    base = base if base is not None else tiny_model("llama")
    torch.manual_seed(seed)  # after building the base, which seeds its own initialisation
    get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs)).save_pretrained(folder)
    return str(folder)


def save_pickle_lora(folder: str, seed: int = 0) -> str:
    """A LoRA saved as PEFT's pickle checkpoint (adapter_model.bin) only, as old adapters are."""
    base = tiny_model("llama")
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder, safe_serialization=False)
    return str(folder)


def snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    """The module types and a copy of the state dict, to check later that nothing changed."""
    types = {name: type(module) for name, module in model.named_modules()}
    return types, {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[dict[str, type], dict[str, torch.Tensor]]) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[key], before[1][key]) for key in state)
