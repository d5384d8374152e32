"""The rows of the benchmark: the base model and the adapters compared, each applied to a fresh base model."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from peft import LoraConfig, PeftModel, XLoraConfig, get_peft_model
from transformers import PreTrainedModel

import peft_lora_mixer  # noqa: F401  (registers LoRA-Mixer with PEFT)
from peft_lora_mixer import LoraMixerConfig

from .workloads import Workload

REFERENCE = "lora-r8"  # every ratio is taken against this row, measured in the same run
COMPILED_REFERENCE = "lora-r8-compiled"  # ...or, for a compiled row, against PEFT LoRA r=8 compiled


@dataclass(frozen=True)
class Variant:
    """One row: `kind` is base, lora, xlora or mixer; r is the (per-expert) rank.

    `on_lora_targets`: the mixer on the modules PEFT LoRA adapts, for a like-for-like comparison where LoRA
    refuses some of the mixer's targets (Mamba's out_proj). `compiled`: trained under `torch.compile` and generating
    with a static cache compiled as transformers compiles decoding (`compile_config`).
    """

    kind: str
    r: int = 8
    num_experts: int = 0
    top_k: int = 0
    routing: str = "hard_soft"
    on_lora_targets: bool = False
    compiled: bool = False

    @property
    def name(self) -> str:
        return self._eager_name + ("-compiled" if self.compiled else "")

    @property
    def _eager_name(self) -> str:
        if self.kind == "base":
            return "base"
        if self.kind == "lora":
            return f"lora-r{self.r}"
        if self.kind == "xlora":
            return f"xlora-{self.num_experts}x{self.r}-k{self.top_k}"
        suffix = "" if self.routing == "hard_soft" else f"-{self.routing}"
        suffix += "-on-lora-targets" if self.on_lora_targets else ""
        return f"mixer-e{self.num_experts}-k{self.top_k}{suffix}"


def reference_of(row: str) -> str:
    """The row whose measurement, taken just before, `row`'s ratio divides by: PEFT LoRA r=8 compiled for a
    compiled row, PEFT LoRA r=8 for the others (the compiled reference included)."""
    return COMPILED_REFERENCE if row.endswith("-compiled") and row != COMPILED_REFERENCE else REFERENCE


def default_variants(
    workload: Workload, routings: tuple[str, ...] = ("hard_soft",), compiled: bool = False
) -> list[Variant]:
    """Every row of `workload`; with `compiled`, also a compiled twin of each row but X-LoRA's."""
    rows = [Variant("base"), Variant("lora", r=8), Variant("lora", r=64), Variant("xlora", num_experts=8, top_k=2)]
    rows += [
        Variant("mixer", num_experts=e, top_k=k, routing=routing)
        for routing in routings
        for e in (2, 4, 8, 16, 32, 64)
        for k in (1, 2)
    ]
    if workload.lora_target_modules != workload.target_modules:
        rows.append(Variant("mixer", num_experts=8, top_k=2, on_lora_targets=True))
    if compiled:
        rows += [replace(row, compiled=True) for row in rows if row.kind != "xlora"]
    return rows


def apply_variant(model: PreTrainedModel, variant: Variant, workload: Workload) -> PreTrainedModel:
    """`model` with the row's adapter on the workload's target modules (trainable as each method trains)."""
    mixer_targets = variant.kind == "mixer" and not variant.on_lora_targets
    targets = list(workload.target_modules if mixer_targets else workload.lora_target_modules)
    if variant.kind == "base":
        return model
    if variant.kind == "lora":
        return get_peft_model(model, LoraConfig(r=variant.r, lora_alpha=variant.r, target_modules=targets))
    if variant.kind == "mixer":
        config = LoraMixerConfig(
            r=variant.r,
            lora_alpha=variant.r,
            num_experts=variant.num_experts,
            top_k=variant.top_k,
            routing=variant.routing,
            target_modules=targets,
        )
        return get_peft_model(model, config)
    if variant.kind == "xlora":
        return _xlora(model, variant, workload)
    raise ValueError(f"Unknown variant kind {variant.kind!r}")


def _xlora(model: PreTrainedModel, variant: Variant, workload: Workload) -> PeftModel:
    """X-LoRA as PEFT ships it: LoRA adapters saved to disk, then a classifier (the trainable part) over them."""
    folder = Path(tempfile.mkdtemp(prefix="xlora-experts-"))
    adapters = {}
    for i in range(variant.num_experts):
        lora = get_peft_model(
            model,
            LoraConfig(
                r=variant.r,
                lora_alpha=variant.r,
                target_modules=list(workload.lora_target_modules),
                init_lora_weights=False,
            ),
        )
        lora.save_pretrained(folder / str(i))
        model = lora.unload()
        adapters[str(i)] = str(folder / str(i))
    model.config.use_cache = False  # X-LoRA refuses a model with use_cache on (and generates without a KV cache)
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=workload.hidden_size,
        adapters=adapters,
        top_k_lora=variant.top_k,
        xlora_depth=1,
    )
    return get_peft_model(model, config)


def parse_only(names: list[str] | None, rows: list[Variant]) -> list[Variant]:
    """The rows named in `names`, with the reference rows their ratios need."""
    if not names:
        return rows
    unknown = set(names) - {row.name for row in rows}
    if unknown:
        raise SystemExit(f"Unknown rows {sorted(unknown)}; choose among {[row.name for row in rows]}")
    needed = set(names) | {reference_of(name) for name in names} | {REFERENCE}
    return [row for row in rows if row.name in needed]
