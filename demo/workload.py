"""What the demo needs from a model and its domains; `tiny.TinyWorkload` and `smollm2.SmolLM2Workload` provide it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from peft_lora_mixer.routing_loss.stats import ModuleRoutingStats

from .train_eval import heldout_loss

Measurement = tuple[dict[str, float], dict[str, float], dict[str, dict[str, ModuleRoutingStats]]]


class Workload:
    """A base model, its task domains (one expert each), their samples, and how a model is scored on them.

    Subclasses set `metric`, `higher_is_better`, `domains` and `lora_scope` (the modules the LoRAs adapt), and
    implement `prepare` (make the base model available under `base_dir`), `base`,
    `training_samples`, `heldout_samples` and `scores`. Samples are dicts of `input_ids`, `labels`,
    `attention_mask` (all of one length) and `expert_id` (the domain's index).
    """

    metric: str
    higher_is_better: bool
    domains: list[str]
    lora_scope: dict[str, Any] = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}

    def __init__(self, base_dir: Path, size, seed: int, log: Callable[[str], None] = print) -> None:
        self.base_dir, self.size, self.seed, self.log = base_dir, size, seed, log

    def heldout_samples(self, index: int) -> list[dict]:
        raise NotImplementedError

    def scores(self, model: torch.nn.Module, losses: dict[str, float]) -> dict[str, float]:
        """The metric per domain, given the model and its held-out losses."""
        raise NotImplementedError

    def measure(self, model: torch.nn.Module, routing_stats: bool = False) -> Measurement:
        """(metric, held-out loss, routing statistics or {}) per domain, from one pass over the held-out samples.

        `routing_stats` needs a LoRA-Mixer model: its per-module statistics are collected during the same pass.
        """
        losses, stats = {}, {}
        for index, domain in enumerate(self.domains):
            with model.collect_routing_stats() if routing_stats else nullcontext():
                losses[domain] = heldout_loss(model, self.heldout_samples(index), self.size.batch_size)
            if routing_stats:
                stats[domain] = model.routing_stats(reset=True)
        return self.scores(model, losses), losses, stats

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return self.measure(model)[0]
