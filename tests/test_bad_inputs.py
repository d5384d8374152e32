"""The standing table of bad input: each case is a call, the error it must raise, a phrase of its message, and the
check that neither the models nor the files on disk changed. A new case is one line in CASES."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_experts import assert_unchanged, save_lora, snapshot
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model
from torch import nn

from peft_lora_mixer import ExpertIdsCollator, LoraMixerConfig, LoraMixerLayer, best_expert_labels, from_experts


def llama() -> nn.Module:
    return tiny_model("llama")


def llama_with_peft_lora() -> nn.Module:
    return get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"])).base_model.model


def quantized_with(method: str) -> Callable[[], nn.Module]:
    """A tiny llama whose config records another library's quantisation, as such a loaded model's config does."""

    def base() -> nn.Module:
        model = tiny_model("llama")
        model.config.quantization_config = {"quant_method": method, "bits": 4}
        return model

    return base


@dataclass
class Setup:
    """What a case may act on: a bare base model, a mixer (4 experts of rank 2 on a tiny llama) and a folder of
    files (a saved PEFT LoRA in `expert/`)."""

    base: nn.Module
    mixer: Any
    folder: Path

    def build(self, **config) -> Any:
        """`get_peft_model` on the bare base with a config built from `config`."""
        return get_peft_model(self.base, LoraMixerConfig(**{"num_experts": 2, "r": 2, **config}))

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.mixer(input_ids=input_ids)


@dataclass(frozen=True)
class Case:
    call: Callable[[Setup], Any]
    error: type[Exception]
    message: str  # a regular expression searched in the error's message
    base: Callable[[], nn.Module] = field(default=llama)


def config(**kwargs) -> Callable[[Setup], Any]:
    return lambda setup: LoraMixerConfig(**kwargs)


ONE_SAMPLE = torch.tensor([[1, 2, 3]])


def route_to(ids: Any, input_ids: torch.Tensor = ONE_SAMPLE) -> Callable[[Setup], Any]:
    def call(setup: Setup) -> Any:
        with setup.mixer.route_to(ids):
            return setup.forward(input_ids)

    return call


def collate(*expert_ids: Any) -> Callable[[Setup], Any]:
    return lambda setup: ExpertIdsCollator()([{"input_ids": torch.tensor([1, 2]), "expert_id": e} for e in expert_ids])


def train_with_labels(labels: Any) -> Callable[[Setup], Any]:
    """A training forward of two samples given `router_labels`."""

    def call(setup: Setup) -> Any:
        setup.mixer.train()
        return setup.mixer(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), router_labels=labels)

    return call


CASES: dict[str, Case] = {
    # config values
    "top_k above num_experts": Case(config(num_experts=2, top_k=3), ValueError, "top_k"),
    "top_k 0": Case(config(top_k=0), ValueError, "top_k"),
    "top_k True": Case(config(top_k=True), ValueError, "`top_k` must be an integer"),
    "r 0": Case(config(r=0), ValueError, "`r` must be a positive integer"),
    "r float": Case(config(r=2.5), ValueError, "`r` must be a positive integer"),
    "r True": Case(config(r=True), ValueError, "`r` must be a positive integer"),
    "num_experts 0": Case(config(num_experts=0), ValueError, "num_experts"),
    "unknown routing": Case(config(routing="sparse"), ValueError, "Unknown `routing` 'sparse'"),
    "router_temperature 0": Case(config(router_temperature=0.0), ValueError, "router_temperature"),
    "router_temperature inf": Case(config(router_temperature=math.inf), ValueError, "router_temperature.*finite"),
    "router_temperature nan": Case(config(router_temperature=math.nan), ValueError, "router_temperature"),
    "lora_alpha nan": Case(config(lora_alpha=math.nan), ValueError, "`lora_alpha` must be a finite number > 0"),
    "lora_alpha string": Case(config(lora_alpha="16"), ValueError, "`lora_alpha` must be a finite number > 0"),
    "lora_alpha 0": Case(config(lora_alpha=0), ValueError, "`lora_alpha` must be a finite number > 0"),
    "lora_alpha negative": Case(config(lora_alpha=-8), ValueError, "`lora_alpha` must be a finite number > 0"),
    "lora_alpha inf": Case(config(lora_alpha=math.inf), ValueError, "`lora_alpha` must be a finite number > 0"),
    "lora_dropout 1": Case(config(lora_dropout=1.0), ValueError, "lora_dropout"),
    "lora_dropout string": Case(config(lora_dropout="0.1"), ValueError, "lora_dropout"),
    "layers_pattern alone": Case(config(layers_pattern="layers"), ValueError, "layers_pattern"),
    "rsl weight negative": Case(config(rsl_balance_weight=-1.0), ValueError, "rsl_balance_weight"),
    "rsl_entropy_target nan": Case(config(rsl_entropy_target=math.nan), ValueError, "rsl_entropy_target"),
    # target modules, checked before any module is replaced
    "missing target": Case(
        lambda s: s.build(target_modules=["nonexistent_proj"]), ValueError, "not found in the base model"
    ),
    "embedding target": Case(
        lambda s: s.build(target_modules=["q_proj", "embed_tokens"]), TypeError, "embed_tokens.*not Embedding"
    ),
    "mamba dt_proj": Case(
        lambda s: s.build(target_modules=["in_proj", "dt_proj"]),
        ValueError,
        "dt_proj.weight.*directly",
        base=lambda: tiny_model("mamba"),
    ),
    "wrong layers_pattern": Case(
        lambda s: s.build(layers_to_transform=[0], layers_pattern="nope"),
        ValueError,
        "layers_pattern.*nope",
        base=lambda: tiny_model("gpt_neox"),
    ),
    "model type without defaults": Case(
        lambda s: s.build(), ValueError, "no default target modules", base=lambda: nn.Sequential(nn.Linear(4, 4))
    ),
    "another PEFT method": Case(
        lambda s: s.build(target_modules=["q_proj", "v_proj"]),
        ValueError,
        "another PEFT method",
        base=llama_with_peft_lora,
    ),
    "expert folder missing": Case(
        lambda s: s.build(experts=[str(s.folder / "missing")], num_experts=None, top_k=1), ValueError, "no such folder"
    ),
    # forced routing
    "route_to floats": Case(route_to([0.5, 1.7]), ValueError, "whole numbers.*0.5"),
    "route_to float": Case(route_to(1.0), ValueError, "whole numbers"),
    "route_to strings": Case(route_to(["0", "1"]), ValueError, "whole numbers.*'0'"),
    "route_to bools": Case(route_to([True]), ValueError, "whole numbers.*True"),
    "route_to float tensor": Case(route_to(torch.tensor([1.0])), ValueError, "whole numbers"),
    "route_to out of range": Case(route_to([0, 4]), ValueError, r"\[0, 4\)"),
    "route_to negative": Case(route_to(-1), ValueError, r"\[0, 4\)"),
    "route_to empty": Case(route_to([]), ValueError, "one expert id per sample"),
    "route_to nested": Case(route_to([[0]]), ValueError, "one expert id per sample"),
    "route_to batch mismatch": Case(route_to([0, 1]), ValueError, "2 expert ids.*one expert id per sample"),
    "route_to unbatched input": Case(
        route_to([0], input_ids=torch.tensor([1, 2, 3])), ValueError, r"add the batch dimension"
    ),
    # stage-1 collator
    "collator float id": Case(collate(0, 1.9), ValueError, "whole numbers.*1.9"),
    "collator string id": Case(collate("2"), ValueError, "whole numbers.*'2'"),
    "collator negative id": Case(collate(-1), ValueError, ">= 0"),
    "collator missing column": Case(
        lambda s: ExpertIdsCollator()([{"input_ids": torch.tensor([1])}]), KeyError, "remove_unused_columns=False"
    ),
    # router labels (a training forward) and best-expert labels
    "router_labels out of range": Case(train_with_labels(torch.tensor([4, 0])), ValueError, r"in \[0, 4\)"),
    "router_labels float": Case(train_with_labels(torch.tensor([1.0, 0.0])), ValueError, "whole-number"),
    "router_labels one per batch": Case(train_with_labels(torch.tensor([[1, 0]])), ValueError, "whole-number"),
    "best_expert_labels on a model without a mixer": Case(
        lambda s: best_expert_labels(s.base, [{"input_ids": [1, 2], "labels": [1, 2]}]), TypeError, "LoRA-Mixer"
    ),
    # what trains
    "set_trainable float expert": Case(
        lambda s: s.mixer.set_trainable(routers=True, experts=[1.7]), ValueError, "whole numbers.*1.7"
    ),
    "set_trainable out of range": Case(
        lambda s: s.mixer.set_trainable(routers=True, experts=[4]), ValueError, r"\[0, 4\)"
    ),
    "set_trainable unknown adapter": Case(
        lambda s: s.mixer.set_trainable(True, True, adapter_name="other"), ValueError, "Unknown adapter"
    ),
    # switching the routing of a trained adapter
    "set_routing top_k too large": Case(lambda s: s.mixer.set_routing(top_k=5), ValueError, "top_k"),
    "set_routing top_k True": Case(lambda s: s.mixer.set_routing(top_k=True), ValueError, "top_k"),
    "set_routing unknown mode": Case(lambda s: s.mixer.set_routing(routing="sparse"), ValueError, "Unknown `routing`"),
    "set_routing unknown adapter": Case(
        lambda s: s.mixer.set_routing(top_k=1, adapter_name="nope"), ValueError, "Unknown adapter 'nope'"
    ),
    # quantised bases other than bitsandbytes
    **{
        f"{method} base": Case(
            lambda s: s.build(),
            ValueError,
            f"quantised with '{method}'.*Supported quantised bases: bitsandbytes 4-bit",
            base=quantized_with(method),
        )
        for method in ("gptq", "awq", "hqq", "torchao")
    },
    "awq base plug-and-play": Case(
        lambda s: from_experts(s.base, [str(s.folder / "expert")], top_k=1),
        ValueError,
        "quantised with 'awq'",
        base=quantized_with("awq"),
    ),
}


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def routing_state(mixer: Any) -> tuple:
    """What a failed call must not change besides the weights: the configs and every layer's routing settings."""
    configs = {name: config.to_dict() for name, config in mixer.peft_config.items()}
    layers = [dict(module.router_settings) for module in mixer.modules() if isinstance(module, LoraMixerLayer)]
    return configs, layers, [p.requires_grad for p in mixer.parameters()]


@pytest.fixture(scope="module")
def expert_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("files")
    save_lora(folder / "expert", seed=0, r=2, target_modules=["q_proj"])
    return folder


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_and_changes_nothing(name, expert_folder):
    case = CASES[name]
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=4, r=2, init_weights=False))
    setup = Setup(case.base(), mixer, expert_folder)
    before = snapshot(setup.base), snapshot(mixer), routing_state(mixer), files_of(expert_folder)
    with pytest.raises(case.error, match=case.message):
        case.call(setup)
    assert_unchanged(setup.base, before[0])
    assert_unchanged(mixer, before[1])
    assert routing_state(mixer) == before[2]
    assert all(layer.forced_expert_ids is None for layer in mixer.modules() if isinstance(layer, LoraMixerLayer))
    assert files_of(expert_folder) == before[3]
