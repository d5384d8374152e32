"""Routers that route before any training: each router row points along its expert's strongest input direction.

An expert changes a token most when the token lies along the top right singular vector `v_e` of its delta
`B_e A_e` (the idea behind PEFT's Arrow routing, which scores a token by `|<v_e, x>|`). Our router is linear,
`logits = W x + b`, and cannot take an absolute value, while a singular vector's sign is arbitrary. So the score is
linearised around the projection's mean input `m`: `|<v_e, x>| ~ sign(<v_e, m>) <v_e, x>` for tokens near `m`. The
mean comes from one forward pass of the base model over random token ids (no training data). Each router's rows
are scaled by one factor so that its logits have unit root-mean-square on those tokens; `router_temperature` then
sets how sharp the gates are. An expert absent from a projection (or with a zero delta there) gets a zero row: its
logit stays 0, the score of a change of nothing.

`router_init="arrow"` routes exactly as PEFT's Arrow at 0 steps instead, with the same linear router: each expert
is held twice, with router rows `+v_e` and `-v_e` (unit norm, as Arrow's prototypes, zero bias). Of each pair one
logit is `|<v_e, x>|` and the other `-|<v_e, x>|`, so for any top_k <= E the top_k logits are Arrow's top_k scores,
one slot of each chosen expert, and their softmax is Arrow's coefficients. An expert absent from a projection has
two zero rows, as Arrow's zero prototype scores it 0. The price is twice the rank slots (each expert's A and B are
computed twice per token); the gain is Arrow's routing exactly, then a router that trains from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..layer import LoraMixerLayer, in_out_features

if TYPE_CHECKING:  # loading.py builds Arrow's pairs with this module: no import at run time either way round
    from .loading import ExpertSet

CALIBRATION_SHAPE = (4, 64)  # random token ids: batch x length
_ZERO_DELTA = 1e-12  # a singular value at or below this (relative to the largest) means the expert changes nothing


def top_input_direction(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor | None:
    """The top right singular vector (in_features,) of `lora_B @ lora_A`, None when the product is zero.

    Computed through a QR of `lora_A^T` (in x r), so the SVD is of an (out x r) matrix, never of the full delta.
    """
    q, r = torch.linalg.qr(lora_A.double().t())
    _, singular_values, right = torch.linalg.svd(lora_B.double() @ r.t(), full_matrices=False)
    if singular_values[0] <= _ZERO_DELTA * max(1.0, float(lora_B.abs().max() * lora_A.abs().max())):
        return None
    return (q @ right[0]).float()


def expert_directions(experts: ExpertSet, module_name: str, in_features: int) -> torch.Tensor:
    """(E, in_features): each expert's top input direction on `module_name`, zero where it changes nothing."""
    directions = torch.zeros(len(experts.experts), in_features)
    for index, expert in enumerate(experts.experts):
        block = expert.blocks.get(module_name)
        if block is None or block.lora_A is None:
            continue
        direction = top_input_direction(block.lora_A, block.lora_B)
        if direction is not None:
            directions[index] = direction
    return directions


def arrow_router_weights(experts: ExpertSet, module_names: list[str]) -> dict[str, torch.Tensor]:
    """Per module in `module_names`: the router weight of Arrow's pairs over `experts`, which holds each expert
    twice in a row (`router_init="arrow"`): rows `2e` and `2e + 1` are `+v_e` and `-v_e` of expert e (zero where it
    changes nothing there)."""
    weights = {}
    for name in module_names:
        in_features = next(expert.blocks[name].lora_A.shape[1] for expert in experts.experts if name in expert.blocks)
        directions = expert_directions(experts, name, in_features)  # the copies of a pair share their v_e
        signs = torch.tensor([1.0, -1.0]).repeat(len(experts.experts) // 2)
        weights[name] = directions * signs.unsqueeze(-1)
    return weights


@torch.no_grad()
def projected_input_moments(
    model: nn.Module, directions: Mapping[str, torch.Tensor], seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: the mean and the mean square of `<v_e, x>` over its inputs `x`, on random token ids.

    `model` is the base model before any adapter is injected; it is run once, in eval mode, and left as it was.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "num_embeddings"):
        raise ValueError(
            "router_init='experts' runs the base model once on random token ids, but this model has no token "
            "embedding (`get_input_embeddings()`); use router_init='random'."
        )
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(embeddings.num_embeddings, CALIBRATION_SHAPE, generator=generator)
    input_ids = input_ids.to(embeddings.weight.device)
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            tokens = args[0].reshape(-1, args[0].shape[-1]).float()
            scores = tokens @ directions[name].to(tokens.device).t()
            moments[name] = (scores.mean(0).cpu(), scores.square().mean(0).cpu())

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in directions]
    was_training = model.training
    try:
        model.eval()
        inputs = {"input_ids": input_ids}
        if getattr(model.config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = input_ids
        model(**inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return moments


def initial_router_weights(
    router_init: str, model: nn.Module, experts: ExpertSet, module_names: list[str]
) -> Optional[dict[str, torch.Tensor]]:
    """The starting router weight of each module in `module_names` for `LoraMixerConfig.router_init` (None:
    nn.Linear's own, `"random"`), computed on the base model before the adapter is injected."""
    if router_init == "experts":
        return router_weights_from_experts(model, experts, module_names)
    if router_init == "arrow":
        return arrow_router_weights(experts, module_names)
    return None


def router_weights_from_experts(
    model: nn.Module, experts: ExpertSet, module_names: list[str]
) -> dict[str, torch.Tensor]:
    """The initial router weight (E x in_features) of every module in `module_names`, computed on the base model
    (before injection) from the experts' factors."""
    directions = {}
    for name in module_names:
        module = model.get_submodule(name)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module  # a second adapter's case
        directions[name] = expert_directions(experts, name, in_out_features(base)[0])
    moments = projected_input_moments(model, directions)
    weights = {}
    for name, direction in directions.items():
        if name not in moments:  # the module did not run on the calibration pass: its router stays random
            continue
        mean, mean_square = moments[name]
        signs = torch.where(mean < 0, -1.0, 1.0)
        present = direction.abs().sum(-1) > 0
        rms = mean_square[present].mean().sqrt() if present.any() else torch.tensor(1.0)
        weights[name] = direction * (signs / rms.clamp_min(1e-12)).unsqueeze(-1)
    return weights


@torch.no_grad()
def set_router_weights(model: nn.Module, adapter_name: str, weights: Mapping[str, torch.Tensor]) -> None:
    """Write the router weights (zero biases) into the mixer layers of `adapter_name`."""
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraMixerLayer):
            raise TypeError(f"{name!r} is not a LoRA-Mixer layer.")
        router = layer.loramixer_router[adapter_name]
        router.weight.copy_(weight)
        router.bias.zero_()
