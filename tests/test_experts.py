"""Existing LoRA adapters (Hub ids served from an offline cache, local folders) as the experts of a mixer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fake_hub import HubCache
from lora_experts import assert_unchanged, save_lora, save_pickle_lora, snapshot
from peft import IA3Config, PeftModel, get_peft_model
from tiny_models import VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_lora_mixer import ExpertError, LoraMixerConfig, from_experts, hub_options
from peft_lora_mixer.experts.sources import ExpertSource, FetchedExpert, HubOptions, current_hub_options, fetch

INPUT = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Heterogeneous LoRA adapters of the tiny llama: ranks, alphas, rsLoRA, rank/alpha patterns, target sets."""
    root = tmp_path_factory.mktemp("loras")
    specs = {
        "math": dict(seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "code_v1": dict(seed=2, r=2, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "q_proj"]),
        "code_v2": dict(seed=3, r=2, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "q_proj"]),
        "local": dict(seed=4, r=8, lora_alpha=4, target_modules=["v_proj"], layers_to_transform=[1]),
        "medical": dict(
            seed=5,
            r=6,
            lora_alpha=6,
            target_modules=["q_proj", "o_proj"],
            rank_pattern={"o_proj": 3},
            alpha_pattern={"o_proj": 12},
        ),
    }
    return {name: save_lora(root / name, **spec) for name, spec in specs.items()}


@pytest.fixture
def sources(hub, folders) -> list:
    """Four experts from every kind of source; the Hub ones are published into the offline cache."""
    hub.publish_folder("org/lora-math", folders["math"])
    hub.publish_folder("org/lora-code", folders["code_v1"], refs=("v1.2",))
    hub.publish_folder("org/lora-code", folders["code_v2"], refs=("main",))  # a newer commit the tag must not get
    medical_sha = hub.publish_folder("org/multi", folders["medical"], subfolder="medical")
    return [
        "org/lora-math",
        "org/lora-code@v1.2",
        folders["local"],
        {"id": "org/multi", "subfolder": "medical", "revision": medical_sha},
    ]


def reference_logits(source, hub: HubCache) -> torch.Tensor:
    """What PEFT's own LoRA computes for one expert source."""
    if isinstance(source, dict):
        # PEFT 0.21 offline joins a subfolder twice when fetching weights, so load the cached snapshot folder
        snapshot = hub.root / f"models--{source['id'].replace('/', '--')}" / "snapshots" / source["revision"]
        model = PeftModel.from_pretrained(tiny_model("llama"), str(snapshot / source["subfolder"]))
    elif "@" in source:
        repo_id, revision = source.split("@")
        model = PeftModel.from_pretrained(tiny_model("llama"), repo_id, revision=revision)
    else:
        model = PeftModel.from_pretrained(tiny_model("llama"), source)
    with torch.no_grad():
        return model(INPUT).logits


def test_forced_expert_equals_that_lora_alone(hub, sources):
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=sources, top_k=2))
    with torch.no_grad(), mixer.disable_adapter():
        base_logits = mixer(INPUT).logits
    for index, source in enumerate(sources):
        with torch.no_grad(), mixer.base_model.route_to(index):
            logits = mixer(INPUT).logits
        expected = reference_logits(source, hub)
        assert not torch.allclose(expected, base_logits, atol=1e-3)  # the expert really changes the output
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "model_type, targets",
    [("gpt2", (["c_attn"], ["c_attn", "attn.c_proj"])), ("mamba", (["in_proj"], ["in_proj", "x_proj"]))],
)
def test_forced_expert_equals_that_lora_alone_on_other_architectures(tmp_path, model_type, targets):
    """Conv1D projections (GPT-2) and SSM projections (Mamba) compose exactly too."""
    folders = [
        save_lora(
            tmp_path / f"e{i}", seed=i, base=tiny_model(model_type), r=2 + 2 * i, lora_alpha=4, target_modules=target
        )
        for i, target in enumerate(targets)
    ]
    mixer = from_experts(tiny_model(model_type), folders, top_k=1)
    for index, folder in enumerate(folders):
        with torch.no_grad(), mixer.base_model.route_to(index):
            logits = mixer(INPUT).logits
        with torch.no_grad():
            expected = PeftModel.from_pretrained(tiny_model(model_type), folder)(INPUT).logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_targets_union_and_absent_experts_keep_their_router_logit(sources):
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=sources, top_k=2))
    config = mixer.peft_config["default"]
    assert config.num_experts == 4
    assert config.target_modules == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    v_proj_0 = mixer.base_model.model.model.layers[0].self_attn.v_proj
    # experts on v_proj of layer 0: math (r=4) only; code, local (layer 1 only) and medical are absent
    assert v_proj_0.loramixer_A["default"].shape == (4, 32)
    assert v_proj_0.loramixer_router["default"].out_features == 4  # the router still routes over all experts
    o_proj_1 = mixer.base_model.model.model.layers[1].self_attn.o_proj
    assert o_proj_1.loramixer_A["default"].shape == (2 + 3, 32)  # code r=2, medical's rank_pattern r=3


