"""Which expert each token chose, per adapted projection: for reading a trained mixer on real text."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoraMixerLayer, iter_mixer_layers


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


def layer_index(module_name: str) -> Optional[int]:
    """The index of the layer a module belongs to: the first number among its dotted name's parts."""
    return next((int(part) for part in module_name.split(".") if part.isdigit()), None)


def within_layers(choices: dict[str, torch.Tensor], layers: Optional[Sequence[int]]) -> dict[str, torch.Tensor]:
    """The choices of the modules in `layers` (all when None); an error naming the adapted layers if none is."""
    if layers is None:
        return choices
    kept = {name: chosen for name, chosen in choices.items() if layer_index(name) in set(layers)}
    if not kept:
        adapted = sorted({layer_index(name) for name in choices} - {None})
        raise ValueError(f"No adapted projection in layers {list(layers)}; the mixer adapts layers {adapted}.")
    return kept


def token_texts(tokenizer, input_ids: list[int]) -> list[str]:
    """Each token as the text it stands for (' add', not the byte-level BPE piece 'Ġadd'), quoted."""
    return [repr(tokenizer.convert_tokens_to_string([piece])) for piece in tokenizer.convert_ids_to_tokens(input_ids)]


def expert_names(config) -> list[str]:
    """Short names for the experts: each source's last path part (a folder or a Hub repo), else e0, e1, ..."""
    if not config.experts:
        return [f"e{index}" for index in range(config.num_experts)]
    return [source.label.rstrip("/").split("/")[-1].split("@")[0] for source in config.expert_sources]


def expert_mix(choices: dict[str, torch.Tensor], num_experts: int) -> torch.Tensor:
    """(tokens, experts): the share of the adapted projections whose top-1 expert for each token is each expert."""
    chosen = torch.stack([ids.reshape(-1) for ids in choices.values()])  # (modules, tokens)
    return F.one_hot(chosen, num_experts).float().mean(0)


def format_expert_mix(tokens: list[str], choices: dict[str, torch.Tensor], names: list[str]) -> str:
    """One row per token: the percentage of projections routed to each expert, and the most chosen expert."""
    mix = expert_mix(choices, len(names))
    token_width = min(max(len(token) for token in tokens), 24) + 2
    widths = [max(len(name), 5) for name in names]
    header = f"{'token':<{token_width}}" + " ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + "  top"
    lines = [f"expert mix over {len(choices)} projections (% choosing each expert first)", header]
    for token, shares in zip(tokens, mix):
        cells = " ".join(f"{100 * share:>{w}.0f}" for share, w in zip(shares.tolist(), widths))
        lines.append(f"{token[: token_width - 2]:<{token_width}}{cells}  {names[int(shares.argmax())]}")
    return "\n".join(lines)


def format_choices(tokens: list[str], choices: dict[str, torch.Tensor]) -> str:
    """One row per token, one column per adapted module (its name past the common prefix), the top-1 expert."""
    headers = _without_common_prefix(list(choices))
    token_width = min(max(len(token) for token in tokens), 24) + 2
    widths = [len(header) for header in headers]
    lines = [f"{'token':<{token_width}}" + " ".join(f"{h:>{w}}" for h, w in zip(headers, widths))]
    for position, token in enumerate(tokens):
        cells = " ".join(f"{int(chosen.reshape(-1)[position]):>{w}}" for chosen, w in zip(choices.values(), widths))
        lines.append(f"{token[: token_width - 2]:<{token_width}}{cells}")
    return "\n".join(lines)


def _without_common_prefix(names: list[str]) -> list[str]:
    """'model.layers.0.self_attn.q_proj' -> '0.self_attn.q_proj' when every name starts with 'model.layers.' (the
    layer index always stays)."""
    parts = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] and not p[common].isdigit() for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]
