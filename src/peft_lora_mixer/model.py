"""`LoraMixerModel`: the PEFT tuner that injects LoRA-Mixer layers and exposes forced routing."""

from __future__ import annotations

import copy
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
from .experts.router_init import router_weights_from_experts, set_router_weights
from .layer import MERGE_ERROR, ExpertSpec, LoraMixerLayer, in_out_features, iter_mixer_layers
from .mamba import check_supported_ssm_target, guard_fused_mixer, needs_guard, unguard_fused_mixers
from .model_card import keep_card_on_push
from .quantization import check_supported_quantization
from .routing import as_expert_ids
from .routing_loss.controller import ExpertSelection, RoutingLossController
from .routing_loss.loss import RoutingLoss
from .routing_loss.stats import ModuleRoutingStats
from .targets import DEFAULT_TARGET_MODULES


class LoraMixerModel(BaseTuner):
    """Replaces each targeted projection by a `LoraMixerLayer`; everything else is PEFT's own machinery.

    Use through `peft.get_peft_model(model, LoraMixerConfig(...))`. Besides the usual PEFT methods it offers
    `route_to(expert_ids)`, the forced routing of stage-1 expert training, and the training API (routing loss,
    routing statistics, `set_trainable`), kept by its `RoutingLossController`.
    """

    prefix = "loramixer_"
    tuner_layer_cls = LoraMixerLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    _experts: Optional[ExpertSet] = None  # the experts of the adapter being injected, for their ranks and scalings

    def __init__(self, model: nn.Module, config, adapter_name: str, **kwargs) -> None:
        # a plain object, set before BaseTuner injects (its hooks go on at each injection); PEFT saves none of it
        self.routing_controller = RoutingLossController(self)
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
            if config.router_init == "experts" and not config.resolved_experts:  # a new mixer, not a saved one
                router_weights = router_weights_from_experts(model, experts, matched)
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
        self.routing_controller.install()

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
            new_module = LoraMixerLayer(target, adapter_name, experts, **layer_kwargs)
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
        num_experts = min(self.peft_config[name].num_experts for name in self.active_adapters)
        ids = as_expert_ids(expert_ids, num_experts)
        if ids.dim() > 1 or ids.numel() == 0:
            raise ValueError(
                f"route_to() takes one expert id per sample (or one int for all), got {ids.tolist()} of shape "
                f"{tuple(ids.shape)}."
            )
        layers = [layer for _, layer in iter_mixer_layers(self.model)]
        previous = [layer.forced_expert_ids for layer in layers]
        for layer in layers:
            layer.forced_expert_ids = ids
        try:
            yield
        finally:
            for layer, ids_before in zip(layers, previous):
                layer.forced_expert_ids = ids_before

    def set_routing(
        self, routing: Optional[str] = None, top_k: Optional[int] = None, adapter_name: Optional[str] = None
    ) -> None:
        """Change how a trained adapter routes, e.g. trained `soft`, used `topk` with `top_k=2` for inference.

        Updates the adapter's config (so `save_pretrained` keeps the new routing) and every one of its layers; the
        weights are untouched. Unset arguments keep their value; `adapter_name=None` changes the active adapters.
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
            for _, layer in iter_mixer_layers(self.model, name):
                layer.routing[name] = layer.routing[name]._replace(mode=config.routing, top_k=config.top_k)

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
        """PEFT's deletion, plus what the routing-loss controller kept for the adapter (lambda, anchors, hooks)."""
        super().delete_adapter(adapter_name)
        self.routing_controller.forget(adapter_name)

    def unload(self) -> nn.Module:
        """The base model with every mixer layer removed and the Mamba mixers' hooks taken off."""
        self.routing_controller.remove()
        model = super().unload()
        unguard_fused_mixers(model)
        return model

    # ---- training: thin front of the routing-loss controller ------------------------------------------------------
    def routing_loss(self) -> Optional[RoutingLoss]:
        """The last training forward's RSL with its parts (or None); `outputs.loss` received `scale * total` when
        the model computed a loss."""
        return self.routing_controller.last_loss

    def routing_loss_term(self) -> torch.Tensor:
        """The last training forward's RSL as a differentiable scalar, for a loss the model did not compute.

        Add it when the backpropagated loss does not contain `outputs.loss` (e.g. cross-entropy computed from the
        logits): `loss = task_loss + model.routing_loss_term()`. It is returned once per forward (then zero), so
        calling it again cannot count it twice. Never add it to a loss that already holds `outputs.loss`.
        """
        return self.routing_controller.routing_loss_term()

    @contextmanager
    def collect_routing_stats(self) -> Iterator[None]:
        """Record the routing statistics of every forward inside the block, in eval or training mode."""
        with self.routing_controller.collect_stats():
            yield

    def record_routing_stats(self, enabled: bool, training_only: bool = False) -> None:
        """Switch statistics recording on or off for the forwards to come (the counts are kept);
        `training_only` leaves out forwards in eval mode (e.g. the Trainer's evaluation during training)."""
        self.routing_controller.record_stats(enabled, training_only)

    def routing_stats(self, reset: bool = False) -> dict[str, ModuleRoutingStats]:
        """Per-module expert usage and mean entropy over the tokens recorded so far (padding excluded)."""
        return self.routing_controller.stats(reset)

    def routing_loss_state(self) -> dict[str, Any]:
        """The state the RSL carries across steps (the adaptive lambdas), for checkpoints."""
        return self.routing_controller.state()

    def load_routing_loss_state(self, state: dict[str, Any]) -> None:
        """Restore what `routing_loss_state()` returned (floats or tensors)."""
        self.routing_controller.load_state(state)

    def set_trainable(self, routers: bool, experts: ExpertSelection, adapter_name: Optional[str] = None) -> None:
        """Choose what trains: the routers, the experts (all, none, or the listed expert indices), or both.

        Stage 1 of the joint regime is `set_trainable(routers=False, experts=True)`, stage 2
        `set_trainable(routers=True, experts=False)` (or a list of experts kept trainable). Experts are stored
        concatenated, so a partial list keeps the whole A/B trainable and zeroes the gradient of the other experts'
        rank slots with a hook; with no weight decay on those parameters they then never move. With
        `rsl_preservation_weight > 0`, the trainable experts' current weights become theta(0) of the
        preservation term. Call it before building the optimizer (e.g. the Trainer); `set_adapter` resets it.
        """
        self.routing_controller.set_trainable(routers, experts, adapter_name)
