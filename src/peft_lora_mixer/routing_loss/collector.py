"""Watch the routers during a forward: each router's RSL, attached to its probabilities, and the statistics.

How the RSL reaches the routers. When a training forward builds the RSL, every router's probabilities pass through
an identity node (`_AddRoutingLossGradient`) whose backward adds that router's share of the RSL gradient, in
closed form, to whatever gradient reached the probabilities (the pattern of DeepSeek's MoE auxiliary loss, moved
onto the router's output). So any loss computed downstream of the model's outputs carries the RSL to the routers:
`outputs.loss`, label smoothing, a `compute_loss_func`, TRL's loss from log-probabilities, a hand-written
cross-entropy. Each share's weight (`RoutingStep.router_weight`: the step's loss scale over the model's number of
routers) is known when the forward begins, and everything the backward needs is a tensor or a constant given to
the node as it is built: `torch.compile` traces that backward once, at the forward, and never reads Python state
set later. The RSL is never added to `outputs.loss`: its value is only reported.

Nothing with an autograd graph is kept across forwards: a `RoutingStep` holds detached figures only, and the nodes
hold the step's constants, never the step. (A graph reachable from Python objects that its own nodes reference is
a cycle the garbage collector cannot see through autograd's C++ nodes: each step's activations would be kept.)

Under reentrant gradient checkpointing the forward runs without autograd; when a checkpointed block is recomputed
during backward, the router's probabilities get the same node, with the usage recorded in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch

from ..routing import gates_from_logits
from ..trainable import Anchor
from .batch import TokenMasks
from .loss import (
    RouterLabels,
    RouterLossSettings,
    RouterUsage,
    RoutingLoss,
    preservation_gradient,
    preservation_term,
    specialization_loss,
    specialization_loss_gradient,
)
from .observation import RouterObservation
from .stats import RoutingStatsAccumulator


class RouterLossPart(NamedTuple):
    """One router's RSL in one forward, detached: the weighted term and its unweighted parts (the label loss
    included), and its layer's preservation sum unweighted and times beta (None but for the first run of an anchored
    layer)."""

    adapter_name: str
    term: torch.Tensor
    balance: torch.Tensor
    entropy: torch.Tensor
    label: torch.Tensor
    preservation: Optional[torch.Tensor]
    weighted_preservation: Optional[torch.Tensor]


@dataclass(eq=False)  # compared by identity: each forward is its own step
class RoutingStep:
    """What one forward shares with its routers: the masks, each adapter's RSL settings, the RSL's weight, the
    preservation anchors by (layer id, adapter); filled with each router's detached RSL parts.

    `scale`: the step's loss scale (`routing_loss.batch.loss_scale`); the preservation term is weighted by it
    alone, once per anchored layer. `num_routers`: the routers of the model that build the RSL (the model's RSL is
    the sum of their terms over this number: their mean when each runs once). Both are known when the forward
    begins, so each router's node gets its weight, `scale / num_routers`, as it is built: a compiled backward is
    traced then and never reads Python state later. `recomputed_routers`: routers that ran without autograd
    (reentrant checkpointing), by (layer id, adapter), with the usage and anchor of each run still to be
    recomputed.
    """

    masks: TokenMasks
    settings: dict[str, RouterLossSettings]
    scale: Union[float, torch.Tensor] = 1.0
    num_routers: int = 1
    anchors: dict[tuple[int, str], Anchor] = field(default_factory=dict)
    record_stats: bool = False
    record_gates: Optional[str] = None  # the adapter whose applied gates are recorded (`RoutingCollector.gates`)
    router_labels: Optional[torch.Tensor] = None  # (batch,) each sample's expert, -100 for none (a training forward)
    parts: list[RouterLossPart] = field(default_factory=list)
    anchored: set[tuple[int, str]] = field(default_factory=set)  # the anchors already given to a node
    recomputed_routers: dict[tuple[int, str], list[tuple[RouterUsage, Optional[Anchor]]]] = field(default_factory=dict)

    @property
    def router_weight(self) -> Union[float, torch.Tensor]:
        """What each router's RSL gradient is multiplied by: the step's loss scale over the number of routers."""
        return self.scale / self.num_routers

    def routing_loss(self) -> RoutingLoss:
        """The step's RSL and its parts, as `model.routing_loss()` reports them (all detached)."""
        device = self.parts[0].term.device

        def column(values: list[Optional[torch.Tensor]]) -> torch.Tensor:
            present = [value.to(device) for value in values if value is not None]
            return torch.stack(present) if present else torch.zeros(1, device=device)

        columns = zip(*(part[1:] for part in self.parts))  # all but the adapter name
        terms, balances, entropies, labels, preservations, weighted = (column(values) for values in columns)
        first = next(iter(self.settings.values()))
        return RoutingLoss(
            total=terms.sum() / self.num_routers + weighted.sum(),
            balance=balances.mean(),
            entropy=entropies.mean(),
            label=labels.mean(),
            preservation=preservations.sum(),
            entropy_weight=torch.as_tensor(first.entropy_weight).detach().clone(),
            scale=torch.as_tensor(self.scale).detach(),
        )


