"""Heatmaps of expert usage per adapted module and per domain (needs the `plot` extra: matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from .routing_loss.stats import ModuleRoutingStats


def plot_usage_heatmap(
    stats_by_domain: Mapping[str, Mapping[str, ModuleRoutingStats]], path: Union[str, Path], top_k: bool = False
) -> Path:
    """Draw one heatmap per domain (rows: modules, columns: experts, colour: top-1 usage) into a PNG at `path`.

    `stats_by_domain` maps a domain name to `model.routing_stats()` collected on that domain's data, e.g.
    `{"code": ..., "math": ...}`; pass one entry for a single heatmap. `top_k=True` draws the top-k usage.
    """
    plt = _pyplot()
    if not stats_by_domain or not all(stats_by_domain.values()):
        raise ValueError("No routing statistics to plot: collect them with `model.collect_routing_stats()` first.")
    modules = list(next(iter(stats_by_domain.values())))
    figure, axes = plt.subplots(
        1,
        len(stats_by_domain),
        figsize=(2.5 + 1.5 * len(stats_by_domain), 1 + 0.3 * len(modules)),
        squeeze=False,
        sharey=True,
    )
    for ax, (domain, stats) in zip(axes[0], stats_by_domain.items()):
        rows = [(stats[m].top_k_usage if top_k else stats[m].usage).tolist() for m in modules]
        image = ax.imshow(rows, vmin=0.0, vmax=1.0, aspect="auto", cmap="viridis")
        ax.set_title(domain)
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(rows[0])))
    axes[0][0].set_yticks(range(len(modules)), labels=modules, fontsize=6)
    figure.colorbar(image, ax=axes[0].tolist(), label="top-k usage" if top_k else "top-1 usage")
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_token_mix(tokens: list[str], mix: torch.Tensor, columns: list[str], path: Union[str, Path]) -> Path:
    """Draw `inspect`'s expert mix (rows: tokens, columns: the experts and "no change", colour: mean gate) to a PNG."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(2 + 0.8 * len(columns), 1 + 0.25 * len(tokens)))
    image = ax.imshow(mix.numpy(), vmin=0.0, vmax=1.0, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right")
    ax.set_yticks(range(len(tokens)), labels=tokens, fontsize=7)
    figure.colorbar(image, ax=ax, label="mean gate over the projections")
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install 'peft-lora-mixer[plot]'.") from error
    return plt