def test_pins_record_the_resolved_commits(hub, sources):
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=sources, top_k=2))
    pins = mixer.peft_config["default"].resolved_experts
    refs = hub.root / "models--org--lora-code" / "refs"
    assert pins[0]["revision"] == (hub.root / "models--org--lora-math" / "refs" / "main").read_text()
    assert pins[1]["revision"] == (refs / "v1.2").read_text() != (refs / "main").read_text()
    assert pins[1]["requested_revision"] == "v1.2"
    assert pins[2]["path"] == sources[2] and "revision" not in pins[2]
    assert pins[3]["revision"] == sources[3]["revision"] and pins[3]["subfolder"] == "medical"
    assert mixer.peft_config["default"].experts == sources  # what the user wrote is kept as written


def test_only_routers_train_and_stay_alone_after_set_adapter(sources):
    mixer = from_experts(tiny_model("llama"), sources, top_k=2)
    trainable = {name for name, p in mixer.named_parameters() if p.requires_grad}
    assert trainable and all(".loramixer_router." in name for name in trainable)
    mixer.base_model.set_adapter("default")
    assert trainable == {name for name, p in mixer.named_parameters() if p.requires_grad}
    mixer.train()
    mixer(INPUT, labels=INPUT).loss.backward()
    assert all(p.grad is None for name, p in mixer.named_parameters() if name not in trainable)


def test_trainable_experts_option(sources):
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=sources, top_k=2, trainable_experts=True))
    trainable = [name for name, p in mixer.named_parameters() if p.requires_grad]
    assert all(".loramixer_" in name for name in trainable)
    for part in (".loramixer_A.", ".loramixer_B.", ".loramixer_router."):
        assert any(part in name for name in trainable)


def test_hub_options_reach_huggingface_hub(hub, tmp_path, folders):
    """`cache_dir` is honoured: the experts resolve from a cache that is not the default one."""
    other = HubCache(tmp_path / "elsewhere")
    other.publish_folder("org/lora-math", folders["math"])
    with pytest.raises(ExpertError, match="org/lora-math"):
        from_experts(tiny_model("llama"), ["org/lora-math"], top_k=1)
    mixer = from_experts(tiny_model("llama"), ["org/lora-math"], top_k=1, cache_dir=str(other.root))
    assert mixer.peft_config["default"].resolved_experts[0]["revision"]
    assert "cache_dir" not in mixer.peft_config["default"].to_dict()


def test_each_kind_of_source_has_its_fetcher(hub, folders):
    """A folder is fetched as it is (no commit); a Hub id to its snapshot folder, pinned to the resolved commit."""
    local = fetch(ExpertSource.parse(folders["math"]), HubOptions())
    assert local == FetchedExpert(folders["math"], None)
    sha = hub.publish_folder("org/lora-math", folders["math"], subfolder="math", refs=("main", "v1"))
    fetched = fetch(ExpertSource.parse({"id": "org/lora-math", "revision": "v1", "subfolder": "math"}), HubOptions())
    assert fetched.commit == sha and fetched.folder.endswith(os.path.join("snapshots", sha, "math"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(fetched.folder))
    with pytest.raises(ExpertError, match="no such folder"):
        fetch(ExpertSource(path=folders["math"] + "-missing"), HubOptions())


def test_hub_options_block_reaches_a_loading_mixer(hub, tmp_path, folders):
    """`PeftModel.from_pretrained` of a router-only mixer fetches its experts with the enclosing block's options."""
    other = HubCache(tmp_path / "elsewhere")
    other.publish_folder("org/lora-math", folders["math"])
    with hub_options(cache_dir=str(other.root)) as options:
        assert current_hub_options() is options
        get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=["org/lora-math"], top_k=1)).save_pretrained(
            tmp_path / "router"
        )
        assert json.loads((tmp_path / "router" / "adapter_config.json").read_text())["save_expert_weights"] is None
        PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "router"))
    assert current_hub_options() == HubOptions()
    with pytest.raises(ExpertError, match="not in the local Hugging Face cache"):
        PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "router"))


# ---- bad inputs: each raises an error naming the adapter, before the model is modified ------------------------


def _dora(folder):
    return save_lora(folder, seed=0, r=2, use_dora=True, target_modules=["q_proj"])


def _ia3(folder):
    get_peft_model(tiny_model("llama"), IA3Config(target_modules=["k_proj"], feedforward_modules=[])).save_pretrained(
        folder
    )
    return str(folder)


def _other_base(folder):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return save_lora(folder, seed=0, base=AutoModelForCausalLM.from_config(config), r=2, target_modules=["q_proj"])


def _other_architecture(folder):
    return save_lora(folder, seed=0, base=tiny_model("gpt2"), r=2, target_modules=["c_attn"])


def _bias(folder):
    return save_lora(folder, seed=0, r=2, bias="lora_only", target_modules=["q_proj"])


def _embedding(folder):
    return save_lora(folder, seed=0, r=2, target_modules=["embed_tokens", "q_proj"])


def _no_weights(folder):
    save_lora(folder, seed=0, r=2, target_modules=["q_proj"])
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    return str(folder)


