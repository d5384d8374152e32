"""What a static export fixed, said where a user of the plain LoRA will look: its model card, and the command's output.

The gates are summarised per kind of projection (a module name's last part: `q_proj`, `k_proj`...), each expert's
gate averaged over the projections of that kind where it has weights; the gates routed to experts absent from a
projection are reported apart, as "no change", since that is what they do there (`inspection.expert_mix`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import ModelCard, ModelCardData

from .inspection import NO_CHANGE, expert_mix, expert_names, experts_present
from .layer import iter_mixer_layers
from .model import LoraMixerModel

ALL = "all"


def gate_summary(
    tuner: LoraMixerModel, adapter_name: str, gates: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{"all" and each kind of projection: (E + 1,) mean gates, the last one "no change"}; NaN for an expert with
    weights on no projection of that kind."""
    present = {
        module: experts_present(layer, adapter_name) for module, layer in iter_mixer_layers(tuner.model, adapter_name)
    }
    kinds: dict[str, list[str]] = defaultdict(list)
    for module in sorted(gates):
        kinds[module.rsplit(".", 1)[-1]].append(module)
    summary = {}
    for kind, modules in {ALL: sorted(gates), **dict(sorted(kinds.items()))}.items():
        mix = expert_mix({module: gates[module] for module in modules}, present)
        anywhere = torch.stack([present[module] for module in modules]).any(0)
        mix[:-1][~anywhere] = float("nan")
        summary[kind] = mix
    return summary


def format_gate_table(summary: Mapping[str, torch.Tensor], names: Sequence[str]) -> str:
    """A Markdown table: one row per expert and one for "no change", one column per kind of projection."""
    kinds = list(summary)
    lines = ["| expert | " + " | ".join(f"{kind}" for kind in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for index, name in enumerate([*names, NO_CHANGE]):
        cells = [_gate(summary[kind][index].item()) for kind in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_static_card(
    output_dir: Path,
    tuner: LoraMixerModel,
    adapter_name: str,
    summary: Mapping[str, torch.Tensor],
    source: Optional[str] = None,
    group: Optional[str] = None,
) -> None:
    """Write `output_dir/README.md`: what the LoRA was exported from, the gates it fixed, and what it no longer does."""
    config = tuner.peft_config[adapter_name]
    base = config.base_model_name_or_path
    names = expert_names(config)
    origin = f"the LoRA-Mixer adapter `{source}`" if source else "a LoRA-Mixer adapter"
    experts = (
        [f"- `{name}`: `{expert.label}`" for name, expert in zip(names, config.expert_sources)]
        if config.experts
        else [f"- `{name}`: expert {index}, trained with the mixer" for index, name in enumerate(names)]
    )
    calibration = f"the calibration text of group `{group}`" if group is not None else "the calibration text"
    lines = [
        "# Static export of a LoRA-Mixer adapter",
        "",
        f"A plain PEFT LoRA exported from {origin}"
        + (f" on `{base}`" if base else "")
        + f" ({config.num_experts} experts, routing `{config.routing}`, top-k {config.top_k}). Each projection's "
        f"router was replaced by its mean gates over {calibration}: this LoRA computes exactly the mixer with those "
        "fixed gates, and is **no longer routed per token**. Its rank is the sum of the experts' ranks on a "
        "projection (zero-padded to the largest sum).",
        "",
        "## Experts",
        "",
        *experts,
        "",
        "## Fixed gates",
        "",
        "Mean gate per expert, over all adapted projections and per kind of projection, counting an expert only on "
        f"the projections it adapts; '{NO_CHANGE}' is the gate routed to experts absent from a projection, which "
        "changes nothing there. '-': the expert adapts no projection of that kind.",
        "",
        format_gate_table(summary, names),
        "",
        "## Use",
        "",
        "Any engine that serves plain LoRA (vLLM, TGI, LoRAX) serves it; in Python, without peft-lora-mixer:",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        'model = PeftModel.from_pretrained(base_model, "<this folder>")',
        "```",
    ]
    data = ModelCardData(library_name="peft", base_model=base or None, tags=["lora", "lora-mixer-static"])
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(output_dir / "README.md")


def _gate(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"  # NaN: absent everywhere
