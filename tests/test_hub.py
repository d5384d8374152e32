"""Saving a mixer of existing LoRA experts (router-only or with the experts), loading it by Hub id, pushing it."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from fake_hub import HubCache
from huggingface_hub import ModelCard, constants
from lora_experts import save_lora, save_pickle_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from tiny_models import VOCAB, tiny_model

from peft_lora_mixer import ExpertError, LoraMixerConfig, from_experts
from peft_lora_mixer.model_card import SECTION_END, SECTION_START

INPUT = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
BASE_ID = "test-org/tiny-llama"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "math": save_lora(root / "math", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "code": save_lora(
            root / "code", seed=2, r=2, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj"]
        ),
        "local": save_lora(root / "local", seed=3, r=8, lora_alpha=4, target_modules=["v_proj"]),
    }


@pytest.fixture
def hub_experts(hub, folders) -> list:
    hub.publish_folder("org/lora-math", folders["math"])
    hub.publish_folder("org/lora-code", folders["code"], refs=("main", "v1.2"))
    return ["org/lora-math", "org/lora-code@v1.2"]


def base_model():
    model = tiny_model("llama")
    model.config._name_or_path = BASE_ID
    return model


def trained_mixer(experts, **config_kwargs) -> PeftModel:
    """A mixer whose routers hold non-trivial weights, as after training."""
    mixer = get_peft_model(base_model(), LoraMixerConfig(experts=experts, top_k=1, **config_kwargs))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, parameter in mixer.named_parameters():
            if ".loramixer_router." in name:
                parameter.normal_(std=0.5)
    return mixer


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def tensor_names(folder) -> list[str]:
    with safe_open(f"{folder}/adapter_model.safetensors", "pt") as file:
        return list(file.keys())


def folder_files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_router_only_save_loads_by_hub_id_bitwise(hub, hub_experts, tmp_path):
    mixer = trained_mixer(hub_experts)
    expected = logits(mixer)
    mixer.save_pretrained(tmp_path / "router")
    names = tensor_names(tmp_path / "router")
    assert names and all(".loramixer_router." in name for name in names)  # no expert weights
    hub.publish("me/router", folder_files(tmp_path / "router"))

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "missing adapter keys" must not fire
        loaded = PeftModel.from_pretrained(base_model(), "me/router")
    assert torch.equal(logits(loaded), expected)
    assert loaded.peft_config["default"].resolved_experts == mixer.peft_config["default"].resolved_experts


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_router_only_reload_keeps_experts_frozen(hub, hub_experts, tmp_path, low_cpu_mem_usage):
    mixer = trained_mixer(hub_experts)
    mixer.save_pretrained(tmp_path / "router")
    loaded = PeftModel.from_pretrained(
        base_model(), str(tmp_path / "router"), is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert torch.equal(logits(loaded), logits(mixer))
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".loramixer_router." in name for name in trainable)


def test_router_only_load_names_an_expert_it_cannot_fetch(hub, hub_experts, tmp_path, monkeypatch):
    trained_mixer(hub_experts).save_pretrained(tmp_path / "router")
    elsewhere = HubCache.offline(tmp_path / "fresh-cache", monkeypatch)  # has the router, never fetched the experts
    elsewhere.publish("me/router", folder_files(tmp_path / "router"))
    with pytest.raises(ExpertError, match=r"Expert 'org/lora-math@[0-9a-f]{40}' cannot be resolved"):
        PeftModel.from_pretrained(base_model(), "me/router")


def test_local_expert_is_saved_with_its_weights(hub, hub_experts, folders, tmp_path):
    local = shutil.copytree(folders["local"], tmp_path / "local")
    mixer = trained_mixer([*hub_experts, str(local)])
    expected = logits(mixer)
    mixer.save_pretrained(tmp_path / "full")
    assert any(name.endswith(".loramixer_A") for name in tensor_names(tmp_path / "full"))

    shutil.rmtree(local)  # neither the folder nor the Hub experts are needed any more
    shutil.rmtree(hub.root)
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path / "full"))
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize("save_expert_weights", [True, False])
def test_explicit_choice_of_saved_form(hub, hub_experts, folders, tmp_path, save_expert_weights):
    mixer = trained_mixer([*hub_experts, folders["local"]], save_expert_weights=save_expert_weights)
    expected = logits(mixer)
    mixer.save_pretrained(tmp_path / "saved")
    has_experts = any(name.endswith(".loramixer_B") for name in tensor_names(tmp_path / "saved"))
    assert has_experts == save_expert_weights
    assert torch.equal(logits(PeftModel.from_pretrained(base_model(), str(tmp_path / "saved"))), expected)


def test_pickle_trust_is_decided_by_whoever_loads(tmp_path):
    folder = save_pickle_lora(tmp_path / "pickle")
    mixer = trained_mixer([folder], allow_pickle_experts=True, save_expert_weights=False)
    mixer.save_pretrained(tmp_path / "router")
    assert "allow_pickle_experts" not in json.loads((tmp_path / "router" / "adapter_config.json").read_text())
    with pytest.raises(ExpertError, match="only a pickle checkpoint"):
        PeftModel.from_pretrained(base_model(), str(tmp_path / "router"))
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path / "router"), allow_pickle_experts=True)
    assert torch.equal(logits(loaded), logits(mixer))


def test_router_only_save_refuses_to_drop_trained_experts(hub, hub_experts, tmp_path):
    mixer = trained_mixer(hub_experts)
    for name, parameter in mixer.named_parameters():
        if ".loramixer_B." in name:
            parameter.requires_grad_(True)  # the user unfroze the experts to train them
    with pytest.raises(ValueError, match="save_expert_weights=True"):
        mixer.save_pretrained(tmp_path / "router")
    with pytest.raises(ValueError, match="lose the trained experts"):
        LoraMixerConfig(experts=hub_experts, top_k=1, trainable_experts=True, save_expert_weights=False)


def test_changed_local_expert_is_detected_on_router_only_load(folders, tmp_path):
    local = shutil.copytree(folders["math"], tmp_path / "math")
    trained_mixer([str(local)], save_expert_weights=False).save_pretrained(tmp_path / "router")
    shutil.rmtree(local)
    save_lora(local, seed=9, r=2, target_modules=["q_proj", "v_proj"])  # same place, another adapter
    with pytest.raises(ExpertError, match="no longer matches"):
        PeftModel.from_pretrained(base_model(), str(tmp_path / "router"))


def test_online_fetch_sends_the_token_and_pins_the_served_commit(folders, server, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the in-memory server answers
    sha = server.serve("org/private-lora", folders["math"])
    mixer = from_experts(base_model(), ["org/private-lora"], top_k=1, token="hf_secret", cache_dir=str(tmp_path))
    assert server.unexpected == []
    fetches = [request for request in server.requests if "/org/private-lora/" in request.url.path]
    assert fetches and all(request.headers["authorization"] == "Bearer hf_secret" for request in fetches)
    assert mixer.peft_config["default"].resolved_experts[0]["revision"] == sha
    mixer.save_pretrained(tmp_path / "router")
    assert "hf_secret" not in (tmp_path / "router" / "adapter_config.json").read_text()
    assert "hf_secret" not in repr(vars(mixer.peft_config["default"]))  # not kept on the config object either


def test_push_to_hub_uploads_a_loadable_router_with_our_card(hub, hub_experts, server, monkeypatch):
    mixer = trained_mixer(hub_experts)
    expected = logits(mixer)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the in-memory server answers
    mixer.push_to_hub("me/pushed", token="hf_test")
    assert server.unexpected == []
    (uploaded,) = server.commits["me/pushed"]
    assert set(uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    uploaded_tensors = load_safetensors(uploaded["adapter_model.safetensors"])
    assert uploaded_tensors and all(".loramixer_router." in name for name in uploaded_tensors)  # routers only

    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_ID
    assert "lora-mixer" in card.data.tags
    pins = json.loads(uploaded["adapter_config.json"])["resolved_experts"]
    assert f"`{pins[1]['revision']}` (requested `v1.2`)" in card.text
    assert "[org/lora-math](https://huggingface.co/org/lora-math)" in card.text
    assert '"me/pushed"' in card.text and "`routing`: 'hard_soft'" in card.text

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.publish("me/pushed", uploaded)
    assert torch.equal(logits(PeftModel.from_pretrained(base_model(), "me/pushed")), expected)


def test_card_section_is_rewritten_not_repeated_and_user_text_kept(hub, hub_experts, tmp_path):
    mixer = trained_mixer(hub_experts)
    mixer.save_pretrained(tmp_path / "out")
    readme = tmp_path / "out" / "README.md"
    readme.write_text(readme.read_text() + "\nNotes written by the user.\n")
    mixer.save_pretrained(tmp_path / "out")
    text = readme.read_text()
    assert text.count(SECTION_START) == text.count(SECTION_END) == 1
    assert "Notes written by the user." in text


def test_other_peft_models_keep_peft_card(tmp_path):
    model = get_peft_model(base_model(), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    assert SECTION_START not in (tmp_path / "lora" / "README.md").read_text()
