"""Existing PEFT LoRA adapters as the experts of a mixer: fetch them, read them, check them against the base model.

Everything here runs before the model is modified, so a bad expert (wrong method, wrong base model, missing or
corrupt file, pickle-only checkpoint, unreachable Hub repository) raises an `ExpertError` naming it and leaves the
model as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from ..config import LoraMixerConfig
from ..layer import ExpertSpec, in_out_features, iter_mixer_layers
from .sources import ExpertSource

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


class ExpertError(ValueError):
    """An adapter cannot serve as an expert. The message names the adapter (and the module when there is one)."""


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
        for key, layer in iter_mixer_layers(model, adapter_name):
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
    def read(
        cls, sources: Sequence[ExpertSource], allow_pickle: bool = False, hub_kwargs: Optional[dict[str, Any]] = None
    ) -> ExpertSet:
        """Fetch and read every expert."""
        return cls([read_expert(source, allow_pickle, hub_kwargs or {}) for source in sources])

    @classmethod
    def from_references(
        cls,
        references: Sequence[dict[str, Any]],
        fetch_weights: bool,
        allow_pickle: bool = False,
        hub_kwargs: Optional[dict[str, Any]] = None,
    ) -> ExpertSet:
        """The experts a saved mixer pins, fetched again at their pinned revisions when `fetch_weights`."""
        pinned = [Expert.from_reference(reference) for reference in references]
        if not fetch_weights:
            return cls(pinned)
        fetched = cls.read([expert.source for expert in pinned], allow_pickle, hub_kwargs).experts
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


def read_experts(config: LoraMixerConfig) -> Optional[ExpertSet]:
    """The experts `config` names; None for a mixer of new experts.

    A config saved by a mixer carries `resolved_experts`: its experts are then fetched again at the pinned commits,
    unless the checkpoint holds their weights, in which case only their layout is needed.
    """
    if not config.experts:
        return None
    options = dict(allow_pickle=config.allow_pickle_experts, hub_kwargs=config.hub_kwargs)
    if config.resolved_experts:
        return ExpertSet.from_references(
            config.resolved_experts, fetch_weights=not config.stores_expert_weights, **options
        )
    return ExpertSet.read(config.expert_sources, **options)


def load_experts(config: LoraMixerConfig, model: nn.Module) -> Optional[ExpertSet]:
    """`read_experts`, each expert checked against `model`."""
    experts = read_experts(config)
    if experts is not None:
        experts.check_against(model)
    return experts


def _layout(expert: Expert) -> dict[str, tuple[int, float]]:
    return {name: (block.r, block.scaling) for name, block in expert.blocks.items()}


def read_expert(source: ExpertSource, allow_pickle: bool, hub_kwargs: dict[str, Any]) -> Expert:
    """Fetch an adapter's files, refuse anything that is not a plain linear LoRA, and split it per module."""
    config_path = _fetch(source, CONFIG_NAME, hub_kwargs)
    commit = _commit_of(config_path, source, hub_kwargs) if source.is_hub else None
    lora_config = _read_lora_config(source, config_path)
    weights_path = _fetch_weights(source, allow_pickle, hub_kwargs, commit)  # the same commit, even if a branch moved
    tensors = _read_tensors(source, weights_path)
    resolved = ExpertSource(source.repo_id, commit, source.subfolder) if source.is_hub else source
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


class _Missing(ExpertError):
    """A file the expert needs is absent (or not cached while offline)."""


def _fetch(source: ExpertSource, filename: str, hub_kwargs: dict[str, Any], commit: Optional[str] = None) -> str:
    """Local path of one of the adapter's files, from its folder or through the Hugging Face cache.

    `commit` overrides the source's revision (errors still name the source as the user wrote it).
    """
    label = source.label
    if not source.is_hub:
        if not os.path.isdir(source.path):
            raise ExpertError(f"Expert {label!r}: no such folder.")
        path = os.path.join(source.path, filename)
        if not os.path.isfile(path):
            raise _Missing(f"Expert {label!r}: the folder has no {filename}.")
        return path
    try:
        return hf_hub_download(
            source.repo_id, filename, subfolder=source.subfolder, revision=commit or source.revision, **hub_kwargs
        )
    except LocalEntryNotFoundError:
        raise _Missing(
            f"Expert {label!r} cannot be resolved: {filename} is not in the local Hugging Face cache and the Hub "
            "cannot be reached (offline: HF_HUB_OFFLINE / local_files_only, or no connection). Fetch it once while "
            "online, or pass the `cache_dir` that holds it."
        ) from None
    except EntryNotFoundError:
        raise _Missing(f"Expert {label!r}: the repository has no {filename}.") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ExpertError(f"Expert {label!r} cannot be resolved: {type(error).__name__}: {error}") from None
    except (HfHubHTTPError, OSError) as error:
        raise ExpertError(f"Expert {label!r}: fetching {filename} failed: {error}") from None


def _fetch_weights(
    source: ExpertSource, allow_pickle: bool, hub_kwargs: dict[str, Any], commit: Optional[str] = None
) -> str:
    """The safetensors weights; a pickle checkpoint only when there are none and the user opted in."""
    try:
        return _fetch(source, SAFETENSORS_WEIGHTS_NAME, hub_kwargs, commit)
    except _Missing as no_safetensors:
        try:
            pickle_path = _fetch(source, WEIGHTS_NAME, hub_kwargs, commit)
        except _Missing:
            raise no_safetensors from None
    if not allow_pickle:
        raise ExpertError(
            f"Expert {source.label!r} has only a pickle checkpoint ({WEIGHTS_NAME}), no {SAFETENSORS_WEIGHTS_NAME}. "
            "Loading pickle files can run arbitrary code; if you trust this adapter, set "
            "`allow_pickle_experts=True` (it is then read with torch.load(weights_only=True))."
        )
    return pickle_path


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


def _commit_of(fetched_path: str, source: ExpertSource, hub_kwargs: dict[str, Any]) -> str:
    """The commit sha a downloaded file belongs to: the cache stores it under `snapshots/<sha>/`."""
    cache_dir = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
    snapshots = Path(cache_dir, repo_folder_name(repo_id=source.repo_id, repo_type="model"), "snapshots")
    folder = Path(os.path.realpath(os.path.dirname(fetched_path)))  # the file itself links into blobs/
    return folder.relative_to(os.path.realpath(snapshots)).parts[0]
