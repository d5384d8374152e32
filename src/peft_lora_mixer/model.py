"""`LoraMixerModel`: the PEFT tuner that injects LoRA-Mixer layers and exposes forced routing."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional, Union

import torch
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
from .experts.checkpoint import pinned_expert_weights, without_expert_weights
from .experts.loading import ExpertSet, load_experts
from .experts.router_init import router_weights_from_experts, set_router_weights
from .layer import MERGE_ERROR, ExpertSpec, LoraMixerLayer, in_out_features
from .mamba import check_supported_ssm_target, guard_fused_mixer, needs_guard, unguard_fused_mixers
from .targets import DEFAULT_TARGET_MODULES
from .routing_loss.controller import RoutingTrainingMixin


class LoraMixerModel(RoutingTrainingMixin, BaseTuner):
    """Replaces each targeted projection by a `LoraMixerLayer`; everything else is PEFT's own machinery.

    Use through `peft.get_peft_model(model, LoraMixerConfig(...))`. Besides the usual PEFT methods it offers
    `route_to(expert_ids)`, the forced routing of stage-1 expert training, and the training API of
    `RoutingTrainingMixin` (routing loss, routing statistics, `set_trainable`).
    """

    prefix = "loramixer_"
    tuner_layer_cls = LoraMixerLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    _experts: Optional[ExpertSet] = None  # the experts of the adapter being injected, for their ranks and scalings

    def _prepare_adapter_config(self, peft_config: LoraMixerConfig, model_config: dict) -> LoraMixerConfig:
        if peft_config.target_modules is None and model_config.get("model_type") not in self.target_module_mapping:
            raise ValueError(
                f"LoRA-Mixer has no default target modules for model_type {model_config.get('model_type')!r}. "
                "Pass `target_modules`, e.g. the names of the attention projections (['q_proj', 'v_proj', ...]) "
                f"or 'all-linear'. Types with defaults: {', '.join(sorted(self.target_module_mapping))}."
            )
        return super()._prepare_adapter_config(peft_config, model_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
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
        self._install_training_hooks()

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

    def _mixer_layers(self) -> Iterator[LoraMixerLayer]:
        return (module for module in self.model.modules() if isinstance(module, LoraMixerLayer))

    @contextmanager
    def route_to(self, expert_ids: Union[int, Sequence[int], torch.Tensor]) -> Iterator[None]:
        """Send every token of sample b to expert `expert_ids[b]` (an int: all samples to that expert).

        This is the forced routing of stage-1 training: each expert learns its own domain, the routers are
        bypassed (and get no gradient).
        """
        ids = torch.as_tensor(expert_ids, dtype=torch.long)
        if ids.dim() > 1:
            raise ValueError(f"route_to() takes one expert id per sample, got a tensor of shape {tuple(ids.shape)}.")
        num_experts = min(self.peft_config[name].num_experts for name in self.active_adapters)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= num_experts:
            raise ValueError(
                f"route_to() expert ids must lie in [0, {num_experts}), got {ids.tolist()}."
            )
        layers = list(self._mixer_layers())
        previous = [layer.forced_expert_ids for layer in layers]
        for layer in layers:
            layer.forced_expert_ids = ids
        try:
            yield
        finally:
            for layer, ids_before in zip(layers, previous):
                layer.forced_expert_ids = ids_before

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: LoraMixerConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """PEFT's selection, minus the experts' weights when the config's pinned references stand for them."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return selected if config.stores_expert_weights else without_expert_weights(model, selected, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LoraMixerConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A router-only checkpoint gets the experts fetched at their pinned commits when the adapter was built."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if config.stores_expert_weights:
            return remapped
        return {**pinned_expert_weights(model, config, adapter_name), **remapped}

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unload(self) -> nn.Module:
        """The base model with every mixer layer removed and the Mamba mixers' hooks taken off."""
        self._remove_training_hooks()
        model = super().unload()
        unguard_fused_mixers(model)
        return model

