"""`LoraMixerModel`: the PEFT tuner that injects LoRA-Mixer layers and exposes forced routing."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils import _get_submodules
from torch import nn

from .config import LoraMixerConfig
from .experts.checkpoint import pinned_expert_weights, warn_about_absent_modules, without_expert_weights
from .experts.loading import ExpertSet, load_experts
from .experts.router_init import initial_router_weights, set_router_weights
from .layer import MERGE_ERROR, ExpertSpec, LoraMixerLayer, in_out_features, iter_mixer_layers
from .mamba import check_supported_ssm_target, guard_fused_mixer, needs_guard, unguard_fused_mixers
from .model_card import keep_card_on_push
from .quantization import check_supported_quantization
from .routing import RouterSettings, as_expert_ids
from .routing_loss.adaptive import AdaptiveEntropyWeights
from .routing_loss.batch import loss_scale, token_masks
from .routing_loss.collector import GateRecord, RoutingCollector, RoutingStep
from .routing_loss.loss import RouterLossSettings, RoutingLoss
from .routing_loss.stats import ModuleRoutingStats
from .targets import DEFAULT_TARGET_MODULES
from .trainable import ExpertSelection, TrainableParts
from .zero3 import check_not_partitioned, register_partitioned_weights


class LoraMixerModel(BaseTuner):
    """Replaces each targeted projection by a `LoraMixerLayer`; everything else is PEFT's own machinery.

    Use through `peft.get_peft_model(model, LoraMixerConfig(...))`. Besides the usual PEFT methods it offers
    `route_to(expert_ids)`, the forced routing of stage-1 expert training, and the training API (routing loss,
    routing statistics, `set_trainable`). Hooks on the wrapped model's forward (so every PEFT wrapper class goes
    through them) take `expert_ids` out of the keyword arguments (forced routing, so a plain Trainer can run stage 1
    from a dataset column) and watch the routers while the RSL or statistics are wanted: the collector attaches the
    RSL's gradient to the routers (routing_loss/collector.py), the entropy weights adapt after each training
    forward, and `trainable` holds what `set_trainable` chose.
    """

    prefix = "loramixer_"
    tuner_layer_cls = LoraMixerLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    _experts: Optional[ExpertSet] = None  # the experts of the adapter being injected, for their ranks and scalings

    def __init__(self, model: nn.Module, config, adapter_name: str, **kwargs) -> None:
        # plain objects, set before BaseTuner injects (the hooks go on at each injection); PEFT saves none of them
        self.routing_collector = RoutingCollector()
        self.router_settings: dict[str, RouterSettings] = {}  # every layer's routing table (`LoraMixerLayer`)
        self.entropy_weights = AdaptiveEntropyWeights()
        self.trainable = TrainableParts()
        self.last_routing_loss: Optional[RoutingLoss] = None
        # micro-batches per optimizer step, for the RSL's weight when the forward is not given `num_items_in_batch`
        self.routing_loss_accumulation_steps = 1
        self._mixer_forward_hooks: tuple[Any, ...] = ()
        # per forward under way, the layers whose forced routing its `expert_ids` set, with what they had before
        self._forced_routing: list[Optional[list[tuple[LoraMixerLayer, Optional[torch.Tensor]]]]] = []
        self._mixer_layer_list: Optional[list[LoraMixerLayer]] = None
        self._zero3_registered = False  # the layers' weights are DeepSpeed ZeRO-3 external parameters (zero3.py)
        super().__init__(model, config, adapter_name, **kwargs)

    def _prepare_adapter_config(self, peft_config: LoraMixerConfig, model_config: dict) -> LoraMixerConfig:
        if peft_config.target_modules is None and model_config.get("model_type") not in self.target_module_mapping:
            raise ValueError(
                f"LoRA-Mixer has no default target modules for model_type {model_config.get('model_type')!r}. "
                "Pass `target_modules`, e.g. the names of the attention projections (['q_proj', 'v_proj', ...]) "
                f"or 'all-linear'. Types with defaults: {', '.join(sorted(self.target_module_mapping))}."
            )
        return super()._prepare_adapter_config(peft_config, model_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        check_supported_quantization(model)
        config = self.peft_config[adapter_name]
        experts = load_experts(config, model)  # fetched and checked before the model is touched
        router_weights = None
        if experts is None:
            self._check_targets(model, config)
        else:
            targets = set(experts.module_names) if config.target_modules is None else config.target_modules
            checked = copy.copy(config)
            checked.target_modules = targets
            matched = self._check_targets(model, checked)
            experts.check_covers(matched)
            if not config.resolved_experts:  # a new mixer, not a saved one
                router_weights = initial_router_weights(config.router_init, model, experts, matched)
            config.target_modules, config.resolved_experts = targets, experts.references()
        self._experts = experts
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        finally:
            self._experts = None
        if experts is not None:  # layers created empty (low_cpu_mem_usage) get the weights on load: see checkpoint
            experts.load_into(model, adapter_name, frozen=not config.trainable_experts)
        if router_weights is not None:
            set_router_weights(model, adapter_name, router_weights)
        self._install_forward_hooks()

    def _check_targets(self, model: nn.Module, peft_config: LoraMixerConfig) -> list[str]:
        """Raise on any matched module that cannot be adapted, so injection never stops half-way.

        Returns the names of the modules the config matches.
        """
        config = self._prepare_adapter_config(copy.deepcopy(peft_config), self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        matched = []
        for key, module in model.named_modules():
            match = check_target_module_exists(config, key) if key else None
            if not match or isinstance(match, _ExcludedModule):
                continue
            matched.append(key)
            if isinstance(module, LoraMixerLayer):
                continue
            if isinstance(module, BaseTunerLayer):
                raise ValueError(
                    f"{key!r} already holds an adapter of another PEFT method ({type(module).__name__}); "
                    "LoRA-Mixer cannot wrap it. Unload or merge that adapter first."
                )
            try:
                in_out_features(module)
            except TypeError as error:
                raise TypeError(f"Cannot adapt {key!r}: {error}") from None
            parent, _, target_name = _get_submodules(model, key)
            check_supported_ssm_target(parent, target_name, key)
        return matched

    def _create_and_replace(
        self,
        peft_config: LoraMixerConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if self._experts is None:
            experts = [ExpertSpec(peft_config.r, peft_config.expert_scaling)] * peft_config.num_experts
        else:
            experts = self._experts.specs(current_key)
        layer_kwargs = dict(
            routing=peft_config.routing,
            top_k=peft_config.top_k,
            router_temperature=peft_config.router_temperature,
            lora_dropout=peft_config.lora_dropout,
            init_weights=peft_config.init_weights,
        )
        if isinstance(target, LoraMixerLayer):
            target.update_layer(adapter_name, experts, **layer_kwargs)
        else:
            new_module = LoraMixerLayer(target, adapter_name, experts, self.router_settings, **layer_kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        if needs_guard(parent, target_name):
            guard_fused_mixer(parent)

    @contextmanager
    def route_to(self, expert_ids: Union[int, Sequence[int], torch.Tensor]) -> Iterator[None]:
        """Send every token of sample b to expert `expert_ids[b]` (an int: all samples to that expert).

        This is the forced routing of stage-1 training: each expert learns its own domain, the routers are
        bypassed (and get no gradient).
        """
        previous = self._force_routing(expert_ids)
        try:
            yield
        finally:
            _restore_routing(previous)

    def _force_routing(
        self, expert_ids: Union[int, Sequence[int], torch.Tensor]
    ) -> list[tuple[LoraMixerLayer, Optional[torch.Tensor]]]:
        """Set `expert_ids` (checked) on every mixer layer; returns each layer with the ids it had before."""
        num_experts = min(self.peft_config[name].num_experts for name in self.active_adapters)
        ids = as_expert_ids(expert_ids, num_experts)
        if ids.dim() > 1 or ids.numel() == 0:
            raise ValueError(
                f"route_to() takes one expert id per sample (or one int for all), got {ids.tolist()} of shape "
                f"{tuple(ids.shape)}."
            )
        previous = [(layer, layer.forced_expert_ids) for layer in self._mixer_layers()]
        for layer, _ in previous:
            layer.forced_expert_ids = ids
        return previous

    # ---- around the wrapped model's forward ------------------------------------------------------------------
    def _install_forward_hooks(self) -> None:
        """Hook the wrapped model's forward (once); layers added by this injection are watched from the next one."""
        self._observe_layers(None)
        self._mixer_layer_list = None
        self._zero3_registered = False
        if not self._mixer_forward_hooks:
            self._mixer_forward_hooks = (
                self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                self.model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
            )

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # ZeRO-3 gives every module it manages a `ds_id`: one attribute check per forward for everyone else
        if not self._zero3_registered and hasattr(self.model, "ds_id"):
            self._zero3_registered = register_partitioned_weights(layer for _, layer in iter_mixer_layers(self.model))
        expert_ids = kwargs.pop("expert_ids", None)
        router_labels = kwargs.pop("router_labels", None)
        # plain calls, no context manager: `torch.compile(fullgraph=True)` traces this hook with the forward
        self._forced_routing.append(self._force_routing(expert_ids) if expert_ids is not None else None)
        collector, step = self.routing_collector, self._routing_step(kwargs, router_labels)
        if not self.training:  # a reentrant-checkpointed forward not backpropagated before evaluation never will be
            collector.awaiting_recomputation.clear()
        # kept on while checkpointed routers wait for their recomputation (a no-grad forward may come first)
        self._observe_layers(collector if step is not None or collector.awaiting_recomputation else None)
        if step is not None:
            collector.begin(step)
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        forced = self._forced_routing.pop()
        if forced is not None:
            _restore_routing(forced)
        step = self.routing_collector.finish()
        if step is not None:
            self.last_routing_loss = step.routing_loss()
            self.entropy_weights.update(step, self.peft_config)
        return outputs

    def _routing_step(self, kwargs: dict[str, Any], router_labels: Any = None) -> Optional[RoutingStep]:
        """What this forward's routers are watched for (the RSL and the label loss in a training forward with
        autograd on, the statistics while recorded), or None when neither is wanted. `router_labels` count in a
        training forward only: an evaluation may run on the same batches."""
        collector = self.routing_collector
        training = self.training and torch.is_grad_enabled()
        labelled = training and router_labels is not None
        adapters = self._loss_adapters(labelled) if training else []
        num_routers = self._num_routers(adapters) if adapters else 1  # no loop over the layers when not training
        settings = self._loss_settings(adapters, num_routers)
        labels = self._checked_router_labels(router_labels, settings) if labelled else None
        record_stats = collector.record_stats and (self.training or not collector.stats_training_only)
        if not settings and not record_stats and collector.record_gates_of is None:
            return None
        is_encoder_decoder = bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))
        return RoutingStep(
            masks=token_masks(kwargs, is_encoder_decoder),
            settings=settings,
            scale=loss_scale(kwargs, is_encoder_decoder, self.routing_loss_accumulation_steps) if settings else 1.0,
            num_routers=num_routers,
            anchors=self.trainable.anchors_for(self.model, self.peft_config, self._rsl_adapters(settings)),
            record_stats=record_stats,
            record_gates=collector.record_gates_of,
            router_labels=labels,
        )

    def _loss_adapters(self, labelled: bool) -> list[str]:
        """The active adapters with a router loss in this forward: those with the RSL and, in a forward given
        `router_labels` (`labelled`), those with a label weight."""
        return [
            name
            for name in self.active_adapters
            if self.peft_config[name].add_routing_loss or (labelled and self.peft_config[name].router_label_weight)
        ]

    def _loss_settings(self, adapters: list[str], num_routers: int) -> dict[str, RouterLossSettings]:
        """Each of `adapters`' router loss: its RSL (weights 0 without `add_routing_loss`) and its label weight.

        The step divides every router's term by `num_routers` (the RSL is the routers' mean), while
        `router_label_weight` weighs each router's own cross-entropy, so that a 30-layer model's routers are pulled
        to their labels as hard as a 2-layer model's: the label weight is multiplied back by `num_routers` here."""
        settings = {}
        for name in adapters:
            config = self.peft_config[name]
            rsl = config.add_routing_loss
            settings[name] = RouterLossSettings(
                config.rsl_balance_weight if rsl else 0.0,
                self.entropy_weights.current(name, self.peft_config) if rsl else 0.0,
                config.rsl_entropy_sign,
                global_balance=rsl and config.rsl_balance_scope == "global_batch",
                label_weight=config.router_label_weight * num_routers,
                label_copies=config.copies_per_expert,
            )
        return settings

    def _num_routers(self, adapters: list[str]) -> int:
        """The routers of `adapters` in the model (at least 1): what a step's router terms are averaged over."""
        return max(1, sum(name in layer.expert_rank for layer in self._mixer_layers() for name in adapters))

    def _rsl_adapters(self, settings: dict[str, RouterLossSettings]) -> list[str]:
        """The adapters of `settings` that build the RSL (and so its preservation term), not the label loss alone."""
        return [name for name in settings if self.peft_config[name].add_routing_loss]

    def _checked_router_labels(self, labels: Any, settings: dict[str, RouterLossSettings]) -> torch.Tensor:
        """`router_labels` as a long tensor, refused where no active adapter would use them (they would be dropped
        silently) or where a label is not an expert of an adapter that does."""
        users = [name for name, adapter in settings.items() if adapter.label_weight]
        if not users:
            raise ValueError(
                "A training batch holds `router_labels`, but no active adapter has `router_label_weight` > 0, so they "
                "would be ignored. Set `router_label_weight` in the adapter's config, or drop the column."
            )
        try:
            ids = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            ids = None
        if (
            ids is None
            or ids.dtype.is_floating_point
            or ids.dtype.is_complex
            or ids.dtype == torch.bool
            or ids.dim() != 1
        ):
            raise ValueError(
                "`router_labels` must be one whole-number expert index per sample (a list of ints or an integer "
                f"tensor of shape (batch,)), -100 for a sample without a label; got {labels!r}."
            )
        labels = ids
        if not torch.compiler.is_compiling():  # a data-dependent check: left out of a compiled graph
            for name in users:
                experts = self.peft_config[name].num_distinct_experts
                wrong = labels[(labels != -100) & ((labels < 0) | (labels >= experts))]
                if wrong.numel():
                    raise ValueError(
                        f"`router_labels` must be expert indices in [0, {experts}) of adapter {name!r}, or -100 for "
                        f"a sample without a label; got {wrong.tolist()}."
                    )
        return labels

    def _observe_layers(self, collector: Optional[RoutingCollector]) -> None:
        """Point every mixer layer at `collector` (None: stop watching), when that changes."""
        if (collector is not None) == bool(self.routing_collector.module_names):
            return
        names = {}
        for name, layer in iter_mixer_layers(self.model):
            layer.routing_observer = collector
            names[id(layer)] = name
        self.routing_collector.module_names = names if collector is not None else {}

    def _mixer_layers(self) -> list[LoraMixerLayer]:
        """The model's mixer layers, listed again after each change of adapters (a walk over every module costs a
        training step too much, and a compiled one a guard per module)."""
        if self._mixer_layer_list is None:
            self._mixer_layer_list = [layer for _, layer in iter_mixer_layers(self.model)]
        return self._mixer_layer_list

    def set_routing(
        self, routing: Optional[str] = None, top_k: Optional[int] = None, adapter_name: Optional[str] = None
    ) -> None:
        """Change how a trained adapter routes, e.g. trained `soft`, used `topk` with `top_k=2` for inference.

        Updates the adapter's config (so `save_pretrained` keeps the new routing) and the routing table its layers
        share; the weights are untouched. Unset arguments keep their value; `adapter_name=None` changes the active adapters.
        The values are checked as the config checks them, for every adapter, before anything changes.
        """
        names = [adapter_name] if adapter_name is not None else list(self.active_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter {unknown[0]!r}; adapters: {sorted(self.peft_config)}.")
        updated = {}
        for name in names:
            config = copy.copy(self.peft_config[name])
            config.routing = config.routing if routing is None else routing
            config.top_k = config.top_k if top_k is None else top_k
            config._validate()
            updated[name] = config
        for name, config in updated.items():
            self.peft_config[name].routing, self.peft_config[name].top_k = config.routing, config.top_k
            self.router_settings[name] = self.router_settings[name]._replace(mode=config.routing, top_k=config.top_k)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: LoraMixerConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """PEFT's selection, minus the experts' weights when the config's pinned references stand for them.

        PEFT calls this as it saves (and pushes) the model, so the model learns here to keep our card on a push.
        """
        if isinstance(model, PeftModel):
            keep_card_on_push(model)
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        check_not_partitioned(selected)
        return selected if config.stores_expert_weights else without_expert_weights(model, selected, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LoraMixerConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A router-only checkpoint gets the experts fetched at their pinned commits when the adapter was built.

        Weights of modules the model lacks are named in a warning, as PEFT would drop them silently."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        warn_about_absent_modules(model, remapped, adapter_name)
        if config.stores_expert_weights:
            return remapped
        return {**pinned_expert_weights(model, config, adapter_name), **remapped}

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of a half-precision base's adapter weights to float32 (the default); without it, the experts
        read from float32 files go to the base's dtype as well, as PEFT LoRA's weights would."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            for _, layer in iter_mixer_layers(self.model, adapter_name):
                layer._move_adapter_to_device_of_base_layer(adapter_name)

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's deletion, plus what was kept for training the adapter (lambda, anchors, gradient hooks)."""
        super().delete_adapter(adapter_name)
        self._mixer_layer_list = None
        self.entropy_weights.forget(adapter_name)
        self.trainable.forget(adapter_name)

    def unload(self) -> nn.Module:
        """The base model with every mixer layer removed and the hooks (ours, the Mamba mixers') taken off."""
        for handle in self._mixer_forward_hooks:
            handle.remove()
        self._mixer_forward_hooks = ()
        self.trainable.remove()
        self._mixer_layer_list = None
        model = super().unload()
        unguard_fused_mixers(model)
        return model

    # ---- training ----------------------------------------------------------------------------------------------
    def routing_loss(self) -> Optional[RoutingLoss]:
        """The last training forward's RSL with its parts (or None). Its gradient reached the routers through their
        probabilities, weighted by `scale`; `outputs.loss` holds the task loss only."""
        return self.last_routing_loss

    def routing_loss_term(self) -> torch.Tensor:
        """Deprecated: the RSL reaches the routers whatever loss is backpropagated; adding this (a zero) changes
        nothing."""
        warnings.warn(
            "`routing_loss_term()` is no longer needed and returns zero: the RSL's gradient reaches the routers "
            "through their probabilities, whatever loss you backpropagate. Remove the call.",
            FutureWarning,
            stacklevel=2,
        )
        return torch.zeros((), device=next(self.model.parameters()).device)

    @contextmanager
    def collect_routing_stats(self) -> Iterator[None]:
        """Record the routing statistics of every forward inside the block, in eval or training mode."""
        collector = self.routing_collector
        previous = collector.record_stats, collector.stats_training_only
        self.record_routing_stats(True)
        try:
            yield
        finally:
            self.record_routing_stats(*previous)

    @contextmanager
    def recording_gates(self, adapter_name: Optional[str] = None) -> Iterator[dict[str, list[GateRecord]]]:
        """Record the gates every router of the adapter (default: the active one) applies in the forwards inside the
        block: yields {module name: one `GateRecord` per forward}, filled as the forwards run. The routing loss and
        the statistics record from the same observation of each router, so what this shows is what they count."""
        name = adapter_name if adapter_name is not None else self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; adapters: {sorted(self.peft_config)}.")
        collector = self.routing_collector
        previous = collector.record_gates_of
        collector.record_gates_of, collector.gates = name, {}
        try:
            yield collector.gates
        finally:
            collector.record_gates_of = previous

    def record_routing_stats(self, enabled: bool, training_only: bool = False) -> None:
        """Switch statistics recording on or off for the forwards to come (the counts are kept);
        `training_only` leaves out forwards in eval mode (e.g. the Trainer's evaluation during training)."""
        self.routing_collector.record_stats, self.routing_collector.stats_training_only = enabled, training_only

    def routing_stats(self, reset: bool = False) -> dict[str, ModuleRoutingStats]:
        """Per-module expert usage and mean entropy over the tokens recorded so far (padding excluded)."""
        stats = self.routing_collector.stats
        summary = stats.summary()
        if reset:
            stats.reset()
        return summary

    def routing_loss_state(self) -> dict[str, Any]:
        """The state the RSL carries across steps (the adaptive lambdas), for checkpoints."""
        return self.entropy_weights.state()

    def load_routing_loss_state(self, state: dict[str, Any]) -> None:
        """Restore what `routing_loss_state()` returned (floats or tensors)."""
        self.entropy_weights.load_state(state, self.peft_config)

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
        self.trainable.set(self.model, self.peft_config, names, routers, experts)


def _restore_routing(previous: list[tuple[LoraMixerLayer, Optional[torch.Tensor]]]) -> None:
    """Give each layer back the forced expert ids it had before `_force_routing`."""
    for layer, ids in previous:
        layer.forced_expert_ids = ids
