"""Watch the routers during a forward: the RSL's per-router terms, the routing statistics, and under reentrant
gradient checkpointing the RSL gradient of the recomputed routers.

Each router's term is an ordinary differentiable scalar of its probabilities (`loss.specialization_loss`), so the
RSL's gradient reaches the routers through plain autograd from wherever the term is added. Under reentrant
checkpointing the forward runs without autograd, so a checkpointed router's term is a constant; when its block is
recomputed during backward, an identity node on its probabilities (`_InjectRoutingGradient`) adds the term's
gradient, scaled by what reached the model's RSL (recorded by `_RoutingLossProbe`, which the autograd engine runs
first: it was created after every node of the model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .loss import (
    RouterLossParts,
    RouterLossSettings,
    RouterUsage,
    specialization_loss,
    specialization_loss_gradient,
    valid_tokens,
)
from .stats import RoutingStatsAccumulator

MISSING_RSL_WARNING = (
    "LoRA-Mixer: the routers received gradient but the routing loss (RSL) of that forward never reached backward, "
    "so the routers trained without it. This happens when the backpropagated loss does not contain `outputs.loss` "
    "(Trainer with `label_smoothing_factor` or `compute_loss_func`, trl's SFTTrainer, a loss computed from the "
    "logits). Add `model.routing_loss_term()` to your loss, or train with `RoutingLossMixin` "
    "(`class MyTrainer(RoutingLossMixin, Trainer)`), or set `add_routing_loss=False` to train without the RSL."
)

# Cross-attention projections that read the encoder's tokens (their router sees the encoder's padding mask).
CROSS_ATTENTION_BLOCKS = ("EncDecAttention", "encoder_attn", "crossattention")
CROSS_ATTENTION_ENCODER_INPUTS = ("k", "v", "k_proj", "v_proj", "key", "value")


@dataclass
class TokenMasks:
    """The padding masks of one forward (batch x length, True = counts), and which one each router reads.

    Decoder-only and SSM models have one (`decoder`); encoder-decoders also have the encoder's, read by the
    encoder's routers and by the cross-attention projections fed the encoder's output.
    """

    decoder: Optional[torch.Tensor] = None
    encoder: Optional[torch.Tensor] = None

    def for_router(self, module_name: str, token_shape: torch.Size) -> Optional[torch.Tensor]:
        """The mask for the router of `module_name`, if its tokens (of `token_shape`) are the ones it describes."""
        mask = self.encoder if self.encoder is not None and _reads_encoder_tokens(module_name) else self.decoder
        if mask is not None and tuple(mask.shape) == tuple(token_shape):
            return mask
        return None


def _reads_encoder_tokens(module_name: str) -> bool:
    parts = module_name.split(".")
    if "encoder" in parts:
        return True
    return any(block in parts for block in CROSS_ATTENTION_BLOCKS) and parts[-1] in CROSS_ATTENTION_ENCODER_INPUTS


@dataclass(eq=False)  # compared by identity: each forward is its own step
class RoutingStep:
    """What one forward of the model shares with its routers (and, under reentrant checkpointing, their backward).

    `builds_loss`: the forward trains with the RSL (training mode, autograd on, an adapter with `add_routing_loss`).
    `gradient_scale`: what reached the RSL in backward (None until then, or if it never does).
    `recomputed_routers`: routers that ran without autograd (reentrant checkpointing), by (layer id, adapter), with
    the usage of each run whose recomputation has yet to inject its gradient (kept, so that backward needs no
    all-reduce for global-batch statistics).
    """

    masks: TokenMasks
    settings: dict[str, RouterLossSettings]
    builds_loss: bool
    record_stats: bool
    parts: list[tuple[str, RouterLossParts]] = field(default_factory=list)
    gradient_scale: Optional[torch.Tensor] = None
    recomputed_routers: dict[tuple[int, str], list[RouterUsage]] = field(default_factory=dict)

    @property
    def num_routers(self) -> int:
        return len(self.parts)


class _RoutingLossProbe(torch.autograd.Function):
    """Identity on the model's RSL; its backward records the gradient that reached it, for the recomputed routers
    and to tell whether the RSL was used at all."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, anchor: torch.Tensor, step: RoutingStep) -> torch.Tensor:
        ctx.step = step
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        step = ctx.step
        step.gradient_scale = grad if step.gradient_scale is None else step.gradient_scale + grad
        return grad, None, None


