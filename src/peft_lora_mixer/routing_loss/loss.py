"""The Routing Specialization Loss (RSL) of LoRA-Mixer as pure functions of one router's probabilities.

For one router with probabilities `p` (tokens x E) over its valid tokens:

    RSL = alpha * E * sum_i pbar_i * fbar_i  +  sign * lambda * mean_t H(p_t)

`pbar_i` is the mean probability of expert i and `fbar_i` the fraction of tokens whose top-k holds i (not
differentiable: the balance gradient flows through `pbar`, as in Switch Transformers). With perfectly even
routing the balance term equals `alpha * top_k`. `E` counts all the router's experts, also those without weights
on its projection (routing to one of them means "no change here"). The model averages the RSL over its routers.

With task labels (`router_label_weight`, a batch's `router_labels`), a router's loss also holds
`label_weight * mean_t -log(sum_{e in slots(y_t)} p_te)` over its labelled tokens: the cross-entropy from its
probabilities to the expert of the token's sample (its two slots under `router_init="arrow"`).
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
    `total = alpha * balance + sign * entropy_weight * entropy + label_weight * routers * label + beta *
    preservation`; `label` is the routers' mean label loss (0 in a forward without `router_labels`), weighted per
    router (times the number of routers) so that depth does not dilute it. `scale` is the micro-batch's
    weight in its optimizer step (see `routing_loss.batch.loss_scale`). `outputs.loss` holds the task loss only.
    """

    total: torch.Tensor
    balance: torch.Tensor
    entropy: torch.Tensor
    label: torch.Tensor
    preservation: torch.Tensor
    entropy_weight: torch.Tensor
    scale: torch.Tensor

    def as_tensors(self, prefix: str = "rsl/") -> dict[str, torch.Tensor]:
        """The parts as 0-d tensors, left on their device (summing them needs no synchronisation)."""
        return {
            f"{prefix}total": self.total,
            f"{prefix}balance": self.balance,
            f"{prefix}entropy": self.entropy,
            f"{prefix}label": self.label,
            f"{prefix}preservation": self.preservation,
            f"{prefix}entropy_weight": self.entropy_weight,
        }

    def as_logs(self, prefix: str = "rsl/") -> dict[str, float]:
        """The parts as plain floats for a training log."""
        return {key: value.item() for key, value in self.as_tensors(prefix).items()}


