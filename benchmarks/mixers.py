"""LoRA-Mixer over existing LoRAs, built one way wherever it is measured (the demo, BIG-bench): as a user builds it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel

from peft_lora_mixer import from_experts

# the RSL weights of every "RSL" row of the demo and BIG-bench (ten times the config's defaults)
RSL_WEIGHTS = {"rsl_balance_weight": 0.1, "rsl_entropy_weight": 0.1}


def plug_and_play(
    base: PreTrainedModel, expert_dirs: Sequence[Path], top_k: int, rsl: bool, router_init: str, **config: Any
) -> PeftModel:
    """The frozen experts with new routers (`from_experts`), trained with the RSL at `RSL_WEIGHTS` or without it;
    `config`: further `LoraMixerConfig` fields (a study's variant)."""
    weights = RSL_WEIGHTS if rsl else {"add_routing_loss": False}
    experts = [str(folder) for folder in expert_dirs]
    return from_experts(base, experts, top_k=top_k, router_init=router_init, **weights, **config)