class _RoutingLossGradient(NamedTuple):
    """The constants one router's node needs in backward (never the step: see the module docstring)."""

    usage: RouterUsage
    settings: RouterLossSettings
    weight: Union[float, torch.Tensor]
    # the preservation term's gradient to the layer's A and B (with an anchor), computed in the forward, where the
    # weights are at hand (DeepSpeed ZeRO-3 releases them after it)
    preservation_grads: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class _AddRoutingLossGradient(torch.autograd.Function):
    """Identity on a router's probabilities; its backward adds the router's RSL gradient times `weight` to the
    probabilities' gradient and, with a preservation anchor, the preservation term's gradient to the layer's
    experts (passed in as `lora_A` and `lora_B` for that)."""

    @staticmethod
    def forward(ctx, probs, lora_A, lora_B, constants: _RoutingLossGradient):
        # kept as attributes, not `save_for_backward`: non-reentrant checkpointing must see the same saved tensors
        # in the recomputation, which builds no RSL (the probabilities, tokens x E, stay alive: a small cost)
        ctx.probs, ctx.constants = probs.detach(), constants
        return probs.view_as(probs)  # a view, not a copy of every router output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        constants: _RoutingLossGradient = ctx.constants
        grad_probs = None
        if ctx.needs_input_grad[0]:
            rsl_grad = specialization_loss_gradient(ctx.probs, constants.usage, constants.settings)
            grad_probs = grad + rsl_grad * constants.weight
        grad_A, grad_B = constants.preservation_grads or (None, None)
        return grad_probs, grad_A, grad_B, None


class GateRecord(NamedTuple):
    """The gates one router applied in one forward (no gradient), and which of its tokens count."""

    gates: torch.Tensor  # (tokens, E) float32: the routing mode's gates (top-k renormalised, or the softmax)
    weights: torch.Tensor  # (tokens,): 1 for a token that counts, 0 for padding


