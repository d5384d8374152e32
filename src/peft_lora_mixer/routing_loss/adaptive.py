"""The adaptive entropy weights: with `rsl_entropy_target` set, lambda moves toward the target entropy each step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch

from .collector import RoutingStep
from .loss import update_entropy_weight


class AdaptiveEntropyWeights:
    """The lambdas of the adapters with `rsl_entropy_target`, one Lagrange-multiplier step per training forward.

    A plain object the tuner owns (PEFT saves none of it); `state()` goes into the Trainer's checkpoints through
    `RoutingCallback`. `configs` maps adapter names to their `LoraMixerConfig`.
    """

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def current(self, adapter_name: str, configs: Mapping[str, Any]) -> Union[torch.Tensor, float]:
        """lambda for the next forward: the adapted value, or the config's fixed one."""
        return self.weights.get(adapter_name, configs[adapter_name].rsl_entropy_weight)

    def update(self, step: RoutingStep, configs: Mapping[str, Any]) -> None:
        """One controller step for every adapter of `step` that has a target (on the device: no synchronisation)."""
        for name, settings in step.settings.items():
            config = configs[name]
            if config.rsl_entropy_target is None or not config.add_routing_loss:  # the label loss alone has no lambda
                continue
            entropies = [part.entropy for part in step.parts if part.adapter_name == name]
            if not entropies:
                continue
            entropy = torch.stack(entropies).mean()
            weight = torch.as_tensor(settings.entropy_weight, dtype=torch.float32, device=entropy.device)
            self.weights[name] = update_entropy_weight(
                weight, entropy, config.rsl_entropy_target, config.rsl_entropy_adapt_rate, config.rsl_entropy_sign
            )

    def state(self) -> dict[str, Any]:
        return {"entropy_weights": self.weights}

    def load_state(self, state: dict[str, Any], known_adapters: Iterable[str]) -> None:
        weights = {name: torch.tensor(float(value)) for name, value in state.get("entropy_weights", {}).items()}
        unknown = set(weights) - set(known_adapters)
        if unknown:
            raise ValueError(f"Routing loss state names unknown adapters {sorted(unknown)}.")
        self.weights = weights

    def forget(self, adapter_name: str) -> None:
        self.weights.pop(adapter_name, None)
