"""Pieces for `transformers.Trainer`: a collator for stage 1's expert column, a logging callback, and a mixin that
adds the RSL to whatever loss a trainer computes.

Stage 1 (forced routing from a per-sample column) needs `TrainingArguments(remove_unused_columns=False)`, so the
column reaches the collator, and `ExpertIdsCollator`, which turns it into the `expert_ids` keyword the model's
forward accepts. Stage 2 with a plain `Trainer` needs nothing special: the RSL is added to `outputs.loss` by the
model itself. A trainer whose loss is not `outputs.loss` (`label_smoothing_factor`, `compute_loss_func`, trl's
`SFTTrainer`) needs `RoutingLossMixin`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from transformers import TrainerCallback, default_data_collator
from transformers.trainer_callback import ExportableState

from ..routing import as_expert_ids
from ..routing_loss.stats import summarize


class ExpertIdsCollator:
    """Collate with `base_collator`, after moving each sample's `column` (its domain / expert id) to `expert_ids`."""

    def __init__(
        self, base_collator: Callable[[list[dict]], dict] = default_data_collator, column: str = "expert_id"
    ) -> None:
        self.base_collator = base_collator
        self.column = column

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        missing = [index for index, feature in enumerate(features) if self.column not in feature]
        if missing:
            raise KeyError(
                f"Samples {missing} have no {self.column!r} column. Keep it with "
                "`TrainingArguments(remove_unused_columns=False)` and name it in `ExpertIdsCollator(column=...)`."
            )
        expert_ids = as_expert_ids([feature[self.column] for feature in features])
        batch = self.base_collator([{k: v for k, v in feature.items() if k != self.column} for feature in features])
        batch["expert_ids"] = expert_ids
        return batch


def find_mixer(model: torch.nn.Module):
    """The `LoraMixerModel` inside a PeftModel (or the model itself), or None."""
    from ..model import LoraMixerModel

    return next((module for module in model.modules() if isinstance(module, LoraMixerModel)), None)


class RoutingLossMixin:
    """Adds the RSL to the loss of any `transformers.Trainer` subclass, whatever computes the task loss.

    Put it first: `class MyTrainer(RoutingLossMixin, SFTTrainer): pass`. Inside `compute_loss` the model leaves
    `outputs.loss` alone, and the RSL of the training forward is added to the loss the trainer returns, weighted
    as the model weights it in `outputs.loss`: by the micro-batch's share of the label tokens when the trainer
    normalises by `num_items_in_batch` (times the number of processes when that count spans them, as the
    trainer does with its own loss), else 1.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mixer = find_mixer(model)
        if mixer is None or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.get("labels")  # the trainer may pop them
        with mixer.routing_controller.rsl_added_by_caller():
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        scale = mixer.routing_controller.loss_scale(labels, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            scale = scale * self.accelerator.num_processes
        loss = loss + mixer.routing_controller.routing_loss_term(scale).to(loss.device)
        return (loss, outputs) if return_outputs else loss


class RoutingCallback(TrainerCallback, ExportableState):
    """Log the RSL parts and the routing statistics with the training loss, and checkpoint the adaptive lambda.

    Logged keys: `rsl/total`, `rsl/balance`, `rsl/entropy`, `rsl/preservation`, `rsl/entropy_weight` (means over
    the optimizer steps since the last log, each step contributing its last micro-batch), `routing/entropy` and
    `routing/balance` (see `stats.summarize`) over every training token since the last log (this process only;
    evaluation forwards are left out).
    The lambdas go to `trainer_state.json` with each checkpoint and come back on resume. Callbacks run after the
    Trainer's reporting integrations, so these keys reach `trainer.state.log_history` and the callbacks after it.
    """

    def __init__(self, record_stats: bool = True) -> None:
        self.record_stats = record_stats
        self._mixer = None
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._state: dict[str, Any] = {}

    def state(self) -> dict[str, Any]:
        if self._mixer is not None:
            weights = self._mixer.routing_loss_state()["entropy_weights"]
            self._state = {"entropy_weights": {name: float(value) for name, value in weights.items()}}
        return {"args": {"record_stats": self.record_stats}, "attributes": {"_state": self._state}}

    def on_train_begin(self, args, state, control, model: Optional[torch.nn.Module] = None, **kwargs):
        self._mixer = find_mixer(model)
        if self._mixer is None:
            raise ValueError("RoutingCallback needs a model with a LoRA-Mixer adapter.")
        saved = state.stateful_callbacks.get(type(self).__name__)
        saved = saved.get("attributes", {}).get("_state") if isinstance(saved, dict) else None
        if saved:  # resuming: the checkpoint's lambdas (a fresh run keeps the model's current ones)
            self._mixer.load_routing_loss_state(saved)
        self._mixer.record_routing_stats(self.record_stats, training_only=True)
        self._mixer.routing_stats(reset=True)

    def on_step_end(self, args, state, control, **kwargs):
        loss = self._mixer.routing_loss() if self._mixer is not None else None
        if loss is None:
            return
        for key, value in loss.as_tensors().items():
            self._sums[key] = self._sums.get(key, 0.0) + value.float()
        self._steps += 1

    def on_log(self, args, state, control, logs: Optional[dict] = None, **kwargs):
        if self._mixer is None or logs is None or "loss" not in logs:
            return
        extra = {key: (value / self._steps).item() for key, value in self._sums.items()} if self._steps else {}
        extra.update(summarize(self._mixer.routing_stats(reset=True)))
        self._sums, self._steps = {}, 0
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self._mixer is not None:
            self._mixer.record_routing_stats(False)