def token_weights(token_mask: Optional[torch.Tensor], num_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """The weight of each of `num_tokens` flattened tokens in the RSL: 1 where it counts, 0 for padding.

    A multiply rather than dropping the padding by indexing: the shapes stay those of the batch (no data-dependent
    shape, no host synchronisation), which is what `torch.compile` needs to trace a training step as one graph.
    """
    if token_mask is None:
        return like.new_ones(num_tokens)
    return token_mask.reshape(num_tokens).to(device=like.device, dtype=like.dtype)


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy in nats; experts with probability 0 contribute 0, with a finite gradient."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


class RouterUsage(NamedTuple):
    """The constants of one router's RSL in one forward, from its tokens (no gradient).

    Computed once per router and forward, and shared by the RSL, its gradient and the routing statistics. Every
    field is a tensor on the router's device, so the RSL's gradient needs no Python value read at backward time.
    """

    weights: torch.Tensor  # (tokens,): 1 for a token that counts, 0 for padding
    # (tokens, k): each token's top-k experts, best first, picked as routing picks them: by logit, ties to the lower
    # index (the probabilities can tie where float32's softmax underflows, logits [0, -200, -150]: routing picks
    # {0, 2}). Picked once per router and forward; fbar and the statistics' top-1 both read it.
    choices: torch.Tensor
    fraction: torch.Tensor  # fbar, (E,); zeros without tokens
    num_experts: torch.Tensor  # E of the balance term: every expert counts, with weights on this projection or not
    num_tokens: torch.Tensor  # this forward's valid tokens (at least 1): the entropy's mean is over them
    # pbar is `sum of these tokens' probabilities / balance_tokens`: `num_tokens`, or with statistics over the global
    # batch its token count divided by the number of processes (whose gradients the data-parallel wrapper averages)
    balance_tokens: torch.Tensor
    labels: Optional[RouterLabels] = None  # the tokens' labelled experts, in a forward given `router_labels`

    @classmethod
    def of(
        cls,
        probs: torch.Tensor,
        top_k: int,
        logits: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
    ) -> RouterUsage:
        """From a router's probabilities ((..., E) over its tokens), its logits (which `choices` are picked from;
        the probabilities where none are given), and the tokens' padding mask (the tokens' shape; None: every
        token counts)."""
        flat = probs.detach().reshape(-1, probs.shape[-1])
        weights = token_weights(token_mask, flat.shape[0], flat)
        num_tokens = weights.sum().clamp_min(1.0)  # no tokens: every sum below is 0, and so is the RSL
        scores = flat if logits is None else logits.detach().reshape(flat.shape)
        choices = top_k_indices(scores, top_k)
        chosen = torch.zeros_like(flat).scatter(-1, choices, 1.0)
        fraction = (chosen * weights.unsqueeze(-1)).sum(0) / num_tokens
        return cls(weights, choices, fraction, flat.new_tensor(flat.shape[-1]), num_tokens, num_tokens)

    def over_global_batch(self, group: Optional[dist.ProcessGroup] = None) -> RouterUsage:
        """This usage with fbar (and pbar's token count) taken over the tokens of every process in `group`.

        Each process's balance term then is `E * sum_i fbar_i * (its probability sums) / (N / P)` (N tokens over P
        processes): averaged over the processes, as data-parallel training averages gradients, it is the balance
        term of one process on all N tokens. One all-reduce of E + 1 numbers; without a process group, unchanged.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        count = self.weights.sum()
        counts = torch.cat([self.fraction * self.num_tokens, count.reshape(1)])
        dist.all_reduce(counts, group=group)
        total = counts[-1].clamp_min(1.0)
        return self._replace(fraction=counts[:-1] / total, balance_tokens=total / dist.get_world_size(group))


class RouterLabels(NamedTuple):
    """Each token's labelled expert as a target over a router's E slots, and how many tokens are labelled."""

    targets: torch.Tensor  # (tokens, E): 1 on the slots of the token's expert; a row of 0 for no label or padding
    count: torch.Tensor  # labelled tokens, at least 1 (none: every target row is 0, and so is the loss)

    @classmethod
    def of(
        cls, labels: torch.Tensor, token_shape: torch.Size, num_experts: int, copies: int, weights: torch.Tensor
    ) -> RouterLabels:
        """From each sample's expert index (`labels`, (batch,), -100 for none) over the router's tokens
        (`token_shape`, batch first; `weights`: 1 for a token that counts, 0 for padding). An expert takes `copies`
        adjacent slots (2 under `router_init="arrow"`)."""
        if len(token_shape) == 0 or token_shape[0] != labels.shape[0]:
            raise ValueError(
                f"`router_labels` holds {labels.shape[0]} labels but a router received tokens of shape "
                f"{tuple(token_shape)}; pass one label per sample of the batch (batch dimension first)."
            )
        per_token = labels.to(weights.device).view(-1, *([1] * (len(token_shape) - 1))).expand(token_shape)
        per_token = per_token.reshape(-1)
        labelled = per_token.ne(-100).to(weights.dtype) * weights
        experts = torch.nn.functional.one_hot(per_token.clamp_min(0), num_experts // copies).to(weights.dtype)
        targets = experts.repeat_interleave(copies, dim=-1) * labelled.unsqueeze(-1)
        return cls(targets, labelled.sum().clamp_min(1.0))

    def target_probability(self, probs: torch.Tensor) -> torch.Tensor:
        """Per token, the probability the router gives the labelled expert's slots ((tokens,); 0 unlabelled)."""
        return (flat_probs(probs) * self.targets).sum(-1)


def label_loss(probs: torch.Tensor, labels: RouterLabels) -> torch.Tensor:
    """Mean over the labelled tokens of `-log p(labelled expert)` (its slots summed)."""
    tiny = torch.finfo(probs.dtype).tiny
    labelled = labels.targets.amax(-1)  # 1 for a labelled token, else 0
    return -(labels.target_probability(probs).clamp_min(tiny).log() * labelled).sum() / labels.count


def label_loss_gradient(probs: torch.Tensor, labels: RouterLabels) -> torch.Tensor:
    """The gradient of `label_loss` with respect to `probs` ((..., E)): `-1 / (count * p(labelled expert))` on the
    labelled expert's slots, 0 elsewhere (a probability below float32's smallest normal counts as that)."""
    tiny = torch.finfo(probs.dtype).tiny
    scale = -1.0 / (labels.target_probability(probs).clamp_min(tiny) * labels.count)
    return (labels.targets * scale.unsqueeze(-1)).reshape(probs.shape)


@dataclass(frozen=True)
class RouterLossSettings:
    """alpha, lambda and the entropy sign of one adapter for one forward, whether its balance statistics are taken
    over the global batch (`rsl_balance_scope`), the weight of its label loss (`router_label_weight`) and the router
    slots each of its experts takes (2 under `router_init="arrow"`)."""

    balance_weight: float
    entropy_weight: Union[float, torch.Tensor]
    entropy_sign: int
    global_balance: bool = False
    label_weight: float = 0.0
    label_copies: int = 1


class RouterLossParts(NamedTuple):
    """One router's loss in one forward: the weighted term and its unweighted parts (`label`: 0 without labels)."""

    term: torch.Tensor
    balance: torch.Tensor
    entropy: torch.Tensor
    label: torch.Tensor


def flat_probs(probs: torch.Tensor) -> torch.Tensor:
    """A router's probabilities as (tokens, E)."""
    return probs.reshape(-1, probs.shape[-1])


def balance_term(probs: torch.Tensor, usage: RouterUsage) -> torch.Tensor:
    """E * sum_i pbar_i * fbar_i over all E experts of the router (`probs`: (..., E) over its tokens)."""
    pbar = (flat_probs(probs) * usage.weights.unsqueeze(-1)).sum(0) / usage.balance_tokens
    return usage.num_experts * (pbar * usage.fraction).sum()


def router_loss_parts(probs: torch.Tensor, usage: RouterUsage) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance term, mean per-token entropy over the valid tokens) of one router's probabilities ((..., E))."""
    entropy = (token_entropy(flat_probs(probs)) * usage.weights).sum() / usage.num_tokens
    return balance_term(probs, usage), entropy


