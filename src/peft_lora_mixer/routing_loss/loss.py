"""The Routing Specialization Loss (RSL) of LoRA-Mixer as pure functions of one router's probabilities.

For one router with probabilities `p` (tokens x E) over its valid tokens:

    RSL = alpha * E * sum_i pbar_i * fbar_i  +  sign * lambda * mean_t H(p_t)

`pbar_i` is the mean probability of expert i and `fbar_i` the fraction of tokens whose top-k holds i (not
differentiable: the balance gradient flows through `pbar`, as in Switch Transformers). With perfectly even
routing the balance term equals `alpha * top_k`. `E` counts all the router's experts, also those without weights
on its projection (routing to one of them means "no change here"). The model averages the RSL over its routers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from ..routing import top_k_indices


@dataclass(frozen=True)
class RoutingLoss:
    """The last training forward's RSL and its parts (detached scalars), as its gradient reached the routers.

    `balance` and `entropy` are the unweighted terms averaged over the routers, `preservation` the unweighted
    sum of squared distances. The routers received the gradient of `scale * total`, where (one adapter)
    `total = alpha * balance + sign * entropy_weight * entropy + beta * preservation`; `scale` is the micro-batch's
    weight in its optimizer step (see `routing_loss.batch.loss_scale`). `outputs.loss` holds the task loss only.
    """

    total: torch.Tensor
    balance: torch.Tensor
    entropy: torch.Tensor
    preservation: torch.Tensor
    entropy_weight: torch.Tensor
    scale: torch.Tensor

    def as_tensors(self, prefix: str = "rsl/") -> dict[str, torch.Tensor]:
        """The parts as 0-d tensors, left on their device (summing them needs no synchronisation)."""
        return {
            f"{prefix}total": self.total,
            f"{prefix}balance": self.balance,
            f"{prefix}entropy": self.entropy,
            f"{prefix}preservation": self.preservation,
            f"{prefix}entropy_weight": self.entropy_weight,
        }

    def as_logs(self, prefix: str = "rsl/") -> dict[str, float]:
        """The parts as plain floats for a training log."""
        return {key: value.item() for key, value in self.as_tensors(prefix).items()}


def valid_tokens(probs: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The probabilities of the tokens that count, flattened to (tokens, E); padding dropped by `token_mask`."""
    flat = probs.reshape(-1, probs.shape[-1])
    if token_mask is None:
        return flat
    return flat[token_mask.reshape(-1).to(device=flat.device, dtype=torch.bool)]


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy in nats; experts with probability 0 contribute 0, with a finite gradient."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


def top_k_fraction(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """fbar: for each expert, the fraction of tokens whose top-k holds it (sums to top_k).

    `scores` are the router logits, as routing picks its experts from them (the probabilities can tie where
    float32's softmax underflows, logits [0, -200, -150]: routing picks {0, 2}); probabilities only where no logits
    are at hand (they order alike while nothing underflows).
    """
    scores = scores.detach()
    chosen = torch.zeros_like(scores, dtype=torch.float32).scatter(-1, top_k_indices(scores, top_k), 1.0)
    return chosen.mean(0)


class RouterUsage(NamedTuple):
    """The constants of one router's RSL in one forward, from its valid tokens (no gradient).

    Computed once per router and forward, and shared by the RSL, its gradient and the routing statistics.
    """

    fraction: torch.Tensor  # fbar, (E,); zeros without tokens
    num_experts: torch.Tensor  # E of the balance term: every expert counts, with weights on this projection or not
    num_tokens: int  # this forward's valid tokens: the entropy's mean is over them
    # pbar is `sum of these tokens' probabilities / balance_tokens`: `num_tokens`, or with statistics over the global
    # batch its token count divided by the number of processes (whose gradients the data-parallel wrapper averages)
    balance_tokens: Union[int, torch.Tensor]

    @classmethod
    def of(cls, probs: torch.Tensor, top_k: int, logits: Optional[torch.Tensor] = None) -> RouterUsage:
        """From the valid tokens' probabilities (tokens x E) and, for fbar, their logits (see `top_k_fraction`)."""
        probs = probs.detach()
        num_experts = probs.new_tensor(probs.shape[-1])
        if probs.shape[0] == 0:
            return cls(probs.new_zeros(probs.shape[-1]), num_experts, 0, 0)
        fraction = top_k_fraction(probs if logits is None else logits, top_k).to(probs.dtype)
        return cls(fraction, num_experts, probs.shape[0], probs.shape[0])

    def over_global_batch(self, group: Optional[dist.ProcessGroup] = None) -> RouterUsage:
        """This usage with fbar (and pbar's token count) taken over the tokens of every process in `group`.

        Each process's balance term then is `E * sum_i fbar_i * (its probability sums) / (N / P)` (N tokens over P
        processes): averaged over the processes, as data-parallel training averages gradients, it is the balance
        term of one process on all N tokens. One all-reduce of E + 1 numbers; without a process group, unchanged.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        counts = torch.cat([self.fraction * self.num_tokens, self.fraction.new_tensor([float(self.num_tokens)])])
        dist.all_reduce(counts, group=group)
        total = counts[-1]
        fraction = counts[:-1] / total.clamp_min(1.0)
        return self._replace(fraction=fraction, balance_tokens=total / dist.get_world_size(group))


@dataclass(frozen=True)
class RouterLossSettings:
    """alpha, lambda and the entropy sign of one adapter for one forward, and whether its balance statistics are
    taken over the global batch (`rsl_balance_scope`)."""

    balance_weight: float
    entropy_weight: Union[float, torch.Tensor]
    entropy_sign: int
    global_balance: bool = False


class RouterLossParts(NamedTuple):
    """One router's RSL in one forward: the weighted term and its unweighted parts."""

    term: torch.Tensor
    balance: torch.Tensor
    entropy: torch.Tensor


def balance_term(probs: torch.Tensor, usage: RouterUsage) -> torch.Tensor:
    """E * sum_i pbar_i * fbar_i over all E experts of the router."""
    return usage.num_experts * (probs.sum(0) / usage.balance_tokens * usage.fraction).sum()


def router_loss_parts(probs: torch.Tensor, usage: RouterUsage) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance term, mean per-token entropy) of one router's valid-token probabilities (tokens x E)."""
    if probs.shape[0] == 0:
        zero = probs.sum() * 0.0
        return zero, zero
    return balance_term(probs, usage), token_entropy(probs).mean()


