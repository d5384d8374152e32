"""Token-level gates from router logits: the routing modes of LoRA-Mixer as pure functions."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (router logits, or probabilities) per token; ties go to the lower index.

    `torch.topk` does not promise which of tied values it returns, so it runs on exact integer keys that order by
    score first and by lower index second: a float32's bit pattern, read as a signed integer with the lower 31 bits
    of negative values flipped, orders like the float, and `bits * E + (E - 1 - index)` breaks ties without
    reordering distinct values. This matches a stable descending sort and beats it on many logits
    (docs/benchmarks.md).
    """
    if k == 1:
        return scores.argmax(dim=-1, keepdim=True)  # documented to return the first of tied maxima
    num_experts = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32)  # `+ 0.0` makes -0.0 the +0.0 it equals
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    reverse_index = torch.arange(num_experts - 1, -1, -1, device=scores.device)
    keys = torch.add(reverse_index, ordered.long(), alpha=num_experts)
    return keys.topk(k, dim=-1).indices


# Up to this many logits (a decoding step's, a short prompt's) one stable sort, which also returns the kept values,
# beats the integer keys of `top_k_indices` plus a gather; beyond it the keys win (timings in docs/benchmarks.md).
SORT_MAX_ELEMENTS = 4096


def top_k_routes(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight) of the top-k experts per token by router logit, the weights the softmax of the kept logits.

    That softmax is the top-k of the full softmax renormalised, without computing the full softmax or the
    renormalisation: a decoding step, where such small operations cost as much as the matrix multiplies, needs
    neither. Both ways of finding the experts give the same experts and the same weights (a stable descending sort
    is what `top_k_indices` is defined to match).
    """
    if 1 < k and logits.numel() <= SORT_MAX_ELEMENTS:
        values, index = logits.sort(dim=-1, descending=True, stable=True)
        index, kept = index.narrow(-1, 0, k), values.narrow(-1, 0, k)
    else:
        index = top_k_indices(logits, k)
        kept = logits.gather(-1, index)
    return index, torch.softmax(kept, dim=-1)


def with_top_k_gradient(weight: torch.Tensor, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`weight` (the kept experts' weights, no gradient) as the forward value, with the gradient `topk` gives the
    router: that of the kept probabilities renormalised, through `probs` (so that what the routing observer attached
    to them reaches the router too)."""
    kept = probs.gather(-1, index)
    renormalised = kept / kept.sum(-1, keepdim=True)
    return weight + (renormalised - renormalised.detach())


def switch_route(logits: torch.Tensor, probs: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight) of `topk` routing with `top_k=1`, as Switch Transformers route: each token's best expert,
    weighted by its router probability. (Renormalised, the single kept weight would be a constant 1 and the router
    would get no gradient at all.) `probs` as for `Routes`."""
    index = top_k_indices(logits.detach(), 1)
    probs = probs if probs is not None else torch.softmax(logits, dim=-1)
    return index, probs.gather(-1, index)


class RouterSettings(NamedTuple):
    """How one adapter routes on one projection (a tuple: read on every forward, so cheap to read)."""

    mode: str
    top_k: int
    temperature: float
    num_experts: int


class Routes(NamedTuple):
    """The experts each token uses (index, (..., k)) and their gates (weight, (..., k)); under a straight-through
    mode in training, the router's probabilities over all experts (..., E), whose gradient the router gets as if
    the gates were dense."""

    index: torch.Tensor
    weight: torch.Tensor
    straight_through_probs: Optional[torch.Tensor] = None


def _topk_routes(logits: torch.Tensor, probs: Optional[torch.Tensor], top_k: int) -> Routes:
    """The renormalised top-k; the router's gradient flows through the kept experts only. Top-1: `switch_route`."""
    if top_k == 1:
        return Routes(*switch_route(logits, probs))
    index, weight = top_k_routes(logits.detach(), top_k)
    if probs is not None and probs.requires_grad:
        weight = with_top_k_gradient(weight, probs, index)
    return Routes(index, weight)


def _hard_soft_routes(logits: torch.Tensor, probs: Optional[torch.Tensor], top_k: int) -> Routes:
    """The forward value of `topk`, the gradient of `soft` (straight-through estimator)."""
    index, weight = top_k_routes(logits.detach(), top_k)
    return Routes(index, weight, probs if probs is not None and probs.requires_grad else None)


@dataclass(frozen=True)
class RoutingMode:
    """One routing mode: how it routes each token over the top-k experts (`routes`; None: it is dense), and whether
    its router gradient is dense (straight-through: training needs every expert's probability).

    `routes(logits, probs, top_k)` takes the router's logits (..., E) and `softmax(logits)` as the routing observer
    returned it, when anything needs the probabilities (the observer, or autograd to train the router), else None.
    """

    routes: Optional[Callable[[torch.Tensor, Optional[torch.Tensor], int], Routes]]
    straight_through: bool = False

    def is_sparse(self, top_k: int, num_experts: int) -> bool:
        """Whether the forward gates are k-sparse (with `top_k` equal to the number of experts, every mode is soft)."""
        return self.routes is not None and top_k < num_experts


