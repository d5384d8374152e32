"""The contract between a router and what watches it in a forward (the RSL and the routing statistics): what the
router shows (`RouterObservation`) and what the watcher gives back (`RoutingObserver.observe`). The watcher reads
nothing else of the layer."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from ..routing import RouterSettings


class RouterObservation(NamedTuple):
    """One router's output in one forward, and all of its layer that the RSL and the statistics need.

    A tuple rather than a dataclass: one is built per router and forward, and `torch.compile` traces it for free.
    """

    layer_id: int  # `id()` of the layer: the key of its module name and of its preservation anchor
    adapter_name: str
    logits: torch.Tensor  # (..., E) float32, temperature applied: the top-k is picked from them, as routing does
    probs: torch.Tensor  # (..., E) softmax of `logits`, with autograd: the RSL's gradient node goes on it
    token_shape: torch.Size  # the shape the tokens had (batch first), matched with the padding masks
    settings: RouterSettings  # how the layer routes this adapter (mode, top_k: fbar counts the top-k)
    experts: tuple[torch.Tensor, torch.Tensor]  # the adapter's A_cat (sum r_e, in) and B_cat (out, sum r_e) here


class RoutingObserver(Protocol):
    """Watches the routers of a model during a forward (`routing_loss.collector.RoutingCollector`)."""

    def observe(self, router: RouterObservation) -> torch.Tensor:
        """The probabilities the layer routes with: `router.probs`, or an identity of them whose backward adds the
        router's RSL gradient."""
        ...
