"""Pieces for `transformers.Trainer`: a collator for stage 1's expert column and a logging callback.

Stage 1 (forced routing from a per-sample column) needs `TrainingArguments(remove_unused_columns=False)`, so the
column reaches the collator, and `ExpertIdsCollator`, which turns it into the `expert_ids` keyword the model's
forward accepts. Stage 2 needs nothing special in any trainer: the RSL's gradient reaches the routers through
their probabilities, whatever loss the trainer computes (`label_smoothing_factor`, `compute_loss_func`, TRL's
`SFTTrainer` included).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from transformers import TrainerCallback, default_data_collator
from transformers.trainer_callback import ExportableState

from ..routing import as_expert_ids
from ..routing_loss.stats import summarize
from .collapse import DOMINANT_SHARE, MIN_TOKENS, RoutingCollapseWarning, collapse_message, find_collapses


class ExpertIdsCollator:
    """Collate with `base_collator`, after moving each sample's `column` (its domain / expert id) to `key`.

    `key="expert_ids"` (stage 1): every token of the sample is routed to that expert. `key="router_labels"` (router
    training with `router_label_weight`): the routers are taught that expert; a sample whose column is None or -100
    has no label.
    """

    KEYS = ("expert_ids", "router_labels")

    def __init__(
        self,
        base_collator: Callable[[list[dict]], dict] = default_data_collator,
        column: str = "expert_id",
        key: str = "expert_ids",
    ) -> None:
        if key not in self.KEYS:
            raise ValueError(f"`key` must be one of {self.KEYS}, got {key!r}.")
        self.base_collator = base_collator
        self.column = column
        self.key = key

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        missing = [index for index, feature in enumerate(features) if self.column not in feature]
        if missing:
            raise KeyError(
                f"Samples {missing} have no {self.column!r} column. Keep it with "
                "`TrainingArguments(remove_unused_columns=False)` and name it in `ExpertIdsCollator(column=...)`."
            )
        values = [feature[self.column] for feature in features]
        if self.key == "router_labels":
            labelled = [value for value in values if value is not None and value != -100]
            as_expert_ids(labelled)  # whole numbers >= 0, checked before the batch is built
            ids = torch.tensor([-100 if value is None else int(value) for value in values], dtype=torch.long)
        else:
            ids = as_expert_ids(values)
        batch = self.base_collator([{k: v for k, v in feature.items() if k != self.column} for feature in features])
        batch[self.key] = ids
        return batch


def find_mixer(model: torch.nn.Module):
    """The `LoraMixerModel` inside a PeftModel (or the model itself), or None."""
    from ..model import LoraMixerModel

    return next((module for module in model.modules() if isinstance(module, LoraMixerModel)), None)


class RoutingLossMixin:
    """Deprecated, and a no-op: any trainer now trains the routers with the RSL. Remove it from your trainer's
    bases."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        warnings.warn(
            f"{cls.__name__}: `RoutingLossMixin` is no longer needed and does nothing: the RSL reaches the routers "
            "whatever loss the trainer computes. Remove it from the class's bases.",
            FutureWarning,
            stacklevel=2,
        )


class RoutingCallback(TrainerCallback, ExportableState):
    """Log the RSL parts and the routing statistics with the training loss, checkpoint the adaptive lambda, and
    tell the model the gradient accumulation steps (the RSL's weight in a forward not given `num_items_in_batch`,
    as in TRL's default loss: see `routing_loss.batch.loss_scale`).

    Logged keys: `rsl/total`, `rsl/balance`, `rsl/entropy`, `rsl/label`, `rsl/preservation`, `rsl/entropy_weight` (means over
    the optimizer steps since the last log, each step contributing its last micro-batch), `routing/entropy` and
    `routing/balance` (see `stats.summarize`) and `routing/collapsed_modules` over every training token since the
    last log (this process only; evaluation forwards are left out).
    Collapse: at each log and at the end of training, a module whose top-1 choice is one expert for at least
    `collapse_share` of its tokens, or with an expert in no token's top-k, over at least `collapse_min_tokens`
    tokens, counts as collapsed (`integrations.collapse`); the first time any does, a `RoutingCollapseWarning`
    names them and says what to try. Needs `record_stats`.
    The lambdas go to `trainer_state.json` with each checkpoint and come back on resume. Callbacks run after the
    Trainer's reporting integrations, so these keys reach `trainer.state.log_history` and the callbacks after it.
    """

    def __init__(
        self, record_stats: bool = True, collapse_share: float = DOMINANT_SHARE, collapse_min_tokens: int = MIN_TOKENS
    ) -> None:
        self.record_stats = record_stats
        self.collapse_share = collapse_share
        self.collapse_min_tokens = collapse_min_tokens
        self._warned = False
        self._mixer = None
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._state: dict[str, Any] = {}

    def state(self) -> dict[str, Any]:
        if self._mixer is not None:
            weights = self._mixer.routing_loss_state()["entropy_weights"]
            self._state = {"entropy_weights": {name: float(value) for name, value in weights.items()}}
        args = {
            "record_stats": self.record_stats,
            "collapse_share": self.collapse_share,
            "collapse_min_tokens": self.collapse_min_tokens,
        }
        return {"args": args, "attributes": {"_state": self._state}}

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
        self._mixer.routing_loss_accumulation_steps = args.gradient_accumulation_steps

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
        extra.update(self._routing_figures())
        self._sums, self._steps = {}, 0
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def _routing_figures(self) -> dict[str, float]:
        """The statistics since the last call, summarised, with the count of collapsed modules (warned once)."""
        stats = self._mixer.routing_stats(reset=True)
        if not stats:
            return {}
        copies = self._mixer.peft_config[self._mixer.active_adapters[0]].copies_per_expert
        collapses = find_collapses(stats, self.collapse_share, self.collapse_min_tokens, copies)
        if collapses and not self._warned:
            warnings.warn(collapse_message(collapses, len(stats)), RoutingCollapseWarning, stacklevel=2)
            self._warned = True
        return {**summarize(stats), "routing/collapsed_modules": len(collapses)}

    def on_train_end(self, args, state, control, **kwargs):
        if self._mixer is not None:
            self._routing_figures()  # the steps after the last log (a run shorter than `logging_steps` has no log)
            self._mixer.record_routing_stats(False)
            self._mixer.routing_loss_accumulation_steps = 1