# The routing modes; the config, the CLI and the benchmarks read their names from this table, the layer its rules.
ROUTING: dict[str, RoutingMode] = {
    "hard_soft": RoutingMode(_hard_soft_routes, straight_through=True),
    "soft": RoutingMode(None),
    "topk": RoutingMode(_topk_routes),
}
ROUTING_MODES = tuple(ROUTING)
SPARSE_ROUTING_MODES = tuple(name for name, mode in ROUTING.items() if mode.routes is not None)


def gates_from_logits(logits: torch.Tensor, probs: Optional[torch.Tensor], routing: str, top_k: int) -> torch.Tensor:
    """Mixture weights for every expert (..., E), from the router's logits (`probs` as for `RoutingMode`).

    - `soft`: the probabilities themselves.
    - `topk`: the renormalised top-k; the router's gradient flows through the kept experts only. With `top_k=1`,
      the kept expert's probability itself (`switch_route`).
    - `hard_soft`: the forward value of `topk`, the gradient of `soft` (straight-through estimator).
    With `top_k` equal to the number of experts every mode is `soft`.
    """
    mode = ROUTING[routing]
    if not mode.is_sparse(top_k, logits.shape[-1]):
        return probs if probs is not None else torch.softmax(logits, dim=-1)
    index, weight, straight_through = mode.routes(logits, probs, top_k)
    gates = torch.zeros_like(logits).scatter_(-1, index, weight)
    if straight_through is not None:
        # `probs - probs.detach()` is exactly zero, so the forward value is exactly the sparse gates
        return gates + (straight_through - straight_through.detach())
    return gates


def as_expert_ids(expert_ids: Any, num_experts: Optional[int] = None) -> torch.Tensor:
    """`expert_ids` (an int, a list or tuple of ints, or an integer tensor or array) as a long tensor, refusing
    anything that is not a whole number (floats, strings, bools would otherwise be truncated or cast silently) and,
    with `num_experts`, any id outside [0, num_experts)."""
    if isinstance(expert_ids, (list, tuple)):
        wrong = [value for value in _flattened(expert_ids) if not _is_integer(value)]
        ids = None if wrong else torch.tensor(expert_ids, dtype=torch.long)
    elif _is_integer(expert_ids):
        wrong, ids = [], torch.tensor(int(expert_ids), dtype=torch.long)
    else:
        try:
            ids = torch.as_tensor(expert_ids)
        except (TypeError, ValueError, RuntimeError):
            ids = None
        integral = ids is not None and not (
            ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool
        )
        wrong = [] if integral else [expert_ids]
    if wrong:
        raise ValueError(
            f"Expert ids must be whole numbers (int, or an integer tensor), got {wrong[0]!r}; convert them with "
            "int() where they are exact (a float or string id would otherwise be truncated silently)."
        )
    ids = ids.long()
    if num_experts is not None and ids.numel() and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"Expert ids must lie in [0, {num_experts}), got {ids.tolist()}.")
    if num_experts is None and ids.numel() and ids.min() < 0:
        raise ValueError(f"Expert ids must be >= 0, got {ids.tolist()}.")
    return ids


def _flattened(values: Any) -> Iterator[Any]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flattened(value)
        else:
            yield value


def _is_integer(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def forced_gates(
    expert_ids: torch.Tensor, num_experts: int, token_shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """One-hot gates sending every token of sample b to expert `expert_ids[b]` (stage-1 expert training).

    `token_shape` is the shape of the layer's tokens, batch first (its input's shape without the features); the
    gates broadcast over all its token dimensions. A single id (a 0-d tensor) sends every sample to that expert.
    """
    if len(token_shape) == 0 and expert_ids.numel() == 1:  # one unbatched token (a 1-D input): one sample
        return torch.nn.functional.one_hot(expert_ids.reshape(()).to(device), num_experts).to(torch.float32)
    if expert_ids.dim() == 0 and len(token_shape) >= 1:
        expert_ids = expert_ids.expand(token_shape[0])
    if len(token_shape) < 1 or token_shape[0] != expert_ids.shape[0]:
        raise ValueError(
            f"route_to() was given {expert_ids.numel()} expert ids but a routed layer received tokens of shape "
            f"{tuple(token_shape)}; pass one expert id per sample of the batch (batch dimension first; an unbatched "
            "input is one sample: add the batch dimension, e.g. `input_ids[None]`)."
        )
    one_hot = torch.nn.functional.one_hot(expert_ids.to(device), num_experts).to(torch.float32)
    return one_hot.view(expert_ids.shape[0], *([1] * (len(token_shape) - 1)), num_experts)
