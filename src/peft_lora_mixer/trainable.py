"""Which parts of an adapter train (its routers, all, none or some of its experts), and theta(0) of the experts
that train, for the RSL's preservation term."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layer import LoraMixerLayer, iter_mixer_layers
from .routing import as_expert_ids
from .zero3 import gathered

ExpertSelection = Union[bool, Sequence[int]]


class Anchor(NamedTuple):
    """theta(0) of one layer's trainable experts for the preservation term, and its weight beta."""

    lora_A: torch.Tensor  # (sum r_e, in)
    lora_B: torch.Tensor  # (out, sum r_e)
    keep: torch.Tensor  # (sum r_e,) bool: the rank slots of experts that train
    weight: float


class TrainableParts:
    """What `set_trainable` chose per adapter: the gradient masks of frozen experts' rank slots, and the anchors.

    A plain object the tuner owns and calls with the model and configs (PEFT saves none of it). Anchors are keyed
    by the layer's id, as the routers' forward finds them.
    """

    def __init__(self) -> None:
        self.anchors: dict[str, dict[int, Anchor]] = {}
        self.trainable_experts: dict[str, list[int]] = {}  # as `set_trainable` last chose, per adapter
        self.expert_grad_hooks: dict[str, list[RemovableHandle]] = {}

    def set(
        self,
        model: nn.Module,
        configs: Mapping[str, Any],
        adapter_names: Iterable[str],
        routers: bool,
        experts: ExpertSelection,
    ) -> None:
        """See `LoraMixerModel.set_trainable`; `adapter_names` are known adapters."""
        selections = {name: _kept_experts(experts, configs[name].num_experts) for name in adapter_names}
        for name, kept in selections.items():
            self._remove_expert_hooks(name)
            self.anchors.pop(name, None)
            self.trainable_experts[name] = kept
            for _, layer in iter_mixer_layers(model, name):
                layer.loramixer_router[name].requires_grad_(routers)
                lora_A, lora_B = layer.loramixer_A[name], layer.loramixer_B[name]
                keep = _kept_slots(layer, name, kept)
                for param in (lora_A, lora_B):
                    param.requires_grad_(bool(kept))
                if kept and not bool(keep.all()):
                    self.expert_grad_hooks.setdefault(name, []).extend(
                        [lora_A.register_hook(_mask_grad(keep, 0)), lora_B.register_hook(_mask_grad(keep, 1))]
                    )
            if kept and configs[name].rsl_preservation_weight > 0:
                self.record_anchors(model, name, configs[name].rsl_preservation_weight)

    def anchors_for(
        self, model: nn.Module, configs: Mapping[str, Any], adapter_names: Iterable[str]
    ) -> dict[tuple[int, str], Anchor]:
        """The anchors of the adapters with a preservation weight, by (layer id, adapter); recorded now for an
        adapter that has none yet (theta(0) is then the weights of the first training forward)."""
        result = {}
        for name in adapter_names:
            weight = configs[name].rsl_preservation_weight
            if weight <= 0:
                continue
            if name not in self.anchors:
                self.record_anchors(model, name, weight)
            result.update({(layer_id, name): anchor for layer_id, anchor in self.anchors[name].items()})
        return result

    def record_anchors(self, model: nn.Module, adapter_name: str, weight: float) -> None:
        """theta(0): the current weights of the experts that train (the rank slots whose gradient is not masked, of
        parameters that require it)."""
        anchors = self.anchors[adapter_name] = {}
        kept = self.trainable_experts.get(adapter_name)
        for _, layer in iter_mixer_layers(model, adapter_name):
            lora_A, lora_B = layer.loramixer_A[adapter_name], layer.loramixer_B[adapter_name]
            if not lora_A.requires_grad:
                continue
            keep = _kept_slots(layer, adapter_name, kept)
            with gathered([lora_A, lora_B]):  # ZeRO-3 shards: every process records the full theta(0)
                anchors[id(layer)] = Anchor(lora_A.detach().clone(), lora_B.detach().clone(), keep, weight)

    def forget(self, adapter_name: str) -> None:
        """Drop everything kept for a deleted adapter."""
        self._remove_expert_hooks(adapter_name)
        self.anchors.pop(adapter_name, None)
        self.trainable_experts.pop(adapter_name, None)

    def remove(self) -> None:
        for adapter_name in list(self.expert_grad_hooks):
            self._remove_expert_hooks(adapter_name)

    def _remove_expert_hooks(self, adapter_name: str) -> None:
        for handle in self.expert_grad_hooks.pop(adapter_name, []):
            handle.remove()


def _kept_experts(experts: ExpertSelection, num_experts: int) -> list[int]:
    if isinstance(experts, bool):
        return list(range(num_experts)) if experts else []
    return sorted(set(as_expert_ids(experts, num_experts).reshape(-1).tolist()))


def _kept_slots(layer: LoraMixerLayer, adapter_name: str, kept: Union[list[int], None]) -> torch.Tensor:
    """Which rank slots of the layer belong to the kept experts (all, when nothing was chosen)."""
    slot_expert = layer.loramixer_slot_expert[adapter_name]
    if kept is None:
        return torch.ones_like(slot_expert, dtype=torch.bool)
    return torch.isin(slot_expert, torch.tensor(kept, dtype=torch.long, device=slot_expert.device))


def _mask_grad(keep: torch.Tensor, dim: int):
    """A gradient hook zeroing the rank slots (along `dim`) of the experts that must not train."""
    shape = [-1, 1] if dim == 0 else [1, -1]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * keep.view(shape).to(grad.dtype)

    return hook
