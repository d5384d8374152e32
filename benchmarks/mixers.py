"""LoRA-Mixer over existing LoRAs, built one way wherever it is measured (the demo, BIG-bench): as a user builds it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel, default_data_collator

from peft_lora_mixer import best_expert_labels, from_experts

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


def with_best_expert_labels(
    model: PeftModel, samples: list[dict], collate: Callable = default_data_collator, batch_size: int = 8
) -> tuple[list[dict], int]:
    """`samples` with each `expert_id` (its task's expert, the router label) replaced by the sample's best expert
    (`best_expert_labels`), and how many samples kept their task's expert."""
    inputs = [{key: sample[key] for key in ("input_ids", "attention_mask", "labels")} for sample in samples]
    found = best_expert_labels(model, inputs, collate, batch_size)
    kept = sum(label == sample["expert_id"] for label, sample in zip(found, samples))
    return [{**sample, "expert_id": label} for sample, label in zip(samples, found)], kept