class RoutingCollector:
    """Shared by the mixer layers of one model while the RSL or the statistics are wanted (a plain object, never a
    module, so nothing of it is saved)."""

    # reentrant-checkpointed forwards kept until their routers are recomputed (several micro-batches may run their
    # forwards before one backward); older ones were never backpropagated and are dropped
    MAX_PENDING_RECOMPUTATIONS = 16

    def __init__(self) -> None:
        self.module_names: dict[int, str] = {}
        self.step: Optional[RoutingStep] = None  # the forward under way, if it is watched
        self.record_stats = False
        self.stats_training_only = False  # leave out the forwards in eval mode
        self.stats = RoutingStatsAccumulator()
        self.record_gates_of: Optional[str] = None  # the adapter whose gates `gates` records
        self.gates: dict[str, list[GateRecord]] = {}  # by module, one record per forward, while recorded
        self.awaiting_recomputation: list[RoutingStep] = []

    def begin(self, step: RoutingStep) -> None:
        self.step = step

    def finish(self) -> Optional[RoutingStep]:
        """End the forward's collection; the step, when it built the RSL."""
        step, self.step = self.step, None
        if step is None or not step.parts:
            return None
        if step.recomputed_routers:
            self.awaiting_recomputation.append(step)
            del self.awaiting_recomputation[: -self.MAX_PENDING_RECOMPUTATIONS]
        return step

    def observe(self, router: RouterObservation) -> torch.Tensor:
        """`RoutingObserver.observe`: record the router's statistics and RSL parts; in a training forward, return
        its probabilities through the node that adds the RSL's gradient."""
        layer_id, adapter_name, probs = router.layer_id, router.adapter_name, router.probs
        module_name = self.module_names.get(layer_id, "")
        step = self.step
        if step is None:  # perhaps a reentrant checkpoint's recomputation during backward
            return self._attach_to_recomputed(router)
        token_mask = step.masks.for_router(module_name, router.token_shape)
        usage = RouterUsage.of(probs, router.settings.top_k, router.logits, token_mask)
        if step.record_stats:
            self.stats.add(module_name or str(layer_id), probs, usage)
        if step.record_gates == adapter_name:
            self._record_gates(module_name or str(layer_id), router, usage)
        settings = step.settings.get(adapter_name)
        if settings is None:
            return probs
        if settings.global_balance:
            usage = usage.over_global_batch()
        if step.router_labels is not None and settings.label_weight:
            labels = RouterLabels.of(
                step.router_labels,
                router.token_shape,
                router.settings.num_experts,
                settings.label_copies,
                usage.weights,
            )
            usage = usage._replace(labels=labels)
        parts = specialization_loss(probs, usage, settings)
        anchor = step.anchors.get((layer_id, adapter_name))
        if (layer_id, adapter_name) in step.anchored:  # a layer run twice in one forward: its anchor counts once
            anchor = None
        elif anchor is not None:
            step.anchored.add((layer_id, adapter_name))
        step.parts.append(RouterLossPart(adapter_name, *parts, *_preservation(router.experts, anchor)))
        if torch.is_grad_enabled():
            return _attach(router, usage, settings, step, anchor)
        step.recomputed_routers.setdefault((layer_id, adapter_name), []).append((usage, anchor))
        return probs

    def _record_gates(self, module_name: str, router: RouterObservation, usage: RouterUsage) -> None:
        """Keep the gates the router's layer applies, from the logits it routed with (never a second run of the
        router)."""
        logits = router.logits.detach()
        gates = gates_from_logits(logits, None, router.settings.mode, router.settings.top_k)
        self.gates.setdefault(module_name, []).append(GateRecord(gates.reshape(-1, logits.shape[-1]), usage.weights))

    def _attach_to_recomputed(self, router: RouterObservation) -> torch.Tensor:
        """In the recomputation of a reentrant-checkpointed router, the node that adds its RSL gradient."""
        if not torch.is_grad_enabled():
            return router.probs
        key = (router.layer_id, router.adapter_name)
        for step in reversed(self.awaiting_recomputation):
            runs = step.recomputed_routers.get(key)
            if runs:
                usage, anchor = runs.pop(0)
                if not any(step.recomputed_routers.values()):
                    self.awaiting_recomputation.remove(step)
                return _attach(router, usage, step.settings[router.adapter_name], step, anchor)
        return router.probs


def _attach(
    router: RouterObservation,
    usage: RouterUsage,
    settings: RouterLossSettings,
    step: RoutingStep,
    anchor: Optional[Anchor],
) -> torch.Tensor:
    probs = router.probs
    if anchor is None:
        constants = _RoutingLossGradient(usage, settings, step.router_weight)
        return _AddRoutingLossGradient.apply(probs, None, None, constants) if probs.requires_grad else probs
    lora_A, lora_B = router.experts
    scale = step.scale * anchor.weight
    with torch.no_grad():
        grads = (
            preservation_gradient(lora_A, anchor.lora_A, anchor.keep, 0) * scale,
            preservation_gradient(lora_B, anchor.lora_B, anchor.keep, 1) * scale,
        )
    constants = _RoutingLossGradient(usage, settings, step.router_weight, grads)
    return _AddRoutingLossGradient.apply(probs, lora_A, lora_B, constants)


def _preservation(
    experts: tuple[torch.Tensor, torch.Tensor], anchor: Optional[Anchor]
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """||theta - theta(0)||^2 of the layer's trainable experts, unweighted and times beta (detached; None without
    an anchor)."""
    if anchor is None:
        return None, None
    with torch.no_grad():
        lora_A, lora_B = experts
        total = preservation_term(lora_A, anchor.lora_A, anchor.keep, 0)
        total = total + preservation_term(lora_B, anchor.lora_B, anchor.keep, 1)
        return total, total * anchor.weight
