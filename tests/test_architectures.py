"""Every architecture with default targets: forward, backward, save/load and the no-op start."""

import pytest
import torch
from mixers import mixer
from peft import PeftModel, get_peft_model
from tiny_models import SEQ2SEQ, TINY_CONFIGS, VOCAB, tiny_model

from peft_lora_mixer import DEFAULT_TARGET_MODULES, LoraMixerConfig, LoraMixerLayer

ARCHITECTURES = sorted(DEFAULT_TARGET_MODULES)


def batch(model_type: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    inputs = {"input_ids": ids, "labels": ids}
    if model_type in SEQ2SEQ:
        inputs["labels"] = torch.randint(3, VOCAB, (2, 5), generator=generator)
    return inputs


def arch_mixer(model_type: str, **config) -> PeftModel:
    """3 experts with PEFT's default initialisation (the mixer starts as a no-op) unless `config` says otherwise."""
    return mixer(model_type, **{"num_experts": 3, "lora_alpha": 8, "init_weights": True, **config})


def test_every_default_architecture_has_a_tiny_model():
    assert set(ARCHITECTURES) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_default_targets_exist_and_are_wrapped(model_type):
    model = arch_mixer(model_type)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraMixerLayer)}
    expected = {target.rsplit(".", 1)[-1] for target in DEFAULT_TARGET_MODULES[model_type]}
    assert wrapped == expected


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_forward_backward_only_adapters_get_gradients(model_type):
    model = arch_mixer(model_type, init_weights=False).train()
    model(**batch(model_type)).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".loramixer_" in name for name in with_grad)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert any(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if "loramixer_router" in name)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_init_is_a_no_op(model_type):
    inputs = batch(model_type)
    model = arch_mixer(model_type)
    # Mamba's CPU path rounds differently when its weights require grad: compare with a base frozen the same way
    base = tiny_model(model_type).requires_grad_(False)
    assert torch.equal(model(**inputs).logits, base(**inputs).logits)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_save_load_round_trip_is_bitwise(model_type, tmp_path):
    inputs = batch(model_type)
    model = arch_mixer(model_type, init_weights=False).eval()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(model_type), tmp_path, is_trainable=True).eval()
    assert isinstance(loaded.base_model, type(model.base_model))
    assert torch.equal(loaded(**inputs).logits, expected)
    assert not torch.equal(expected, tiny_model(model_type)(**inputs).logits)


def test_all_linear_and_exclusions_and_layer_selection():
    model = get_peft_model(
        tiny_model("llama"),
        LoraMixerConfig(num_experts=2, r=2, target_modules="all-linear", exclude_modules=["down_proj"]),
    )
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraMixerLayer)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}

    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=2, r=2, layers_to_transform=[1]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraMixerLayer)]
    assert len(adapted) == 4 and all(".layers.1." in n for n in adapted)
