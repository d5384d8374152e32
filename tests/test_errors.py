"""Bad input gets a clear error before the model is touched."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model
from torch import nn

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(r=0), "`r` must be a positive integer"),
        (dict(r=2.5), "`r` must be a positive integer"),
        (dict(num_experts=0), "num_experts"),
        (dict(routing="sparse"), "Unknown `routing` 'sparse'"),
        (dict(router_temperature=0.0), "router_temperature"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(layers_pattern="layers"), "layers_pattern"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraMixerConfig(**kwargs)


def snapshot(model: nn.Module) -> dict[str, tuple[type, torch.Tensor]]:
    return {name: (type(module), [p.clone() for p in module.parameters(recurse=False)])
            for name, module in model.named_modules()}


def assert_untouched(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (module_type, params) in before.items():
        assert after[name][0] is module_type, name
        assert all(torch.equal(a, b) for a, b in zip(after[name][1], params)), name


@pytest.mark.parametrize(
    ("model_type", "config", "error", "message"),
    [
        ("llama", dict(target_modules=["nonexistent_proj"]), ValueError, "not found in the base model"),
        ("llama", dict(target_modules=["q_proj", "embed_tokens"]), TypeError, "embed_tokens.*not Embedding"),
        ("mamba", dict(target_modules=["in_proj", "dt_proj"]), ValueError, "dt_proj.weight.*directly"),
        ("gpt_neox", dict(target_modules=None, layers_to_transform=[0], layers_pattern="nope"), ValueError, "layers_pattern.*nope"),
    ],
)
def test_bad_targets_raise_before_anything_changes(model_type, config, error, message):
    model = tiny_model(model_type)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        get_peft_model(model, LoraMixerConfig(num_experts=2, r=2, **config))
    assert_untouched(model, before)


def test_model_type_without_defaults_asks_for_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default target modules"):
        get_peft_model(model, LoraMixerConfig(num_experts=2, r=2))
    assert isinstance(model[0], nn.Linear)


def test_module_with_another_peft_method_is_refused():
    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"])).base_model.model
    with pytest.raises(ValueError, match="another PEFT method"):
        get_peft_model(model, LoraMixerConfig(num_experts=2, r=2, target_modules=["q_proj", "v_proj"]))
    assert not any(isinstance(m, LoraMixerLayer) for m in model.modules())


def test_all_linear_and_exclusions_and_layer_selection():
    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=2, r=2, target_modules="all-linear",
                                                                exclude_modules=["down_proj"]))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraMixerLayer)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}

    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=2, r=2, layers_to_transform=[1]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraMixerLayer)]
    assert len(adapted) == 4 and all(".layers.1." in n for n in adapted)