def specialization_loss(probs: torch.Tensor, usage: RouterUsage, settings: RouterLossSettings) -> RouterLossParts:
    """One router's RSL, `alpha * balance + sign * lambda * entropy`, of its valid tokens' probabilities (tokens x
    E), as detached figures: its gradient reaches the router in closed form (`specialization_loss_gradient`)."""
    with torch.no_grad():
        balance, entropy = router_loss_parts(probs, usage)
        term = settings.balance_weight * balance + settings.entropy_sign * settings.entropy_weight * entropy
    return RouterLossParts(term, balance, entropy)


def specialization_loss_gradient(
    probs: torch.Tensor, usage: RouterUsage, settings: RouterLossSettings, token_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The gradient of `specialization_loss`'s term with respect to `probs` ((..., E)), in closed form.

    What autograd gives, without building and running a graph in every router's backward: the balance term is
    linear in the mean probabilities (its constants are `usage`), and a token's entropy `-sum p log p` has the
    gradient `-(log p + 1)`, or `-log(tiny)` where `p` lies below the clamp that keeps the logarithm finite.
    Tokens that `token_mask` drops (padding) get zero.
    """
    if usage.num_tokens == 0:
        return torch.zeros_like(probs)
    tiny = torch.finfo(probs.dtype).tiny
    entropy_gradient = -(probs.clamp_min(tiny).log() + (probs >= tiny).to(probs.dtype))
    balance_gradient = usage.num_experts * usage.fraction / usage.balance_tokens
    entropy_gradient = entropy_gradient / usage.num_tokens
    gradient = settings.balance_weight * balance_gradient + settings.entropy_sign * settings.entropy_weight * (
        entropy_gradient
    )
    if token_mask is not None:  # padding tokens take no part in the RSL
        gradient = gradient * token_mask.reshape(*probs.shape[:-1], 1).to(device=probs.device, dtype=probs.dtype)
    return gradient


def preservation_term(current: torch.Tensor, anchor: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """||theta - theta(0)||^2 over the rank slots of the trainable experts (`keep`, a bool mask along `dim`)."""
    diff = current - anchor
    shape = [1] * diff.dim()
    shape[dim] = -1
    return (diff.square() * keep.view(shape).to(diff.dtype)).sum()


def preservation_gradient(current: torch.Tensor, anchor: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """The gradient of `preservation_term` with respect to `current`: 2 (theta - theta(0)) on the kept slots."""
    shape = [1] * current.dim()
    shape[dim] = -1
    return 2 * (current - anchor) * keep.view(shape).to(current.dtype)


def update_entropy_weight(
    weight: torch.Tensor, entropy: torch.Tensor, target: float, rate: float, sign: int
) -> torch.Tensor:
    """One step of the Lagrange-multiplier controller for lambda, kept >= 0 (on the device: no synchronisation).

    With `sign=+1` the entropy is minimised: an entropy above target raises lambda (pushes harder), one below
    target lowers it. `sign=-1` mirrors this for maximisation.
    """
    return (weight + rate * sign * (entropy - target)).clamp_min(0.0)
