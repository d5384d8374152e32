"""Existing PEFT LoRA adapters as the experts of a mixer: read what the fetchers (`sources.py`) put on this machine,
refuse what is not a plain LoRA, check it against the base model.

Everything here runs before the model is modified, so a bad expert (wrong method, wrong base model, missing or
corrupt file, pickle-only checkpoint, unreachable Hub repository) raises an `ExpertError` naming it and leaves the
model as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from ..config import LoraMixerConfig
from ..layer import ExpertSpec, in_out_features, iter_mixer_layers
from .sources import ExpertError, ExpertSource, FetchedExpert, HubOptions, current_hub_options, fetch

PEFT_MODEL_PREFIX = "base_model.model."  # how a PeftModel's state dict and saved adapters name the base model
_ABSENT = ExpertSpec(0, 0.0)
_SOURCE_KEYS = ("id", "revision", "subfolder", "path")

# LoRA options that make the adapter something other than `W x + s B A x` on linear projections
_UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA rescales the base weight per column)",
    "lora_bias": "a trainable bias on lora_B",
    "alora_invocation_tokens": "activated LoRA (aLoRA acts only after its invocation tokens)",
    "use_qalora": "QA-LoRA (pools the input before lora_A)",
    "kasa_config": "KaSA (modifies the base weight's singular values)",
    "monteclora_config": "MonteCLoRA (samples the LoRA weights)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "arrow_config": "Arrow routing (already a mixture)",
    "layer_replication": "layer replication (changes the model's layer stack)",
    "target_parameters": "LoRA on raw parameters (`target_parameters`)",
    "modules_to_save": "fully trained extra modules (`modules_to_save`)",
    "trainable_token_indices": "trainable token embeddings",
}


@dataclass(frozen=True)
class Expert:
    """A LoRA adapter used as an expert. A Hub expert's `source.revision` is the commit sha that was resolved."""

    source: ExpertSource
    requested_revision: Optional[str]
    blocks: dict[str, ExpertSpec]

    def reference(self) -> dict[str, Any]:
        """The pinned reference written to `adapter_config.json` (`resolved_experts`)."""
        reference = self.source.to_dict()
        if self.source.is_hub:
            reference["requested_revision"] = self.requested_revision
        reference["modules"] = {name: [block.r, block.scaling] for name, block in sorted(self.blocks.items())}
        return reference

    @classmethod
    def from_reference(cls, reference: dict[str, Any]) -> Expert:
        """The expert a pinned reference describes, without its weights (they come from the mixer's checkpoint)."""
        source = ExpertSource.parse({key: reference[key] for key in _SOURCE_KEYS if key in reference})
        blocks = {name: ExpertSpec(int(r), float(scaling)) for name, (r, scaling) in reference["modules"].items()}
        return cls(source, reference.get("requested_revision"), blocks)


