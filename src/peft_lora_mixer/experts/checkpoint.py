"""What a mixer of existing experts writes to and reads from its checkpoint.

With pinned Hub experts the checkpoint holds the routers only: the experts' weights are dropped when saving, and
when loading they are the ones fetched at the pinned commits while the adapter was built (read again if the layers
were created empty, on the meta device, by `low_cpu_mem_usage=True`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import LoraMixerConfig
from ..layer import iter_mixer_layers
from .loading import PEFT_MODEL_PREFIX, read_experts


def is_expert_weight(key: str, adapter_name: str) -> bool:
    return key.endswith((f".loramixer_A.{adapter_name}", f".loramixer_B.{adapter_name}"))


def without_expert_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str
) -> dict[str, torch.Tensor]:
    """`state_dict` minus the experts; refused when they are trainable, since what they learned would be lost."""
    parameters = model.named_parameters()
    trainable = [name for name, p in parameters if p.requires_grad and is_expert_weight(name, adapter_name)]
    if trainable:
        raise ValueError(
            f"The experts of adapter {adapter_name!r} are trainable ({trainable[0]!r}, ...), but the checkpoint would "
            "hold only the routers and the original experts' references, losing what the experts learned. Set "
            "`save_expert_weights=True` in its config (or freeze the experts) before saving."
        )
    return {key: value for key, value in state_dict.items() if not is_expert_weight(key, adapter_name)}


def pinned_expert_weights(model: nn.Module, config: LoraMixerConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """The experts' weights to load alongside a router-only checkpoint, keyed as in `model.state_dict()`."""
    current = {key: value for key, value in model.state_dict().items() if is_expert_weight(key, adapter_name)}
    if not any(value.is_meta for value in current.values()):
        return current
    experts = read_experts(config)  # from the cache the adapter was just built from
    weights = {}
    for key, module in iter_mixer_layers(model, adapter_name):
        device = module.get_base_layer().weight.device
        factors = experts.factors(key.removeprefix(PEFT_MODEL_PREFIX))
        for name, value in zip(("loramixer_A", "loramixer_B"), factors):
            state_key = f"{key}.{name}.{adapter_name}"
            weights[state_key] = value.to(device=device, dtype=current[state_key].dtype)
    return weights


def warn_about_absent_modules(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Warn, naming them, about the checkpoint's modules that `model` lacks (e.g. a base with fewer layers): their
    weights would otherwise be dropped without a word."""
    present = model.state_dict().keys()
    absent = sorted(
        {
            key.removeprefix(PEFT_MODEL_PREFIX).rsplit(".loramixer_", 1)[0]
            for key in state_dict
            if ".loramixer_" in key and key not in present and key.removeprefix(PEFT_MODEL_PREFIX) not in present
        }
    )
    if absent:
        warnings.warn(
            f"The checkpoint of adapter {adapter_name!r} holds weights for {len(absent)} module(s) this model does not "
            f"have, which are not loaded: {', '.join(absent)}. The adapter was probably trained on another base "
            "model (e.g. one with more layers); load it into that model.",
            stacklevel=2,
        )