def specialization_loss(probs: torch.Tensor, usage: RouterUsage, settings: RouterLossSettings) -> RouterLossParts:
    """One router's RSL, `alpha * balance + sign * lambda * entropy`, plus `label_weight * label` with labels, of
    its probabilities ((..., E)), as detached figures: its gradient reaches the router in closed form
    (`specialization_loss_gradient`)."""
    with torch.no_grad():
        balance, entropy = router_loss_parts(probs, usage)
        term = settings.balance_weight * balance + settings.entropy_sign * settings.entropy_weight * entropy
        label = label_loss(probs, usage.labels) if usage.labels is not None else torch.zeros_like(balance)
        term = term + settings.label_weight * label
    return RouterLossParts(term, balance, entropy, label)


def specialization_loss_gradient(probs: torch.Tensor, usage: RouterUsage, settings: RouterLossSettings) -> torch.Tensor:
    """The gradient of `specialization_loss`'s term with respect to `probs` ((..., E)), in closed form.

    What autograd gives, without building and running a graph in every router's backward: the balance term is
    linear in the mean probabilities (its constants are `usage`), and a token's entropy `-sum p log p` has the
    gradient `-(log p + 1)`, or `-log(tiny)` where `p` lies below the clamp that keeps the logarithm finite.
    Padding tokens (weight 0 in `usage`) get zero.
    """
    tiny = torch.finfo(probs.dtype).tiny
    entropy_gradient = -(probs.clamp_min(tiny).log() + (probs >= tiny).to(probs.dtype)) / usage.num_tokens
    balance_gradient = usage.num_experts * usage.fraction / usage.balance_tokens
    gradient = settings.balance_weight * balance_gradient + settings.entropy_sign * settings.entropy_weight * (
        entropy_gradient
    )
    gradient = gradient * usage.weights.reshape(*probs.shape[:-1], 1)
    if usage.labels is not None:  # padding and unlabelled tokens have target rows of 0
        gradient = gradient + settings.label_weight * label_loss_gradient(probs, usage.labels)
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