class ExpertSet:
    """The experts of one mixer adapter, in router order."""

    def __init__(self, experts: Sequence[Expert]):
        self.experts = list(experts)

    @property
    def module_names(self) -> list[str]:
        """Every projection adapted by at least one expert: the mixer's default targets."""
        return sorted({name for expert in self.experts for name in expert.blocks})

    def references(self) -> list[dict[str, Any]]:
        return [expert.reference() for expert in self.experts]

    def specs(self, module_name: str) -> list[ExpertSpec]:
        """Rank and scaling of each expert on `module_name`; rank 0 where the expert does not adapt it."""
        blocks = (expert.blocks.get(module_name) for expert in self.experts)
        return [block or _ABSENT for block in blocks]

    def check_covers(self, module_names: Iterable[str]) -> None:
        """Every projection the mixer targets needs at least one expert there."""
        uncovered = sorted(set(module_names) - set(self.module_names))
        if uncovered:
            raise ExpertError(
                f"`target_modules` selects {uncovered[:3]}{' ...' if len(uncovered) > 3 else ''}, which none of the "
                "experts adapts. Leave `target_modules` unset to target exactly the modules the experts adapt."
            )

    def factors(self, module_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The experts' A and B on `module_name`, concatenated in slot order; None when only their layout is known."""
        blocks = [expert.blocks[module_name] for expert in self.experts if module_name in expert.blocks]
        if not blocks or any(block.lora_A is None for block in blocks):
            return None
        return torch.cat([block.lora_A for block in blocks]), torch.cat([block.lora_B for block in blocks], dim=1)

    @torch.no_grad()
    def load_into(self, model: nn.Module, adapter_name: str, frozen: bool) -> None:
        """Write the experts' factors into the adapter's layers (every rank slot of A and B is an expert's)."""
        layers = dict(iter_mixer_layers(model, adapter_name))
        for key, layer in layers.items():
            factors = self.factors(key)
            if factors is not None:
                _copy_exactly(layer.loramixer_A, adapter_name, factors[0])
                _copy_exactly(layer.loramixer_B, adapter_name, factors[1])
            if frozen:
                layer.freeze_experts(adapter_name)

    def check_against(self, model: nn.Module) -> None:
        for expert in self.experts:
            check_against_model(expert, model)

    @classmethod
    def read(cls, sources: Sequence[ExpertSource], hub: HubOptions, allow_pickle: bool = False) -> ExpertSet:
        """Fetch and read every expert."""
        return cls([read_expert(source, fetch(source, hub), allow_pickle) for source in sources])

    @classmethod
    def from_references(
        cls,
        references: Sequence[dict[str, Any]],
        fetch_weights: bool,
        hub: HubOptions,
        allow_pickle: bool = False,
    ) -> ExpertSet:
        """The experts a saved mixer pins, fetched again at their pinned revisions when `fetch_weights`."""
        pinned = [Expert.from_reference(reference) for reference in references]
        if not fetch_weights:
            return cls(pinned)
        fetched = cls.read([expert.source for expert in pinned], hub, allow_pickle).experts
        for recorded, expert in zip(pinned, fetched):
            if _layout(expert) != _layout(recorded):
                raise ExpertError(
                    f"Expert {recorded.source.label!r} no longer matches the mixer that was saved with it (its "
                    "modules, ranks or scalings changed). Restore the adapter as it was, or build a new mixer."
                )
        return cls([Expert(e.source, recorded.requested_revision, e.blocks) for recorded, e in zip(pinned, fetched)])


def _copy_exactly(factors: nn.ParameterDict, adapter_name: str, values: torch.Tensor) -> None:
    """Copy an expert's factors in; a half-precision parameter (that of a half-precision base) is first replaced by a
    float32 one, so that the expert keeps its file's values, as PEFT keeps LoRA weights in float32 on such a base
    (`autocast_adapter_dtype`, whose upcast would come after the values were already rounded)."""
    param = factors[adapter_name]
    if param.dtype in (torch.float16, torch.bfloat16) and values.dtype != param.dtype:
        factors[adapter_name] = nn.Parameter(values.to(param.device, torch.float32), requires_grad=param.requires_grad)
    else:
        param.copy_(values)


def read_experts(config: LoraMixerConfig, hub: Optional[HubOptions] = None) -> Optional[ExpertSet]:
    """The experts `config` names; None for a mixer of new experts. `hub`: how to fetch them (default: the
    enclosing `hub_options` block's, else the environment's).

    A config saved by a mixer carries `resolved_experts`: its experts are then fetched again at the pinned commits,
    unless the checkpoint holds their weights, in which case only their layout is needed.
    """
    if not config.experts:
        return None
    options = dict(allow_pickle=config.allow_pickle_experts, hub=hub or current_hub_options())
    if config.resolved_experts:
        return ExpertSet.from_references(
            config.resolved_experts, fetch_weights=not config.stores_expert_weights, **options
        )
    experts = ExpertSet.read(config.expert_sources, **options)
    # router_init="arrow" holds each expert twice, routed by +v_e and -v_e (see router_init.py)
    return ExpertSet([expert for expert in experts.experts for _ in range(config.copies_per_expert)])


def load_experts(config: LoraMixerConfig, model: nn.Module, hub: Optional[HubOptions] = None) -> Optional[ExpertSet]:
    """`read_experts`, each expert checked against `model`."""
    experts = read_experts(config, hub)
    if experts is not None:
        experts.check_against(model)
    return experts


def _layout(expert: Expert) -> dict[str, tuple[int, float]]:
    return {name: (block.r, block.scaling) for name, block in expert.blocks.items()}


def read_expert(source: ExpertSource, fetched: FetchedExpert, allow_pickle: bool) -> Expert:
    """Read a fetched adapter, refuse anything that is not a plain linear LoRA, and split it per module."""
    lora_config = _read_lora_config(source, _file(source, fetched.folder, CONFIG_NAME))
    tensors = _read_tensors(source, _weights_file(source, fetched.folder, allow_pickle))
    resolved = ExpertSource(source.repo_id, fetched.commit, source.subfolder) if source.is_hub else source
    return Expert(resolved, source.revision, _blocks(source, lora_config, tensors))


def check_against_model(expert: Expert, model: nn.Module) -> None:
    """Every module the expert adapts must exist in `model`, be supported, and have the expert's shapes."""
    label = expert.source.label
    for name, block in expert.blocks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ExpertError(
                f"Expert {label!r} adapts {name!r}, which this base model does not have: it is a LoRA for another "
                "base model (or architecture)."
            ) from None
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        try:
            in_features, out_features = in_out_features(module)
        except TypeError as error:
            raise ExpertError(f"Expert {label!r} adapts {name!r}: {error}") from None
        expected = {"lora_A": (block.r, in_features), "lora_B": (out_features, block.r)}
        for factor, shape in expected.items():
            tensor = getattr(block, factor)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ExpertError(
                    f"Expert {label!r}: {factor} of {name!r} has shape {tuple(tensor.shape)}, but this base model "
                    f"needs {shape} there. The adapter was trained on another base model."
                )


def _file(source: ExpertSource, folder: str, filename: str) -> str:
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise ExpertError(f"Expert {source.label!r}: the folder has no {filename}.")
    return path


def _weights_file(source: ExpertSource, folder: str, allow_pickle: bool) -> str:
    """The safetensors weights; a pickle checkpoint only when there are none and the user opted in."""
    if os.path.isfile(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)) or not os.path.isfile(
        os.path.join(folder, WEIGHTS_NAME)
    ):
        return _file(source, folder, SAFETENSORS_WEIGHTS_NAME)
    if not allow_pickle:
        raise ExpertError(
            f"Expert {source.label!r} has only a pickle checkpoint ({WEIGHTS_NAME}), no {SAFETENSORS_WEIGHTS_NAME}. "
            "Loading pickle files can run arbitrary code; if you trust this adapter, set "
            "`allow_pickle_experts=True` (it is then read with torch.load(weights_only=True))."
        )
    return os.path.join(folder, WEIGHTS_NAME)