class _WatchRouterBackward(torch.autograd.Function):
    """Identity on one router's probabilities; its backward warns (once) when the RSL never reached backward."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, step: RoutingStep, collector: RoutingCollector) -> torch.Tensor:
        ctx.step, ctx.collector = step, collector
        return probs.view_as(probs)  # a view, not a copy of every router output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.step.gradient_scale is None:
            ctx.collector.warn_missing_rsl()
        return grad, None, None


class _InjectRoutingGradient(torch.autograd.Function):
    """Identity on a recomputed router's probabilities; its backward adds the gradient of that router's RSL share."""

    @staticmethod
    def forward(
        ctx,
        probs: torch.Tensor,
        token_mask: Optional[torch.Tensor],
        usage: RouterUsage,
        step: RoutingStep,
        adapter_name: str,
        collector: RoutingCollector,
    ) -> torch.Tensor:
        ctx.save_for_backward(probs, token_mask)
        ctx.step, ctx.usage, ctx.adapter_name, ctx.collector = step, usage, adapter_name, collector
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        step: RoutingStep = ctx.step
        if step.gradient_scale is None:  # the RSL is not in the backpropagated loss, or came after the routers
            ctx.collector.warn_missing_rsl()
            return grad, None, None, None, None, None
        probs, token_mask = ctx.saved_tensors
        rsl_grad = specialization_loss_gradient(probs, ctx.usage, step.settings[ctx.adapter_name], token_mask)
        return grad + rsl_grad * (step.gradient_scale / step.num_routers), None, None, None, None, None


class RoutingCollector:
    """Shared by the mixer layers of one model (a plain object, never a module, so nothing of it is saved)."""

    # reentrant-checkpointed forwards kept until their routers are recomputed (several micro-batches may run their
    # forwards before one backward); older ones were never backpropagated and are dropped
    MAX_PENDING_RECOMPUTATIONS = 16

    def __init__(self) -> None:
        self.module_names: dict[int, str] = {}
        self.step: Optional[RoutingStep] = None
        self.collecting = False
        self.record_stats = False
        self.stats_training_only = False
        self.stats = RoutingStatsAccumulator()
        self.awaiting_recomputation: list[RoutingStep] = []
        self.warned_missing_rsl = False

    def observe(
        self, layer, adapter_name: str, logits: torch.Tensor, probs: torch.Tensor, token_shape: torch.Size
    ) -> torch.Tensor:
        """Called by a layer with its router's logits and probabilities ((..., E) over tokens that had
        `token_shape`, batch first); returns the tensor the layer should route with."""
        module_name = self.module_names.get(id(layer), "")
        if not self.collecting:  # perhaps a reentrant checkpoint's recomputation during backward
            return self._inject_into_recomputed(layer, adapter_name, module_name, probs, token_shape)
        step = self.step
        if step is None:
            return probs
        token_mask = step.masks.for_router(module_name, token_shape)
        valid = valid_tokens(probs.detach(), token_mask)
        usage = RouterUsage.of(valid, layer.routing[adapter_name].top_k, valid_tokens(logits.detach(), token_mask))
        if step.record_stats:
            self.stats.add(module_name or type(layer).__name__, valid, usage)
        if not (step.builds_loss and adapter_name in step.settings):
            return probs
        settings = step.settings[adapter_name]
        if settings.global_balance:
            usage = usage.over_global_batch()
        step.parts.append((adapter_name, specialization_loss(probs, usage, settings, token_mask)))
        if probs.requires_grad:
            return _WatchRouterBackward.apply(probs, step, self)
        if torch.is_grad_enabled():  # trains with autograd on, yet the router had none: nothing trains it
            return probs
        step.recomputed_routers.setdefault((id(layer), adapter_name), []).append(usage)
        return probs

    def _inject_into_recomputed(
        self, layer, adapter_name: str, module_name: str, probs: torch.Tensor, token_shape: torch.Size
    ) -> torch.Tensor:
        """In the recomputation of a reentrant-checkpointed router, the node that adds its RSL gradient."""
        if not probs.requires_grad:
            return probs
        key = (id(layer), adapter_name)
        for step in reversed(self.awaiting_recomputation):
            usages = step.recomputed_routers.get(key)
            if usages:
                usage = usages.pop(0)
                if not any(step.recomputed_routers.values()):
                    self.awaiting_recomputation.remove(step)
                token_mask = step.masks.for_router(module_name, token_shape)
                return _InjectRoutingGradient.apply(probs, token_mask, usage, step, adapter_name, self)
        return probs

    def finish_forward(self) -> Optional[torch.Tensor]:
        """End the forward's collection; (RSL averaged over its routers, as a loss term) when it builds the loss."""
        self.collecting = False
        step = self.step
        if step is None or not step.parts:
            return None
        if step.recomputed_routers:
            self.awaiting_recomputation.append(step)
            del self.awaiting_recomputation[: -self.MAX_PENDING_RECOMPUTATIONS]
        return torch.stack([parts.term for _, parts in step.parts]).mean()

    def probe(self, value: torch.Tensor) -> torch.Tensor:
        """`value` (the model's RSL), as a loss term whose backward records the gradient that reached it."""
        anchor = torch.zeros((), device=value.device, requires_grad=True)
        return _RoutingLossProbe.apply(value, anchor, self.step)

    def warn_missing_rsl(self) -> None:
        if not self.warned_missing_rsl:
            self.warned_missing_rsl = True
            warnings.warn(MISSING_RSL_WARNING, UserWarning, stacklevel=2)
