"""`RoutingLossController`: the training side of a `LoraMixerModel`, owned by the tuner.

How the RSL reaches the routers. Every training forward with autograd on (and an adapter with `add_routing_loss`)
computes, for each router, its RSL term as an ordinary differentiable scalar of the router's probabilities, whose
backward is the closed-form gradient times whatever reached the term; the model's RSL is their mean (plus the
preservation term). When the model computes `outputs.loss` (it was given `labels`), the RSL is added to it;
whether or not it was, `model.routing_loss_term()` returns it for a loss computed elsewhere (label smoothing, a
custom loss function, trl's SFTTrainer, a loop computing cross-entropy from the logits), and `RoutingLossMixin`
adds it in any `Trainer`. From there plain autograd carries it to the routers, so it cannot fail when the
backpropagated loss is not `outputs.loss`, and non-reentrant gradient checkpointing needs nothing more. Reentrant
checkpointing runs the forward without autograd: a checkpointed router's term is then a constant, and when its
block is recomputed in backward an identity node on its probabilities adds the term's gradient scaled by what
reached the RSL (recorded first: the RSL's node was created after the whole model). If the RSL never reaches
backward while the routers do, the routers get their gradient without it and a warning says so, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch.utils.hooks import RemovableHandle

from ..layer import iter_mixer_layers
from ..routing import as_expert_ids
from .collector import RoutingCollector, RoutingStep, TokenMasks
from .loss import RouterLossSettings, RoutingLoss, preservation_term, update_entropy_weight
from .stats import ModuleRoutingStats

if TYPE_CHECKING:
    from ..model import LoraMixerModel

ExpertSelection = Union[bool, Sequence[int]]
# (A at theta(0), B at theta(0), which rank slots belong to trainable experts), per adapter and module name
Anchors = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class RoutingLossController:
    """The RSL, the routing statistics, forced routing by batch column, and which parts of an adapter train.

    A plain object (never an `nn.Module`), so PEFT saves nothing of it; it holds the tuner to read its configs,
    active adapters and wrapped model.
    """

    def __init__(self, tuner: LoraMixerModel) -> None:
        self.tuner = tuner
        self.collector = RoutingCollector()
        self.entropy_weights: dict[str, torch.Tensor] = {}  # the adaptive lambdas, per adapter
        self.anchors: Anchors = {}
        self.expert_grad_hooks: dict[str, list[RemovableHandle]] = {}
        self.trainable_experts: dict[str, list[int]] = {}  # as `set_trainable` last chose, per adapter
        self.forward_hooks: tuple[RemovableHandle, ...] = ()
        self.forced_routing: list[Any] = []  # the `route_to` contexts of the forwards under way
        self.last_loss: Optional[RoutingLoss] = None
        self.pending_term: Optional[torch.Tensor] = None  # the last training forward's RSL, for `routing_loss_term`
        self.adds_to_outputs = True  # False while `RoutingLossMixin` adds the RSL itself

    # ---- around the wrapped model's forward ------------------------------------------------------------------
    def install(self) -> None:
        """Hook the wrapped model's forward (once), so every PEFT wrapper class goes through it.

        The hooks take `expert_ids` out of the keyword arguments (forced routing, as `route_to`, so a plain
        `transformers.Trainer` can run stage 1 from a dataset column) and build the RSL afterwards.
        """
        self.collector.step = None  # layers added by this injection get attached at the next recorded forward
        if not self.forward_hooks:
            model = self.tuner.model
            self.forward_hooks = (
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
            )

    def remove(self) -> None:
        for handle in self.forward_hooks:
            handle.remove()
        self.forward_hooks = ()
        for adapter_name in list(self.expert_grad_hooks):
            self._remove_expert_hooks(adapter_name)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        expert_ids = kwargs.pop("expert_ids", None)
        forced = self.tuner.route_to(expert_ids) if expert_ids is not None else nullcontext()
        forced.__enter__()
        self.forced_routing.append(forced)
        collector, training = self.collector, self.tuner.training
        settings = self._loss_settings() if training and torch.is_grad_enabled() else {}
        record_stats = collector.record_stats and (training or not collector.stats_training_only)
        if not settings and not record_stats:
            if collector.step is not None:
                self._attach(None)
            return args, kwargs
        if collector.step is None:
            self._attach(collector)
        collector.step = RoutingStep(
            masks=self._token_masks(kwargs), settings=settings, builds_loss=bool(settings), record_stats=record_stats
        )
        collector.collecting = True
        return args, kwargs

    def _after_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        self.forced_routing.pop().__exit__(None, None, None)
        if not self.collector.collecting:
            return outputs
        rsl = self.collector.finish_forward()
        if rsl is None:
            return outputs
        loss = _get_loss(outputs) if outputs is not None and self.adds_to_outputs else None
        scale = 1.0 if loss is None else self.loss_scale(kwargs.get("labels"), kwargs.get("num_items_in_batch"))
        term = self._record_loss(rsl, scale)
        return outputs if loss is None else _set_loss(outputs, loss + scale * term)

    def _record_loss(self, rsl: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
        """The model's RSL as a loss term (kept for `routing_loss_term`), its parts for `routing_loss()` (`scale`:
        the weight it gets in `outputs.loss`), and one step of the adaptive lambdas."""
        step = self.collector.step
        preservation, weighted_preservation = self._preservation_loss(step)
        term = self.collector.probe(rsl + weighted_preservation.to(rsl.device))
        parts = [parts for _, parts in step.parts]
        first = next(iter(step.settings.values()))
        self.last_loss = RoutingLoss(
            total=term.detach(),
            balance=torch.stack([p.balance for p in parts]).mean(),
            entropy=torch.stack([p.entropy for p in parts]).mean(),
            preservation=preservation.detach(),
            entropy_weight=torch.as_tensor(first.entropy_weight).detach().clone(),
            scale=torch.as_tensor(scale).detach(),
        )
        self.pending_term = term
        self._update_entropy_weights(step)
        return term

    def _attach(self, collector: Optional[RoutingCollector]) -> None:
        """Point every mixer layer at `collector` (None: detach and forget the last step)."""
        names = {}
        for name, layer in iter_mixer_layers(self.tuner.model):
            layer.routing_observer = collector
            names[id(layer)] = name
        self.collector.module_names = names
        if collector is None:
            self.collector.step = None

    def _loss_settings(self) -> dict[str, RouterLossSettings]:
        return {
            name: RouterLossSettings(
                config.rsl_balance_weight,
                self._entropy_weight(name),
                config.rsl_entropy_sign,
                global_balance=config.rsl_balance_scope == "global_batch",
            )
            for name in self.tuner.active_adapters
            if (config := self.tuner.peft_config[name]).add_routing_loss
        }

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.tuner.model, "config", None), "is_encoder_decoder", False))

    def _token_masks(self, kwargs: dict[str, Any]) -> TokenMasks:
        """The padding masks: the 2-D `attention_mask`; for encoder-decoders it is the encoder's, and the decoder's
        is `decoder_attention_mask`, else the labelled positions (labels != -100), else every token."""
        attention_mask = kwargs.get("attention_mask")
        mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        if not self._is_encoder_decoder():
            return TokenMasks(decoder=mask)
        decoder_mask, labels = kwargs.get("decoder_attention_mask"), kwargs.get("labels")
        if decoder_mask is None and labels is not None and kwargs.get("decoder_input_ids") is None:
            decoder_mask = labels.ne(-100)  # the decoder's inputs are the labels shifted right: one per label
        if decoder_mask is not None and decoder_mask.dim() == 2:
            decoder_mask = decoder_mask.bool()
        else:
            decoder_mask = None
        return TokenMasks(decoder=decoder_mask, encoder=mask)

    def loss_scale(self, labels: Optional[torch.Tensor], num_items_in_batch) -> Union[float, torch.Tensor]:
        """1, or this micro-batch's share of the label tokens when the loss is normalised by their global count.

        The Trainer passes `num_items_in_batch` (label tokens over all micro-batches of the step and all
        processes) and sums the per-micro-batch losses, so weighting each RSL by its share makes the step see the
        token-weighted mean RSL, whatever the accumulation steps and number of processes.
        """
        if num_items_in_batch is None or labels is None:
            return 1.0
        counted = labels if self._is_encoder_decoder() else labels[..., 1:]
        return counted.ne(-100).sum() / torch.as_tensor(num_items_in_batch, device=labels.device)

    @contextmanager
    def rsl_added_by_caller(self) -> Iterator[None]:
        """Inside the block the model leaves `outputs.loss` without the RSL: the caller adds `routing_loss_term()`."""
        previous, self.adds_to_outputs = self.adds_to_outputs, False
        try:
            yield
        finally:
            self.adds_to_outputs = previous

    def routing_loss_term(self, scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        """`scale` times the last training forward's RSL, a differentiable scalar, once (then a zero until the next
        forward); `routing_loss().scale` records `scale`."""
        term, self.pending_term = self.pending_term, None
        if term is None:
            return torch.zeros((), device=next(self.tuner.model.parameters()).device)
        self.last_loss = dataclasses.replace(self.last_loss, scale=torch.as_tensor(scale).detach())
        return scale * term

    # ---- adaptive lambda ---------------------------------------------------------------------------------------
    def _entropy_weight(self, adapter_name: str) -> Union[torch.Tensor, float]:
        return self.entropy_weights.get(adapter_name, self.tuner.peft_config[adapter_name].rsl_entropy_weight)

    def _update_entropy_weights(self, step: RoutingStep) -> None:
        """One controller step per training forward for every adapter with `rsl_entropy_target` (on device)."""
        for name, settings in step.settings.items():
            config = self.tuner.peft_config[name]
            if config.rsl_entropy_target is None:
                continue
            entropy = torch.stack([parts.entropy for adapter, parts in step.parts if adapter == name]).mean()
            weight = torch.as_tensor(settings.entropy_weight, dtype=torch.float32, device=entropy.device)
            self.entropy_weights[name] = update_entropy_weight(
                weight, entropy, config.rsl_entropy_target, config.rsl_entropy_adapt_rate, config.rsl_entropy_sign
            )

    def state(self) -> dict[str, Any]:
        return {"entropy_weights": self.entropy_weights}

    def load_state(self, state: dict[str, Any]) -> None:
        weights = {name: torch.tensor(float(value)) for name, value in state.get("entropy_weights", {}).items()}
        unknown = set(weights) - set(self.tuner.peft_config)
        if unknown:
            raise ValueError(f"Routing loss state names unknown adapters {sorted(unknown)}.")
        self.entropy_weights = weights

    # ---- statistics --------------------------------------------------------------------------------------------
    def record_stats(self, enabled: bool, training_only: bool = False) -> None:
        self.collector.record_stats, self.collector.stats_training_only = enabled, training_only

    @contextmanager
    def collect_stats(self) -> Iterator[None]:
        previous = self.collector.record_stats, self.collector.stats_training_only
        self.record_stats(True)
        try:
            yield
        finally:
            self.record_stats(*previous)

    def stats(self, reset: bool = False) -> dict[str, ModuleRoutingStats]:
        summary = self.collector.stats.summary()
        if reset:
            self.collector.stats.reset()
        return summary

    # ---- what trains -------------------------------------------------------------------------------------------
    def set_trainable(self, routers: bool, experts: ExpertSelection, adapter_name: Optional[str] = None) -> None:
        """See `LoraMixerModel.set_trainable`."""
        names = [adapter_name] if adapter_name is not None else list(self.tuner.active_adapters)
        unknown = [name for name in names if name not in self.tuner.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter {unknown[0]!r}; adapters: {sorted(self.tuner.peft_config)}.")
        selections = {name: _kept_experts(experts, self.tuner.peft_config[name].num_experts) for name in names}
        for name, kept in selections.items():
            self._remove_expert_hooks(name)
            self.anchors.pop(name, None)
            self.trainable_experts[name] = kept
            for _, layer in iter_mixer_layers(self.tuner.model, name):
                layer.loramixer_router[name].requires_grad_(routers)
                lora_A, lora_B = layer.loramixer_A[name], layer.loramixer_B[name]
                kept_ids = torch.tensor(kept, dtype=torch.long, device=lora_A.device)
                keep = torch.isin(layer.loramixer_slot_expert[name], kept_ids)
                for param in (lora_A, lora_B):
                    param.requires_grad_(bool(kept))
                if kept and not bool(keep.all()):
                    self.expert_grad_hooks.setdefault(name, []).extend(
                        [lora_A.register_hook(_mask_grad(keep, 0)), lora_B.register_hook(_mask_grad(keep, 1))]
                    )
            if kept and self.tuner.peft_config[name].rsl_preservation_weight > 0:
                self._record_anchors(name)

    def forget(self, adapter_name: str) -> None:
        """Drop everything kept for a deleted adapter."""
        self._remove_expert_hooks(adapter_name)
        for per_adapter in (self.entropy_weights, self.anchors, self.trainable_experts):
            per_adapter.pop(adapter_name, None)

    def _remove_expert_hooks(self, adapter_name: str) -> None:
        for handle in self.expert_grad_hooks.pop(adapter_name, []):
            handle.remove()

    def _record_anchors(self, adapter_name: str) -> None:
        """theta(0) of the preservation term: the current weights of the experts that train (the rank slots whose
        gradient is not masked, of parameters that require it)."""
        anchors = self.anchors[adapter_name] = {}
        kept = self.trainable_experts.get(adapter_name)
        for module_name, layer in iter_mixer_layers(self.tuner.model, adapter_name):
            lora_A, lora_B = layer.loramixer_A[adapter_name], layer.loramixer_B[adapter_name]
            if not lora_A.requires_grad:
                continue
            slot_expert = layer.loramixer_slot_expert[adapter_name]
            keep = torch.ones_like(slot_expert, dtype=torch.bool)
            if kept is not None:
                keep = torch.isin(slot_expert, torch.tensor(kept, dtype=torch.long, device=slot_expert.device))
            anchors[module_name] = (lora_A.detach().clone(), lora_B.detach().clone(), keep)

    def _preservation_loss(self, step: RoutingStep) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum ||theta_e - theta_e(0)||^2, the same weighted by each adapter's beta) over the trainable experts.

        theta(0) is recorded by `set_trainable`, or else by the first training forward that uses the term.
        """
        raw, weighted = [], []
        for name in step.settings:
            beta = self.tuner.peft_config[name].rsl_preservation_weight
            if beta <= 0:
                continue
            if name not in self.anchors:
                self._record_anchors(name)
            for module_name, (anchor_A, anchor_B, keep) in self.anchors[name].items():
                layer = self.tuner.model.get_submodule(module_name)
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
