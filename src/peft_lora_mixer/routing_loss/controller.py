"""The training side of `LoraMixerModel`: the RSL in `outputs.loss`, routing statistics, forced routing by batch
column, and choosing which parts train.

Kept as a mixin so the tuner's injection code and its training behaviour stay in separate files.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Optional, Union

import torch

from .collector import RouterLossSettings, RoutingCollector, RoutingStep
from ..layer import LoraMixerLayer
from ..routing import as_expert_ids
from .loss import RoutingLoss, preservation_term
from .stats import ModuleRoutingStats

ExpertSelection = Union[bool, Sequence[int]]


class RoutingTrainingMixin:
    """Adds to the tuner: `expert_ids=` in the model's forward, `routing_loss()`, `routing_stats()`,
    `collect_routing_stats()`, `set_trainable(...)` and the adaptive-lambda state.

    The RSL is added to `outputs.loss` only in training mode, with `labels`, for adapters whose
    `add_routing_loss` is on. Router statistics are recorded only then or while statistics are requested, so
    inference pays one attribute check per projection.
    """

    # ---- around the wrapped model's forward ------------------------------------------------------------------
    def _install_training_hooks(self) -> None:
        """Hook the wrapped model's forward (idempotent), so every PEFT wrapper class goes through it.

        The hooks take `expert_ids` out of the keyword arguments (forced routing, as `route_to`, so a plain
        `transformers.Trainer` can run stage 1 from a dataset column) and add the RSL to the loss afterwards.
        """
        self._collector().step = None  # layers added by this injection get attached at the next recorded forward
        if getattr(self, "_training_hook_handles", None):
            return
        self._training_hook_handles = (
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
        )
        self._forced_routing_stack: list = []

    def _remove_training_hooks(self) -> None:
        for handle in getattr(self, "_training_hook_handles", None) or ():
            handle.remove()
        self._training_hook_handles = None

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        expert_ids = kwargs.pop("expert_ids", None)
        forced = self.route_to(expert_ids) if expert_ids is not None else nullcontext()
        forced.__enter__()
        self._forced_routing_stack.append(forced)
        collector = self._collector()
        settings = self._loss_settings() if self.training and kwargs.get("labels") is not None else {}
        record_stats = collector.record_stats and (self.training or not collector.stats_training_only)
        if not settings and not record_stats:
            if collector.step is not None:
                self._attach(None)
            return args, kwargs
        if collector.step is None:
            self._attach(collector)
        collector.step = RoutingStep(
            token_mask=self._token_mask(kwargs.get("attention_mask")),
            settings=settings,
            inject_gradient=bool(settings) and torch.is_grad_enabled(),
            record_stats=record_stats,
        )
        collector.collecting = True
        return args, kwargs

    def _after_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        self._forced_routing_stack.pop().__exit__(None, None, None)
        collector = self._collector()
        if not collector.collecting:
            return outputs
        collector.collecting = False
        if outputs is not None and collector.step.parts and _get_loss(outputs) is not None:
            outputs = self._add_routing_loss(outputs, kwargs["labels"], kwargs.get("num_items_in_batch"))
        return outputs

    def _collector(self) -> RoutingCollector:
        collector = getattr(self, "_routing_collector", None)
        if collector is None:
            collector = self._routing_collector = RoutingCollector()
        return collector

    def _attach(self, collector: Optional[RoutingCollector]) -> None:
        """Point every mixer layer at `collector` (None: detach and forget the last step)."""
        names = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraMixerLayer):
                module.routing_observer = collector
                names[id(module)] = name
        self._collector().module_names = names
        if collector is None:
            self._collector().step = None

    def _loss_settings(self) -> dict[str, RouterLossSettings]:
        return {
            name: RouterLossSettings(config.rsl_balance_weight, self._entropy_weight(name), config.rsl_entropy_sign)
            for name in self.active_adapters
            if (config := self.peft_config[name]).add_routing_loss
        }

    def _token_mask(self, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The padding mask, for decoder-only and SSM models (encoder-decoders: every token counts)."""
        is_encoder_decoder = getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        if attention_mask is None or is_encoder_decoder or attention_mask.dim() != 2:
            return None
        return attention_mask.bool()

    def _add_routing_loss(self, outputs, labels: torch.Tensor, num_items_in_batch):
        collector = self._collector()
        rsl, balance, entropy = collector.loss_value()
        preservation, weighted_preservation = self._preservation_loss()
        scale = self._loss_scale(labels, num_items_in_batch)
        added = collector.probe(rsl, scale) + scale * weighted_preservation
        first = next(iter(collector.step.settings.values()))
        self._last_routing_loss = RoutingLoss(
            total=(rsl + weighted_preservation).detach(),
            balance=balance,
            entropy=entropy,
            preservation=preservation.detach(),
            entropy_weight=torch.as_tensor(first.entropy_weight).detach().clone(),
            scale=torch.as_tensor(scale).detach(),
        )
        self._update_entropy_weights()
        return _set_loss(outputs, _get_loss(outputs) + added)

    def _loss_scale(self, labels: torch.Tensor, num_items_in_batch) -> Union[float, torch.Tensor]:
        """1, or this micro-batch's share of the label tokens when the loss is normalised by their global count.

        The Trainer passes `num_items_in_batch` (label tokens over all micro-batches of the step and all
        processes) and sums the per-micro-batch losses, so weighting each RSL by its share makes the step see the
        token-weighted mean RSL, whatever the accumulation steps and number of processes.
        """
        if num_items_in_batch is None:
            return 1.0
        shifted = not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        counted = labels[..., 1:] if shifted else labels
        return counted.ne(-100).sum() / torch.as_tensor(num_items_in_batch, device=labels.device)

    # ---- adaptive lambda ---------------------------------------------------------------------------------------
    def _entropy_weight(self, adapter_name: str) -> torch.Tensor | float:
        weights = self.routing_loss_state().get("entropy_weights", {})
        return weights.get(adapter_name, self.peft_config[adapter_name].rsl_entropy_weight)

    def _update_entropy_weights(self) -> None:
        """One controller step per training forward for every adapter with `rsl_entropy_target` (on device)."""
        step, weights = self._collector().step, self.routing_loss_state()["entropy_weights"]
        for name, settings in step.settings.items():
            config = self.peft_config[name]
            if config.rsl_entropy_target is None:
                continue
            entropy = torch.stack([e for adapter, _, e in step.parts if adapter == name]).mean()
            weight = torch.as_tensor(settings.entropy_weight, dtype=torch.float32, device=entropy.device)
            delta = config.rsl_entropy_adapt_rate * config.rsl_entropy_sign * (entropy - config.rsl_entropy_target)
            weights[name] = (weight + delta).clamp_min(0.0)

    def routing_loss_state(self) -> dict[str, Any]:
        """The state the RSL carries across steps (the adaptive lambdas), for checkpoints."""
        state = getattr(self, "_routing_loss_state", None)
        if state is None:
            state = self._routing_loss_state = {"entropy_weights": {}}
        return state

    def load_routing_loss_state(self, state: dict[str, Any]) -> None:
        """Restore what `routing_loss_state()` returned (floats or tensors)."""
        weights = {name: torch.tensor(float(value)) for name, value in state.get("entropy_weights", {}).items()}
        unknown = set(weights) - set(self.peft_config)
        if unknown:
            raise ValueError(f"Routing loss state names unknown adapters {sorted(unknown)}.")
        self.routing_loss_state()["entropy_weights"] = weights

    # ---- what the user reads -------------------------------------------------------------------------------------
    def routing_loss(self) -> Optional[RoutingLoss]:
        """The RSL added to `outputs.loss` by the last training forward with labels, with its parts (or None)."""
        return getattr(self, "_last_routing_loss", None)

    @contextmanager
    def collect_routing_stats(self) -> Iterator[None]:
        """Record the routing statistics of every forward inside the block, in eval or training mode."""
        collector = self._collector()
        previous = collector.record_stats, collector.stats_training_only
        self.record_routing_stats(True)
        try:
            yield
        finally:
            collector.record_stats, collector.stats_training_only = previous

    def record_routing_stats(self, enabled: bool, training_only: bool = False) -> None:
        """Switch statistics recording on or off for the forwards to come (the counts are kept);
        `training_only` leaves out forwards in eval mode (e.g. the Trainer's evaluation during training)."""
        collector = self._collector()
        collector.record_stats, collector.stats_training_only = enabled, training_only

    def routing_stats(self, reset: bool = False) -> dict[str, ModuleRoutingStats]:
        """Per-module expert usage and mean entropy over the tokens recorded so far (padding excluded)."""
        stats = self._collector().stats
        summary = stats.summary()
        if reset:
            stats.reset()
        return summary

    # ---- what trains -------------------------------------------------------------------------------------------
    def set_trainable(self, routers: bool, experts: ExpertSelection, adapter_name: Optional[str] = None) -> None:
        """Choose what trains: the routers, the experts (all, none, or the listed expert indices), or both.

        Stage 1 of the joint regime is `set_trainable(routers=False, experts=True)`, stage 2
        `set_trainable(routers=True, experts=False)` (or a list of experts kept trainable). Experts are stored
        concatenated, so a partial list keeps the whole A/B trainable and zeroes the gradient of the other experts'
        rank slots with a hook; with no weight decay on those parameters they then never move. With
        `rsl_preservation_weight > 0`, the trainable experts' current weights become theta(0) of the
        preservation term. Call it before building the optimizer (e.g. the Trainer); `set_adapter` resets it.
        """
        names = [adapter_name] if adapter_name is not None else list(self.active_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter {unknown[0]!r}; adapters: {sorted(self.peft_config)}.")
        selections = {name: _kept_experts(experts, self.peft_config[name].num_experts) for name in names}
        for name, kept in selections.items():
            self._remove_expert_hooks(name)
            anchors = self._preservation_anchors()
            anchors.pop(name, None)
            for module_name, layer in self._named_mixer_layers(name):
                layer.loramixer_router[name].requires_grad_(routers)
                lora_A, lora_B = layer.loramixer_A[name], layer.loramixer_B[name]
                kept_ids = torch.tensor(kept, dtype=torch.long, device=lora_A.device)
                keep = torch.isin(layer.loramixer_slot_expert[name], kept_ids)
                for param in (lora_A, lora_B):
                    param.requires_grad_(bool(kept))
                if kept and not bool(keep.all()):
                    self._expert_hooks().setdefault(name, []).extend(
                        [lora_A.register_hook(_mask_grad(keep, 0)), lora_B.register_hook(_mask_grad(keep, 1))]
                    )
                if kept and self.peft_config[name].rsl_preservation_weight > 0:
                    anchors.setdefault(name, {})[module_name] = (lora_A.detach().clone(), lora_B.detach().clone(), keep)

    def _named_mixer_layers(self, adapter_name: str) -> Iterator[tuple[str, LoraMixerLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraMixerLayer) and adapter_name in module.loramixer_A:
                yield name, module

    def _expert_hooks(self) -> dict[str, list]:
        hooks = getattr(self, "_expert_grad_hooks", None)
        if hooks is None:
            hooks = self._expert_grad_hooks = {}
        return hooks

    def _remove_expert_hooks(self, adapter_name: str) -> None:
        for handle in self._expert_hooks().pop(adapter_name, []):
            handle.remove()

    def _preservation_anchors(self) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        anchors = getattr(self, "_expert_anchors", None)
        if anchors is None:
            anchors = self._expert_anchors = {}
        return anchors

    def _preservation_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum ||theta_e - theta_e(0)||^2, the same weighted by each adapter's beta) over the trainable experts."""
        raw, weighted = [], []
        for name in self._collector().step.settings:
            beta = self.peft_config[name].rsl_preservation_weight
            for module_name, (anchor_A, anchor_B, keep) in self._preservation_anchors().get(name, {}).items():
                layer = self.model.get_submodule(module_name)
                term = preservation_term(layer.loramixer_A[name], anchor_A, keep, 0) + preservation_term(
                    layer.loramixer_B[name], anchor_B, keep, 1
                )
                raw.append(term)
                weighted.append(beta * term)
        if not raw:
            zero = torch.zeros(())
            return zero, zero
        return torch.stack(raw).sum(), torch.stack(weighted).sum()


def _kept_experts(experts: ExpertSelection, num_experts: int) -> list[int]:
    if isinstance(experts, bool):
        return list(range(num_experts)) if experts else []
    return sorted(set(as_expert_ids(experts, num_experts).reshape(-1).tolist()))


def _mask_grad(keep: torch.Tensor, dim: int):
    """A gradient hook zeroing the rank slots (along `dim`) of the experts that must not train."""
    shape = [-1, 1] if dim == 0 else [1, -1]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * keep.view(shape).to(grad.dtype)

    return hook


def _get_loss(outputs) -> Optional[torch.Tensor]:
    if isinstance(outputs, tuple):
        return outputs[0] if outputs and isinstance(outputs[0], torch.Tensor) and outputs[0].dim() == 0 else None
    return getattr(outputs, "loss", None)


def _set_loss(outputs, loss: torch.Tensor):
    if isinstance(outputs, tuple):
        return (loss,) + outputs[1:]
    outputs["loss"] = loss
    return outputs
