"""Static export: a LoRA-Mixer adapter as one plain PEFT LoRA, each projection's experts weighted by fixed gates.

Serving engines (vLLM, TGI, LoRAX, llama.cpp) serve one plain LoRA per request and cannot route per token. With its
gates fixed, a projection's mixture is one LoRA again:

    sum_e g_e s_e B_e A_e x = (B_cat diag(g[slot] * s[slot])) A_cat x

of rank sum_e r_e: the experts' A as they are, each expert's gate times its scale folded into its columns of B, and
`lora_alpha = r`, so that PEFT's scaling is exactly 1 (rsLoRA and each expert's own alpha are already in `s`). An
expert absent from a projection has no columns there, so its share of the gate changes nothing, as in the mixer.
The fixed gates are the routers' mean gates over calibration text (`mean_gates`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import _find_minimal_target_modules
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from .export_card import gate_summary, write_static_card
from .inspection import mixer_adapter
from .layer import iter_mixer_layers
from .model import LoraMixerModel

Batch = Mapping[str, torch.Tensor]
PathLike = Union[str, os.PathLike]


def export_static_lora(
    model: PeftModel,
    calibration: Iterable[Batch],
    output_dir: PathLike,
    adapter_name: Optional[str] = None,
    source: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """Write the adapter, with each router replaced by its mean gates over `calibration`, as a plain PEFT LoRA.

    `calibration` holds the model's input batches (`input_ids`, `attention_mask`...); see `mean_gates` for which
    gates are averaged. The LoRA written to `output_dir` (`adapter_config.json`, `adapter_model.safetensors`) loads
    with `PeftModel.from_pretrained` in a program without this package, and computes exactly what the mixer computes
    with those gates. Its model card (`README.md`) says what it was exported from (`source`: the mixer's folder or
    Hub id) and which gates it fixed. Its rank is the largest sum of the experts' ranks over the projections;
    projections with fewer rank slots (experts absent there) are padded with zero slots, since engines read one rank
    per adapter. Bad inputs (an unknown adapter, no calibration tokens, an `output_dir` holding files) raise before
    anything is written. Returns the gates, by projection.
    """
    output_dir = empty_output_dir(output_dir)
    tuner, name = mixer_adapter(model, adapter_name)
    gates = mean_gates(model, calibration, name)
    _write_static_lora(tuner, name, gates, output_dir, source)
    return gates


def export_static_lora_per_group(
    model: PeftModel,
    groups: Mapping[str, Iterable[Batch]],
    output_dir: PathLike,
    adapter_name: Optional[str] = None,
    source: Optional[str] = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """`export_static_lora` once per named group of calibration batches (e.g. one per task), into
    `output_dir/<group>`: a deployment that knows a request's task serves that task's LoRA. Every group's gates are
    computed before anything is written. Returns the gates by group, then by projection."""
    output_dir = empty_output_dir(output_dir)
    if not groups:
        raise ValueError("No calibration groups were given; give at least one group of calibration text.")
    for group in groups:
        if not re.fullmatch(r"[\w.-]+", group) or group in (".", ".."):
            raise ValueError(f"Group name {group!r} cannot name a folder; use letters, digits, '_', '-' and '.'.")
    tuner, name = mixer_adapter(model, adapter_name)
    gates = {group: mean_gates(model, batches, name) for group, batches in groups.items()}
    for group, group_gates in gates.items():
        _write_static_lora(tuner, name, group_gates, output_dir / group, source, group)
    return gates


@torch.no_grad()
def mean_gates(
    model: PeftModel, calibration: Iterable[Batch], adapter_name: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Per adapted projection, the mean over the calibration tokens of the gates its router applies (float32, (E,)).

    The gates applied are those of the adapter's routing, after top-k and renormalisation: the softmax for `soft`;
    for `topk` and `hard_soft` the kept experts' renormalised weights and zero for the others (for `topk` with
    `top_k=1`, the kept expert's probability, so they sum to less than 1). An expert absent from a projection keeps
    its share, which changes nothing there. They are read from the forward's own record of each router
    (`LoraMixerModel.recording_gates`), and padding is left out as the routing loss leaves it out (the
    `attention_mask`; an encoder-decoder's decoder, its `decoder_attention_mask` or labelled positions). The model
    runs in eval mode, without gradients; the adapter must be the only active one.
    """
    tuner, name = mixer_adapter(model, adapter_name)
    modules = [module for module, _ in iter_mixer_layers(tuner.model, name)]
    training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with tuner.recording_gates(name) as records:
            for batch in calibration:
                model(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
    finally:
        model.train(training)
    sums, counts = {}, {}
    for module in modules:
        forwards = records.get(module, [])
        sums[module] = sum(((r.gates * r.weights.unsqueeze(-1)).sum(0).double().cpu() for r in forwards), 0.0)
        counts[module] = sum((r.weights.sum().item() for r in forwards), 0.0)
    unseen = sorted(module for module in modules if counts[module] == 0)
    if unseen:
        raise ValueError(
            f"The calibration text gave no tokens to {len(unseen)} of {len(modules)} adapted projections (e.g. "
            f"{unseen[0]!r}): give at least one batch with non-padding tokens (`attention_mask` 1) that reaches them."
        )
    return {module: (sums[module] / counts[module]).float() for module in modules}


def static_lora(
    tuner: LoraMixerModel, adapter_name: str, gates: Mapping[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The plain LoRA of the adapter with these fixed gates: its config and its state dict as PEFT saves it."""
    layers = dict(iter_mixer_layers(tuner.model, adapter_name))
    rank = max(layer.loramixer_A[adapter_name].shape[0] for layer in layers.values())
    state = {}
    for module, layer in layers.items():
        lora_A = layer.loramixer_A[adapter_name].detach()
        lora_B = layer.loramixer_B[adapter_name].detach()
        scaling = layer.loramixer_expert_scaling[adapter_name]
        slot_weight = (gates[module].to(scaling.device) * scaling)[layer.loramixer_slot_expert[adapter_name]]
        lora_B = (lora_B.float() * slot_weight.to(lora_B.device)).to(lora_B.dtype)
        padding = rank - lora_A.shape[0]
        state[f"base_model.model.{module}.lora_A.weight"] = F.pad(lora_A, (0, 0, 0, padding)).cpu().contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = F.pad(lora_B, (0, padding)).cpu().contiguous()
    mixer_config = tuner.peft_config[adapter_name]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # PEFT's scaling is then exactly 1: each expert's own scale is in B
        target_modules=minimal_target_modules(tuner.model, layers),
        lora_dropout=mixer_config.lora_dropout,
        fan_in_fan_out=any(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values()),
        base_model_name_or_path=mixer_config.base_model_name_or_path,
        revision=mixer_config.revision,
        task_type=mixer_config.task_type,
        inference_mode=True,
    )
    # LoraConfig keeps target_modules as a set, which PEFT writes in arbitrary order; a sorted list reads and diffs
    config.target_modules = sorted(config.target_modules)
    return config, state


def minimal_target_modules(model: nn.Module, targets: Iterable[str]) -> set[str]:
    """The shortest name suffixes that match exactly `targets` among `model`'s modules (e.g. {"q_proj", "v_proj"}
    instead of one full name per layer), found as PEFT condenses long target lists; the modules inside an adapted
    layer (its base layer, routers) are not the base model's and are left out of the comparison."""
    targets = set(targets)
    inside = tuple(f"{name}." for name in targets)
    others = [name for name, _ in model.named_modules() if name and name not in targets and not name.startswith(inside)]
    return _find_minimal_target_modules(targets, others)


def _write_static_lora(
    tuner: LoraMixerModel,
    adapter_name: str,
    gates: Mapping[str, torch.Tensor],
    output_dir: Path,
    source: Optional[str],
    group: Optional[str] = None,
) -> None:
    config, state = static_lora(tuner, adapter_name, gates)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(output_dir))
    save_file(state, str(output_dir / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    write_static_card(output_dir, tuner, adapter_name, gate_summary(tuner, adapter_name, gates), source, group)


def write_serving_folder(
    base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mixer: str, output_dir: PathLike
) -> None:
    """Save the base model, its tokenizer and the mixer (a folder or Hub id) into one folder, which transformers
    loads as it loads a plain LoRA's (`AutoModelForCausalLM.from_pretrained(folder)` finds the adapter beside the
    model): the folder `transformers serve` serves. The mixer is loaded onto `base_model` first, so a wrong pair fails
    before anything is written, then unloaded again; its files are PEFT's `save_pretrained` (experts pinned to the
    Hub stay references)."""
    output_dir = empty_output_dir(output_dir)
    model = PeftModel.from_pretrained(base_model, mixer)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    model.unload().save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def empty_output_dir(output_dir: PathLike) -> Path:
    """`output_dir` as a Path, refused if it holds anything: an export never mixes its files with others."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"Output folder {str(output_dir)!r} exists and is not empty; give a new or empty folder.")
    return output_dir
