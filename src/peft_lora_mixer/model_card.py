"""The model card of a LoRA-Mixer adapter: PEFT's card plus one section per adapter saying what the mixture is made of.

A section is rendered from a `CardSummary`, plain data that the adapter's config hands over, so this module imports
nothing of the package. Each section sits between two HTML comments naming its adapter, so writing it again (each
save, each push) replaces it and leaves the rest of the card, including anything the user wrote, as it was.

When it is written, with no PEFT class changed: `PeftModel.save_pretrained` writes PEFT's card, then saves each
adapter's config, and `LoraMixerConfig.save_pretrained` adds its section there (`card_folder` finds the card and the
adapter's name). `push_to_hub` then overwrites README.md with a card of transformers' own (the repository's current
card, or a template) just before uploading, so a `PeftModel` that saved a LoRA-Mixer adapter gets, on that instance
only, an upload step that writes PEFT's card and our sections again on the card about to be uploaded
(`keep_card_on_push`).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from huggingface_hub import ModelCard
from peft import PeftModel

SECTION_START = "<!-- lora-mixer:start -->"
SECTION_END = "<!-- lora-mixer:end -->"
TAG = "lora-mixer"
PEFT_TYPE = "LORAMIXER"  # our `peft_type`, as a plain string (the config's enum member compares equal to it)
_README = "README.md"


@dataclass(frozen=True)
class CardSummary:
    """What the card says about one adapter, as plain data."""

    num_experts: int
    settings: dict[str, Any]  # the routing settings the routers were trained with, by config field name
    experts: tuple[dict[str, Any], ...]  # the pinned expert references; empty for a mixer of new experts
    trainable_experts: bool
    stores_expert_weights: bool


def write_section(folder: str, adapter_name: str, summary: CardSummary, repo_id: Optional[str] = None) -> None:
    """Write (or rewrite) the section of adapter `adapter_name` and our tag into `folder/README.md`, which PEFT has
    already written."""
    path = os.path.join(folder, _README)
    card = ModelCard.load(path)
    card.data.tags = sorted(set(card.data.tags or ()) | {TAG})
    # the base model is named as PEFT names it in the metadata: from a transformers model's config, else not at all
    base_model = card.data.get("base_model")
    start, end = section_markers(adapter_name)
    block = f"{start}\n{_render(adapter_name, summary, base_model, repo_id)}\n{end}"
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


def card_folder(config_directory: str) -> Optional[tuple[str, str]]:
    """(folder of the card, adapter name) for a config PEFT saves into `config_directory`, or None without a card.

    PEFT saves the card in the save directory, the default adapter's config there too, and any other adapter's
    config in a subfolder named after it.
    """
    if os.path.isfile(os.path.join(config_directory, _README)):
        return config_directory, "default"
    parent = os.path.dirname(os.path.normpath(config_directory))
    if os.path.isfile(os.path.join(parent, _README)):
        return parent, os.path.basename(os.path.normpath(config_directory))
    return None


def keep_card_on_push(model: PeftModel) -> None:
    """Give this model (only) an upload step that puts PEFT's card and our sections back before uploading.

    A partial of a module-level function, so that the model still pickles and deep-copies (onto the copy).
    """
    if "_upload_modified_files" not in vars(model):
        model._upload_modified_files = functools.partial(_upload_with_card, model)


def _upload_with_card(model: PeftModel, working_dir: str, repo_id: str, *args: Any, **kwargs: Any) -> Any:
    model.create_or_update_model_card(working_dir)
    for name, config in model.peft_config.items():
        if getattr(config, "peft_type", None) == PEFT_TYPE:
            write_section(working_dir, name, config.card_summary(), repo_id)
    return type(model)._upload_modified_files(model, working_dir, repo_id, *args, **kwargs)


def _render(adapter_name: str, summary: CardSummary, base_model: Optional[str], repo_id: Optional[str]) -> str:
    title = "## LoRA-Mixer" + ("" if adapter_name == "default" else f" (adapter `{adapter_name}`)")
    base = f"`{base_model}`" if base_model else "the base model"
    lines = [
        title,
        "",
        f"A mixture of {summary.num_experts} LoRA experts on {base}, routed token by token by one linear router "
        "per adapted projection ([LoRA-Mixer](https://arxiv.org/abs/2507.00029), built with peft-lora-mixer).",
    ]
    if summary.experts:
        lines += ["", "| # | Expert | Revision | Projections | Ranks |", "|---|---|---|---|---|"]
        lines += [_expert_row(index, reference) for index, reference in enumerate(summary.experts)]
    lines += ["", "### Router training", ""]
    lines += [f"- `{name}`: {value!r}" for name, value in summary.settings.items()]
    if summary.experts:
        frozen = "trained together with the routers" if summary.trainable_experts else "frozen; only the routers"
        lines.append(f"- experts: {frozen}" + ("" if summary.trainable_experts else " were trained"))
        stored = (
            "the routers and the experts' weights"
            if summary.stores_expert_weights
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


def _expert_row(index: int, reference: dict[str, Any]) -> str:
    ranks = sorted({r for r, _ in reference["modules"].values()})
    modules = len(reference["modules"])
    if "path" in reference:
        return f"| {index} | local folder `{os.path.basename(reference['path'])}` | - | {modules} | {ranks} |"
    name = reference["id"] + (f" (`{reference['subfolder']}`)" if reference.get("subfolder") else "")
    link = f"[{name}](https://huggingface.co/{reference['id']})"
    requested = reference.get("requested_revision")
    revision = f"`{reference['revision']}`" + (f" (requested `{requested}`)" if requested else "")
    return f"| {index} | {link} | {revision} | {modules} | {ranks} |"
