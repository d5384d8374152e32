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
from peft import PeftModel
from torch import nn

from .layer import LoraMixerLayer, iter_mixer_layers
from .model import LoraMixerModel
from .routing_loss.collector import GateRecord

NO_CHANGE = "no change"


def experts_present(layer: LoraMixerLayer, adapter_name: str) -> torch.Tensor:
    """(E,) bool: which experts have weights (at least one rank slot) on this projection."""
    slots = layer.loramixer_slot_expert[adapter_name]
    return torch.bincount(slots.cpu(), minlength=layer.router_settings[adapter_name].num_experts) > 0


@contextmanager
def recorded_gates(
    model: nn.Module, adapter_name: Optional[str] = None
) -> Iterator[tuple[dict[str, list[GateRecord]], dict[str, torch.Tensor]]]:
    """Record, for every forward inside the block, the gates each mixer layer of the adapter (default: the active
    one) applies to each token, from the forward's own record of its router (`LoraMixerModel.recording_gates`).

    Yields `(records, present)`: `records[module]` is a list with one `GateRecord` ((tokens x E) float32 gates, and
    which tokens count) per forward, `present[module]` the module's `experts_present`.
    """
    tuner, name = mixer_adapter(model, adapter_name)
    present = {module: experts_present(layer, name) for module, layer in iter_mixer_layers(tuner.model, name)}
    with tuner.recording_gates(name) as records:
        yield records, present


def mixer_adapter(model: nn.Module, adapter_name: Optional[str]) -> tuple[LoraMixerModel, str]:
    """The LoRA-Mixer tuner of `model` and the name of the adapter to read: `adapter_name`, by default the active
    one. It must be the only active adapter: the gates of one adapter depend on what the others add before it."""
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, LoraMixerModel):
        raise TypeError(f"Expected a model with a LoRA-Mixer adapter (a PeftModel of one), got {type(model).__name__}.")
    active = list(tuner.active_adapters)
    name = adapter_name if adapter_name is not None else active[0]
    if name not in tuner.peft_config:
        raise ValueError(f"No adapter named {name!r}; the model's adapters: {sorted(tuner.peft_config)}.")
    if active != [name]:
        raise ValueError(
            f"Adapter {name!r} must be the only active adapter to read its gates (active: {active}); call "
            f"`model.set_adapter({name!r})` first."
        )
    return tuner, name


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
