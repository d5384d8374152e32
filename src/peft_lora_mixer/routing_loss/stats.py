"""Routing statistics per adapted module: how often each expert is chosen and how sharp the choice is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss import RouterUsage, flat_probs, token_entropy


@dataclass(frozen=True)
class ModuleRoutingStats:
    """Routing of one module over the tokens seen since the statistics were last reset (padding excluded).

    `usage[i]`: fraction of tokens whose top-1 expert is i (sums to 1), picked as routing picks it (by logit). `top_k_usage[i]`: fraction whose top-k
    holds i. `probability[i]`: mean router probability of i. `entropy`: mean per-token entropy in nats.
    """

    tokens: int
    usage: torch.Tensor
    top_k_usage: torch.Tensor
    probability: torch.Tensor
    entropy: float


class RoutingStatsAccumulator:
    """Running sums per module, kept on the routers' device until read (no synchronisation while training)."""

    def __init__(self) -> None:
        self._sums: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, probs: torch.Tensor, usage: RouterUsage) -> None:
        """Add one forward's probabilities ((..., E) over its tokens) of module `name`, with their usage (which
        holds the padding weights and the top-k fraction)."""
        flat = flat_probs(probs).detach()
        weights = usage.weights.unsqueeze(-1)
        count = usage.weights.sum()
        top1 = (torch.zeros_like(flat).scatter(-1, usage.choices[:, :1], 1.0) * weights).sum(0)
        new = [
            count,
            top1,
            usage.fraction * count,
            (flat * weights).sum(0),
            (token_entropy(flat) * usage.weights).sum(),
        ]
        old = self._sums.get(name)
        self._sums[name] = new if old is None else [a + b for a, b in zip(old, new)]

    def summary(self) -> dict[str, ModuleRoutingStats]:
        result = {}
        for name, (count, top1, top_k_hits, prob_sum, entropy_sum) in self._sums.items():
            denominator = count.clamp_min(1.0)
            result[name] = ModuleRoutingStats(
                tokens=int(count.item()),
                usage=(top1 / denominator).cpu(),
                top_k_usage=(top_k_hits / denominator).cpu(),
                probability=(prob_sum / denominator).cpu(),
                entropy=(entropy_sum / denominator).item(),
            )
        return result

    def reset(self) -> None:
        self._sums.clear()


def summarize(stats: dict[str, ModuleRoutingStats]) -> dict[str, float]:
    """Model-wide figures for a log: mean entropy, and the balance of top-1 usage (1 = every expert equally used).

    Balance is the entropy of each module's usage divided by log(E), averaged over modules.
    """
    if not stats:
        return {}
    entropies = [module.entropy for module in stats.values()]
    balances = [usage_balance(module.usage) for module in stats.values()]
    return {"routing/entropy": sum(entropies) / len(entropies), "routing/balance": sum(balances) / len(balances)}


def usage_balance(usage: torch.Tensor) -> float:
    """Normalised entropy of a usage distribution: 1 when uniform over its experts, 0 when one expert takes all."""
    if usage.numel() < 2:
        return 1.0
    return (token_entropy(usage) / torch.log(torch.tensor(float(usage.numel())))).item()