def _read_lora_config(source: ExpertSource, path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExpertError(f"Expert {source.label!r}: {CONFIG_NAME} cannot be read ({error}).") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise ExpertError(
            f"Expert {source.label!r} is a {peft_type or 'non-PEFT'} adapter; only LoRA adapters (linear deltas "
            "s * B A x) can be mixed."
        )
    for option, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(option):
            raise ExpertError(
                f"Expert {source.label!r} uses {feature} (`{option}`); only plain linear LoRA adapters can be mixed."
            )
    if config.get("bias", "none") != "none":
        raise ExpertError(
            f"Expert {source.label!r} trains biases (`bias={config['bias']!r}`), which are not part of a LoRA delta "
            "and cannot be routed; only plain linear LoRA adapters can be mixed."
        )
    return config


def _read_tensors(source: ExpertSource, path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise many types for damaged files
        raise ExpertError(
            f"Expert {source.label!r}: {os.path.basename(path)} is damaged or not a weights file ({error})."
        ) from None


def _blocks(source: ExpertSource, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, ExpertSpec]:
    """Pair each module's lora_A and lora_B and give it the scaling PEFT's LoRA would use there."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module_name, _, factor = key.removeprefix(PEFT_MODEL_PREFIX).rpartition(".")[0].rpartition(".")
        if not key.endswith(".weight") or factor not in ("lora_A", "lora_B") or tensor.dim() != 2:
            raise ExpertError(
                f"Expert {source.label!r} holds {key!r} (shape {tuple(tensor.shape)}), which is not a linear LoRA "
                "factor (lora_A / lora_B of a linear projection); only plain linear LoRA adapters can be mixed."
            )
        factors.setdefault(module_name, {})[factor] = tensor
    if not factors:
        raise ExpertError(f"Expert {source.label!r} holds no LoRA weights.")
    alpha_pattern = config.get("alpha_pattern") or {}
    blocks = {}
    for name, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].shape[0] != pair["lora_B"].shape[1]:
            raise ExpertError(
                f"Expert {source.label!r}: module {name!r} needs a lora_A (r x in) and a lora_B (out x r) of the same "
                f"rank, got { ({factor: tuple(t.shape) for factor, t in pair.items()}) }."
            )
        r = pair["lora_A"].shape[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", 8))
        scaling = alpha / (r**0.5 if config.get("use_rslora") else r)
        blocks[name] = ExpertSpec(r, float(scaling), pair["lora_A"], pair["lora_B"])
    return blocks
