"""How each token is routed, per adapted projection: for reading a trained mixer on real text.

Experts may adapt different projections (plug-and-play LoRAs of different target sets). A gate given to an expert
with no weights on a projection changes nothing there, by design (see `LoraMixerLayer.router_logits`), so every view
here counts it as "no change", never as that expert: an expert alone on a projection would otherwise seem chosen
wherever the others are.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .layer import LoraMixerLayer, iter_mixer_layers
from .routing import gates_from_logits

NO_CHANGE = "no change"


def applied_gates(layer: LoraMixerLayer, tokens: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """The gates `layer` applies to `tokens` (..., in_features) in the forward, (tokens x E) float32, computed without
    telling the routing observer (this is a second look, not a forward)."""
    settings = layer.routing[adapter_name]
    logits = layer.router_logits(tokens.reshape(-1, layer.in_features), adapter_name)
    return gates_from_logits(logits, None, settings.mode, settings.top_k)


def experts_present(layer: LoraMixerLayer, adapter_name: str) -> torch.Tensor:
    """(E,) bool: which experts have weights (at least one rank slot) on this projection."""
    slots = layer.loramixer_slot_expert[adapter_name]
    return torch.bincount(slots.cpu(), minlength=layer.routing[adapter_name].num_experts) > 0


@contextmanager
def recorded_gates(
    model: nn.Module, adapter_name: str = "default"
) -> Iterator[tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]]:
    """Record, for every forward inside the block, the gates each mixer layer applies to each token.

    Yields `(gates, present)`: `gates[module]` is a list with one (tokens x E) float32 tensor per forward, `present`
    the module's `experts_present`.
    """
    gates: dict[str, list[torch.Tensor]] = {}
    present: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in iter_mixer_layers(model, adapter_name):
        present[name] = experts_present(module, adapter_name)

        def record(layer: LoraMixerLayer, args: tuple, output, name: str = name) -> None:
            with torch.no_grad():
                gates.setdefault(name, []).append(applied_gates(layer, args[0], adapter_name).cpu())

        handles.append(module.register_forward_hook(record))
    try:
        yield gates, present
    finally:
        for handle in handles:
            handle.remove()


def layer_index(module_name: str) -> Optional[int]:
    """The index of the layer a module belongs to: the first number among its dotted name's parts."""
    return next((int(part) for part in module_name.split(".") if part.isdigit()), None)


def within_layers(gates: dict[str, torch.Tensor], layers: Optional[Sequence[int]]) -> dict[str, torch.Tensor]:
    """The entries of the modules in `layers` (all when None); an error naming the adapted layers if none is."""
    if layers is None:
        return gates
    kept = {name: value for name, value in gates.items() if layer_index(name) in set(layers)}
    if not kept:
        adapted = sorted({layer_index(name) for name in gates} - {None})
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


def expert_mix(gates: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
    """(tokens, E + 1): each token's gate per expert, averaged over the projections, counting an expert only on the
    projections it adapts; the last column is the gate given to experts absent from a projection (no change)."""
    rows = []
    for name, module_gates in gates.items():
        kept = module_gates * present[name]
        rows.append(torch.cat([kept, (module_gates - kept).sum(-1, keepdim=True)], dim=-1))
    return torch.stack(rows).mean(0)


def format_expert_mix(tokens: list[str], mix: torch.Tensor, names: list[str], projections: int) -> str:
    """One row per token: its mean gate (%) per expert and for "no change", and the largest of them."""
    columns = [*names, NO_CHANGE]
    token_width = min(max(len(token) for token in tokens), 24) + 2
    widths = [max(len(column), 5) for column in columns]
    header = f"{'token':<{token_width}}" + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths)) + "  top"
    lines = [
        f"expert mix over {projections} projections (mean gate, %; {NO_CHANGE!r}: gates of experts absent from a "
        "projection)",
        header,
    ]
    for token, shares in zip(tokens, mix):
        cells = " ".join(f"{100 * share:>{w}.0f}" for share, w in zip(shares.tolist(), widths))
        lines.append(f"{token[: token_width - 2]:<{token_width}}{cells}  {columns[int(shares.argmax())]}")
    return "\n".join(lines)


def format_choices(
    tokens: list[str], gates: dict[str, torch.Tensor], present: dict[str, torch.Tensor], names: list[str]
) -> str:
    """One row per token, one column per adapted module (its name past the common prefix): the name of the token's
    top-1 expert there, or '-' where that expert is absent from the module (no change)."""
    headers = _without_common_prefix(list(gates))
    cells_by_module = []
    for module, module_gates in gates.items():
        chosen = module_gates.argmax(-1).tolist()
        cells_by_module.append([names[e] if present[module][e] else "-" for e in chosen])
    token_width = min(max(len(token) for token in tokens), 24) + 2
    widths = [max(len(header), *(len(cell) for cell in cells)) for header, cells in zip(headers, cells_by_module)]
    lines = [
        "top-1 expert per projection ('-': an expert absent from that projection, so no change there)",
        f"{'token':<{token_width}}" + " ".join(f"{h:>{w}}" for h, w in zip(headers, widths)),
    ]
    for position, token in enumerate(tokens):
        cells = " ".join(f"{cells[position]:>{w}}" for cells, w in zip(cells_by_module, widths))
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
