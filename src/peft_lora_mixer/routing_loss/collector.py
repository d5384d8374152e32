"""Watch the routers during a forward: RSL values, routing statistics, and the RSL gradient.

The RSL gradient is not obtained by differentiating a loss built from tensors kept during the forward: under
reentrant gradient checkpointing the forward runs without autograd and the routers' real graph only exists when
the checkpointed block is recomputed during backward. Instead each router's probabilities pass through an identity
node (`_InjectRoutingGradient`) whose backward adds `scale * dRSL/dp` to the incoming gradient, recomputing the
RSL of that router from the probabilities it saved. `scale` is the gradient that reached the RSL's place in
`outputs.loss` (1 / accumulation steps, an AMP loss scale...), read by `_ScaleProbe`; the autograd engine runs
that node first because it was created last and becomes ready first. This is exact with no checkpointing, with
reentrant and with non-reentrant checkpointing alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .loss import RouterUsage, router_loss_parts, specialization_loss_gradient, valid_tokens
from .stats import RoutingStatsAccumulator


@dataclass(frozen=True)
class RouterLossSettings:
    """alpha, lambda and the entropy sign of one adapter for one forward."""

    balance_weight: float
    entropy_weight: float
    entropy_sign: int


@dataclass
class RoutingStep:
    """What one forward of the model needs to share with its routers (and with their backward, later)."""

    token_mask: Optional[torch.Tensor]
    settings: dict[str, RouterLossSettings]
    inject_gradient: bool
    record_stats: bool
    num_routers: int = 0
    parts: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    gradient_scale: Optional[torch.Tensor] = None

    def mask_for(self, token_shape: torch.Size) -> Optional[torch.Tensor]:
        """The padding mask if this router's tokens (of `token_shape`) are the ones it describes (batch x length),
        else None."""
        if self.token_mask is not None and tuple(self.token_mask.shape) == tuple(token_shape):
            return self.token_mask
        return None


class _ScaleProbe(torch.autograd.Function):
    """`value * scale` placed in the loss; its backward records the gradient that reached the RSL."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, anchor: torch.Tensor, step: RoutingStep, scale) -> torch.Tensor:
        ctx.step, ctx.scale = step, scale
        return value * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        step, received = ctx.step, grad * ctx.scale
        step.gradient_scale = received if step.gradient_scale is None else step.gradient_scale + received
        return None, None, None, None


class _InjectRoutingGradient(torch.autograd.Function):
    """Identity on one router's probabilities; its backward adds the gradient of that router's RSL share."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, token_mask: Optional[torch.Tensor], usage: RouterUsage, step: RoutingStep,
                adapter_name: str) -> torch.Tensor:
        ctx.save_for_backward(probs, token_mask, usage.fraction, usage.num_present)
        ctx.step, ctx.num_tokens, ctx.adapter_name = step, usage.num_tokens, adapter_name
        return probs.view_as(probs)  # identity; a view, not a copy of every router output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        step: RoutingStep = ctx.step
        if step.gradient_scale is None:
            raise RuntimeError(
                "The routers were reached by backward before the routing loss in `outputs.loss`. Backpropagate a "
                "loss that contains `outputs.loss`, or set `add_routing_loss=False` to train without the RSL."
            )
        probs, token_mask, fraction, num_present = ctx.saved_tensors
        settings = step.settings[ctx.adapter_name]
        rsl_grad = specialization_loss_gradient(
            probs.reshape(-1, probs.shape[-1]), RouterUsage(fraction, num_present, ctx.num_tokens),
            settings.balance_weight, settings.entropy_weight, settings.entropy_sign,
        )
        if token_mask is not None:  # padding tokens take no part in the RSL
            rsl_grad = rsl_grad * token_mask.reshape(-1, 1).to(device=rsl_grad.device, dtype=rsl_grad.dtype)
        return grad + rsl_grad.view_as(grad) * (step.gradient_scale / step.num_routers), None, None, None, None


class RoutingCollector:
    """Shared by the mixer layers of one model (a plain object, never a module, so nothing of it is saved)."""

    def __init__(self) -> None:
        self.module_names: dict[int, str] = {}
        self.step: Optional[RoutingStep] = None
        self.collecting = False
        self.record_stats = False
        self.stats_training_only = False
        self.stats = RoutingStatsAccumulator()

    def observe(self, layer, adapter_name: str, probs: torch.Tensor, token_shape: torch.Size) -> torch.Tensor:
        """Called by a layer with its router's probabilities ((..., E) over tokens that had `token_shape`, batch
        first); returns the tensor the layer should route with."""
        step = self.step
        if step is None:
            return probs
        has_loss = adapter_name in step.settings
        inject = step.inject_gradient and has_loss and probs.requires_grad
        if not (self.collecting or inject):
            return probs
        token_mask = step.mask_for(token_shape)
        valid = valid_tokens(probs.detach(), token_mask)
        usage = RouterUsage.of(valid, layer.routing[adapter_name].top_k)
        if self.collecting:
            if has_loss:
                step.num_routers += 1
                step.parts.append((adapter_name, *router_loss_parts(valid, usage)))
            if step.record_stats:
                self.stats.add(self.module_names.get(id(layer), type(layer).__name__), valid, usage)
        if inject:
            probs = _InjectRoutingGradient.apply(probs, token_mask, usage, step, adapter_name)
        return probs

    def loss_value(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(RSL averaged over the routers, mean balance term, mean entropy) of the last forward, detached."""
        step = self.step
        terms, balances, entropies = [], [], []
        for adapter_name, balance, entropy in step.parts:
            settings = step.settings[adapter_name]
            terms.append(settings.balance_weight * balance + settings.entropy_sign * settings.entropy_weight * entropy)
            balances.append(balance)
            entropies.append(entropy)
        return torch.stack(terms).mean(), torch.stack(balances).mean(), torch.stack(entropies).mean()

    def probe(self, value: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """`scale * value` as a loss term whose backward tells the routers the gradient scale."""
        anchor = torch.zeros((), device=value.device, requires_grad=True)
        return _ScaleProbe.apply(value, anchor, self.step, scale) if self.step.inject_gradient else value * scale
