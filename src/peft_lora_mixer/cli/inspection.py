"""Which expert each token chose, per adapted projection: for reading a trained mixer on real text."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..layer import LoraMixerLayer, iter_mixer_layers


@contextmanager
def recorded_choices(model: nn.Module, adapter_name: str = "default") -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record, for every forward inside the block, each mixer layer's top-1 expert per token.

    Yields `{module name: [tensor of expert ids, one per forward, shaped like the input's tokens]}`.
    """
    choices: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in iter_mixer_layers(model, adapter_name):

        def record(layer: LoraMixerLayer, args: tuple, output, name: str = name) -> None:
            with torch.no_grad():
                probs = layer.router_probs(args[0], adapter_name)
            choices.setdefault(name, []).append(probs.argmax(-1).cpu())

        handles.append(module.register_forward_hook(record))
    try:
        yield choices
    finally:
        for handle in handles:
            handle.remove()


def format_choices(tokens: list[str], choices: dict[str, torch.Tensor], width: int = 8) -> str:
    """A table: one row per token, one column per adapted module (shortened names), the chosen expert in cells."""
    modules = list(choices)
    short = [".".join(name.split(".")[-3:]) for name in modules]
    header = f"{'token':<{width + 2}}" + " ".join(f"{s[-12:]:>12}" for s in short)
    lines = [header]
    for position, token in enumerate(tokens):
        cells = " ".join(f"{int(choices[m].reshape(-1)[position]):>12}" for m in modules)
        lines.append(f"{repr(token)[:width + 2]:<{width + 2}}{cells}")
    return "\n".join(lines)
