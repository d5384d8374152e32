"""LoRA-Mixer is a PEFT method like the built-in ones: configs, loaders, transformers' load_adapter."""

import importlib
import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model, mapping
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import peft_lora_mixer
from peft_lora_mixer import LoraMixerConfig, LoraMixerModel


@pytest.fixture
def saved(tmp_path):
    """A tiny base model and a trained-looking mixer adapter over it, both on disk."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama").save_pretrained(base_dir)
    config = LoraMixerConfig(num_experts=3, r=2, routing="soft", init_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(input_ids=torch.arange(8)[None] % VOCAB).logits
    return base_dir, adapter_dir, expected


def test_importing_twice_is_harmless():
    before = dict(mapping.PEFT_TYPE_TO_TUNER_MAPPING)
    importlib.reload(peft_lora_mixer)
    peft_lora_mixer.register()
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING.keys() == before.keys()
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["LORAMIXER"].__name__ == "LoraMixerModel"


def test_saved_config_reads_back(saved):
    _, adapter_dir, _ = saved
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORAMIXER"
    config = PeftConfig.from_pretrained(adapter_dir)
    assert isinstance(config, LoraMixerConfig) and config.num_experts == 3 and config.routing == "soft"


def test_auto_peft_model_loads_base_and_adapter(saved):
    _, adapter_dir, expected = saved
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert isinstance(model, PeftModel) and isinstance(model.base_model, LoraMixerModel)
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.arange(8)[None] % VOCAB).logits, expected)


def test_transformers_load_adapter(saved):
    _, adapter_dir, expected = saved
    model = tiny_model("llama")
    model.load_adapter(str(adapter_dir))
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.arange(8)[None] % VOCAB).logits, expected)
