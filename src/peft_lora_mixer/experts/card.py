"""The model card of a LoRA-Mixer adapter: PEFT's card plus a section saying what the mixture is made of.

Each adapter's section sits between two HTML comments naming it, so writing it again (each save, each push) replaces
it and leaves the rest of the card, including anything the user wrote, as it was.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import TYPE_CHECKING, Optional

from huggingface_hub import ModelCard

if TYPE_CHECKING:  # the config writes the card when PEFT saves it: a runtime import would be circular
    from ..config import LoraMixerConfig

SECTION_START = "<!-- lora-mixer:start -->"
SECTION_END = "<!-- lora-mixer:end -->"
TAG = "lora-mixer"
_ROUTER_FIELDS = ("routing", "top_k", "router_temperature")


def add_mixer_section(folder: str, adapter_name: str, config: LoraMixerConfig, repo_id: Optional[str] = None) -> None:
    """Write (or rewrite) the section of adapter `adapter_name` and our tag into `folder/README.md`, which PEFT has
    already written."""
    path = os.path.join(folder, "README.md")
    card = ModelCard.load(path)
    card.data.tags = sorted(set(card.data.tags or ()) | {TAG})
    base_model = config.base_model_name_or_path
    if base_model and not card.data.get("base_model"):
        card.data["base_model"] = base_model
    start, end = section_markers(adapter_name)
    block = f"{start}\n{_section(adapter_name, config, base_model, repo_id)}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(card.text):
        card.text = pattern.sub(lambda _: block, card.text)
    else:
        card.text = f"{block}\n\n{card.text.lstrip()}"
    card.save(path)


def section_markers(adapter_name: str) -> tuple[str, str]:
    """The comments around an adapter's section (the default adapter's are the plain ones)."""
    if adapter_name == "default":
        return SECTION_START, SECTION_END
    return SECTION_START.replace(" -->", f" {adapter_name} -->"), SECTION_END.replace(" -->", f" {adapter_name} -->")


def _section(adapter_name: str, config: LoraMixerConfig, base_model: Optional[str], repo_id: Optional[str]) -> str:
    title = "## LoRA-Mixer" + ("" if adapter_name == "default" else f" (adapter `{adapter_name}`)")
    base = f"`{base_model}`" if base_model else "the base model"
    references = config.resolved_experts or []
    lines = [
        title,
        "",
        f"A mixture of {config.num_experts} LoRA experts on {base}, routed token by token by one linear router "
        "per adapted projection ([LoRA-Mixer](https://arxiv.org/abs/2507.00029), built with peft-lora-mixer).",
    ]
    if references:
        lines += ["", "| # | Expert | Revision | Projections | Ranks |", "|---|---|---|---|---|"]
        for index, reference in enumerate(references):
            lines.append(_expert_row(index, reference))
    lines += ["", "### Router training", ""]
    lines += [f"- `{name}`: {getattr(config, name)!r}" for name in _training_fields(config)]
    if references:
        frozen = "trained together with the routers" if config.trainable_experts else "frozen; only the routers"
        lines.append(f"- experts: {frozen}" + ("" if config.trainable_experts else " were trained"))
        stored = (
            "the routers and the experts' weights"
            if config.stores_expert_weights
            else "the routers only; the experts are fetched at the pinned revisions above"
        )
        lines.append(f"- this checkpoint holds {stored}")
    lines += [
        "",
        "### Use",
        "",
        "```python",
        "import peft_lora_mixer  # registers LoRA-Mixer with PEFT (done by itself once the package is installed)",
        "from peft import PeftModel",
        "",
        f'model = PeftModel.from_pretrained(base_model, "{repo_id or "<this repository or folder>"}")',
        "```",
    ]
    return "\n".join(lines)


def _expert_row(index: int, reference: dict) -> str:
    ranks = sorted({r for r, _ in reference["modules"].values()})
    modules = len(reference["modules"])
    if "path" in reference:
        return f"| {index} | local folder `{os.path.basename(reference['path'])}` | - | {modules} | {ranks} |"
    name = reference["id"] + (f" (`{reference['subfolder']}`)" if reference.get("subfolder") else "")
    link = f"[{name}](https://huggingface.co/{reference['id']})"
    requested = reference.get("requested_revision")
    revision = f"`{reference['revision']}`" + (f" (requested `{requested}`)" if requested else "")
    return f"| {index} | {link} | {revision} | {modules} | {ranks} |"


def _training_fields(config: LoraMixerConfig) -> list[str]:
    """The router settings, plus any routing-loss settings (`rsl_*`) the config carries."""
    names = [field.name for field in fields(config)]
    return [name for name in names if name in _ROUTER_FIELDS or name.startswith("rsl_")]
