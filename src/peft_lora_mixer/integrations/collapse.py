"""Noticing a collapsed router in the routing statistics, and saying what to try.

A router has collapsed when one expert takes nearly every token (top-1) or an expert is in no token's top-k: its
projection then computes one expert, or never another one, whatever the input. Trained routers can stall there
for good (a domain routed to the wrong expert), and the task loss alone does not show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from ..routing_loss.stats import ModuleRoutingStats

DOMINANT_SHARE = 0.95  # one expert is the top-1 choice of at least this share of the tokens
MIN_TOKENS = 256  # fewer tokens than this since the last check decide nothing: an unused expert may be chance


class RoutingCollapseWarning(UserWarning):
    """A router's usage has collapsed (see `find_collapses`); filter this category to silence it."""


@dataclass(frozen=True)
class Collapse:
    """One module's collapse: `dominant` is (expert, its top-1 share) when one expert takes nearly all tokens,
    `unused` the experts in no token's top-k."""

    module: str
    tokens: int
    dominant: Optional[tuple[int, float]]
    unused: tuple[int, ...]

    def describe(self) -> str:
        parts = []
        if self.dominant:
            parts.append(f"expert {self.dominant[0]} is the first choice of {self.dominant[1]:.0%} of tokens")
        if self.unused:
            parts.append(f"expert{'s' * (len(self.unused) > 1)} {', '.join(map(str, self.unused))} never chosen")
        return f"{self.module} ({'; '.join(parts)}, over {self.tokens} tokens)"


def find_collapses(
    stats: Mapping[str, ModuleRoutingStats],
    dominant_share: float = DOMINANT_SHARE,
    min_tokens: int = MIN_TOKENS,
    copies: int = 1,
) -> list[Collapse]:
    """The modules of `stats` (from `model.routing_stats()`) whose routing has collapsed, over at least
    `min_tokens` tokens; a module with one expert cannot collapse. `copies`: router slots per expert (2 with
    router_init='arrow', whose pair of slots +v_e / -v_e is one expert: one slot of a pair may rightly stay unused)."""
    collapses = []
    for name, module in stats.items():
        usage, top_k_usage = (values.reshape(-1, copies).sum(-1) for values in (module.usage, module.top_k_usage))
        if module.tokens < min_tokens or usage.numel() < 2:
            continue
        share, expert = usage.max(0)
        dominant = (int(expert), float(share)) if float(share) >= dominant_share else None
        unused = tuple(int(i) for i in (top_k_usage == 0).nonzero().flatten())
        if dominant or unused:
            collapses.append(Collapse(name, module.tokens, dominant, unused))
    return collapses


def collapse_message(collapses: list[Collapse], modules: int) -> str:
    """Which modules collapsed, how, and what to try."""
    shown = "; ".join(collapse.describe() for collapse in collapses[:5])
    more = f"; and {len(collapses) - 5} more" if len(collapses) > 5 else ""
    return (
        f"Routing has collapsed in {len(collapses)} of {modules} routed modules: {shown}{more}. Such a router "
        "computes the same expert(s) for every token and may stay there. Try: a larger `rsl_balance_weight` (or "
        "`add_routing_loss=True` if the RSL is off), a lower router learning rate, routers that start from the "
        "experts (`router_init='arrow'`), and batches that mix every domain. `model.routing_stats()` shows each "
        "module's expert usage."
    )