def _corrupt_weights(folder):
    save_lora(folder, seed=0, r=2, target_modules=["q_proj"])
    with open(os.path.join(folder, "adapter_model.safetensors"), "r+b") as file:
        file.truncate(100)
    return str(folder)


def _corrupt_config(folder):
    save_lora(folder, seed=0, r=2, target_modules=["q_proj"])
    with open(os.path.join(folder, "adapter_config.json"), "w") as file:
        file.write('{"peft_type": "LORA", ')
    return str(folder)


BAD_EXPERTS = {
    "dora": (_dora, "DoRA"),
    "non-lora": (_ia3, "IA3 adapter"),
    "other-base-model": (_other_base, r"lora_A of 'model.layers.0.self_attn.q_proj' has shape \(2, 48\)"),
    "other-architecture": (_other_architecture, "adapts 'transformer.h.0.attn.c_attn', which this base model"),
    "bias": (_bias, "trains biases"),
    "embedding": (_embedding, "not a linear LoRA factor"),
    "missing-weights": (_no_weights, "no adapter_model.safetensors"),
    "corrupt-weights": (_corrupt_weights, "damaged"),
    "corrupt-config": (_corrupt_config, "adapter_config.json cannot be read"),
    "pickle-only": (save_pickle_lora, "only a pickle checkpoint"),
}


@pytest.mark.parametrize("case", BAD_EXPERTS)
def test_bad_expert_is_refused_before_the_model_changes(case, tmp_path, folders):
    make, message = BAD_EXPERTS[case]
    bad = make(tmp_path / case)
    base = tiny_model("llama")
    before = snapshot(base)
    with pytest.raises(ExpertError, match=message) as error:
        get_peft_model(base, LoraMixerConfig(experts=[folders["math"], bad], top_k=1))
    assert bad in str(error.value)
    assert_unchanged(base, before)


def test_bad_expert_added_to_an_existing_mixer_leaves_it_intact(tmp_path, folders):
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=[folders["math"]], top_k=1))
    before = snapshot(mixer)
    with pytest.raises(ExpertError, match="DoRA"):
        mixer.add_adapter("second", LoraMixerConfig(experts=[_dora(tmp_path / "dora")], top_k=1))
    assert_unchanged(mixer, before)
    assert list(mixer.peft_config) == ["default"]


def test_pickle_checkpoint_loads_when_allowed(tmp_path):
    folder = save_pickle_lora(tmp_path / "pickle")
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=[folder], top_k=1, allow_pickle_experts=True))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_model("llama"), folder)(INPUT).logits
        torch.testing.assert_close(mixer(INPUT).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["org/absent", "org/lora-math@no-such-tag"])
def test_unresolvable_hub_expert_names_it(source, hub, folders):
    hub.publish_folder("org/lora-math", folders["math"])
    base = tiny_model("llama")
    before = snapshot(base)
    with pytest.raises(ExpertError, match=f"Expert '{source}' cannot be resolved"):
        get_peft_model(base, LoraMixerConfig(experts=["org/lora-math", source], top_k=1))
    assert_unchanged(base, before)


def test_hub_pickle_only_expert_is_refused(hub, tmp_path):
    hub.publish_folder("org/old-lora", save_pickle_lora(tmp_path / "pickle"))
    with pytest.raises(ExpertError, match="'org/old-lora' has only a pickle checkpoint"):
        get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=["org/old-lora"], top_k=1))


def test_target_without_any_expert_is_refused(folders):
    base = tiny_model("llama")
    before = snapshot(base)
    config = LoraMixerConfig(experts=[folders["math"]], top_k=1, target_modules=["q_proj", "k_proj"])
    with pytest.raises(ExpertError, match="k_proj.*none of the experts adapts"):
        get_peft_model(base, config)
    assert_unchanged(base, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(experts=["not a repo id!"]), "neither an existing folder nor a valid Hub id"),
        (dict(experts=[{"repo": "org/a"}]), "needs 'id'"),
        (dict(experts=[]), "non-empty list"),
        (dict(experts=["org/a", "org/b"], num_experts=3, top_k=1), "num_experts"),
    ],
)
def test_malformed_expert_list_fails_in_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraMixerConfig(**kwargs)


def test_saved_config_is_plain_json(tmp_path, sources):
    mixer = get_peft_model(tiny_model("llama"), LoraMixerConfig(experts=sources, top_k=2))
    mixer.save_pretrained(tmp_path / "mixer")
    saved = json.loads((tmp_path / "mixer" / "adapter_config.json").read_text())
    assert saved["num_experts"] == 4 and len(saved["resolved_experts"]) == 4
    assert "hub_kwargs" not in saved


def test_preservation_term_follows_trainable_experts_from_disk(tmp_path):
    """Trainable experts loaded with `from_experts` and a preservation weight: the term grows as they move."""
    folders = [save_lora(tmp_path / f"expert{i}", seed=i, r=4, target_modules=["q_proj", "v_proj"]) for i in range(2)]
    model = from_experts(tiny_model("llama"), folders, trainable_experts=True, rsl_preservation_weight=1.0).train()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids)
    assert model.routing_loss().preservation.item() == 0.0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.routing_loss().preservation.item() > 0.0
