"""The PEFT lifecycle: disable, several adapters, unload, merge refusal, generation, dtypes."""

import pytest
import torch
from mixers import mixer
from peft import PeftModel, get_peft_model
from tiny_models import VOCAB, tiny_model

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer


def ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def test_disable_adapter_gives_the_base_output_exactly():
    model = mixer()
    base = tiny_model("llama").requires_grad_(False)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids()).logits, base(input_ids=ids()).logits)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids()).logits, base(input_ids=ids()).logits)


def test_several_named_adapters_switch_and_delete():
    model = mixer()
    model.add_adapter("second", LoraMixerConfig(num_experts=2, top_k=1, r=2, routing="topk", init_weights=False))
    model.peft_config["default"].rsl_preservation_weight = 1.0
    model.set_trainable(routers=True, experts=[0], adapter_name="default")  # anchors and gradient hooks
    model.load_routing_loss_state({"entropy_weights": {"default": 0.5, "second": 0.2}})
    with torch.no_grad():
        first = model(input_ids=ids()).logits
        model.set_adapter("second")
        second = model(input_ids=ids()).logits
        assert not torch.allclose(first, second)
        trainable = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
        assert trainable <= {"second", "weight", "bias"}
        assert all(".second" in n for n, p in model.named_parameters() if p.requires_grad)

        model.delete_adapter("default")
        for layer in (m for m in model.modules() if isinstance(m, LoraMixerLayer)):
            # every container the layer keeps per adapter (modules, parameters, buffers, plain dicts)
            containers = [
                c
                for c in [*vars(layer).values(), *layer._modules.values()]
                if hasattr(c, "keys") and "second" in c.keys()
            ]
            assert len(containers) >= 9 and all("default" not in c.keys() for c in containers)
        assert torch.equal(model(input_ids=ids()).logits, second)
    assert list(model.peft_config) == ["second"]
    tuner = model.base_model  # nothing of the deleted adapter is kept for training either
    assert list(tuner.entropy_weights.weights) == ["second"]
    assert "default" not in tuner.trainable.anchors and "default" not in tuner.trainable.expert_grad_hooks


def test_unload_returns_the_base_model_intact():
    base = tiny_model("mamba")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraMixerConfig(num_experts=2, r=2, init_weights=False))
    unloaded = model.unload()
    assert not any(isinstance(m, LoraMixerLayer) for m in unloaded.modules())
    assert unloaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in reference.items())
    mixers = [m for m in unloaded.modules() if hasattr(m, "A_log")]
    assert mixers and all(not m._forward_pre_hooks and not m._forward_hooks for m in mixers)
    with torch.no_grad():
        assert torch.equal(
            unloaded(input_ids=ids()).logits, tiny_model("mamba").requires_grad_(False)(input_ids=ids()).logits
        )


def test_merge_is_refused_with_an_explanation():
    model = mixer()
    with pytest.raises(NotImplementedError, match="depends on the input.*unload"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    assert any(isinstance(m, LoraMixerLayer) for m in model.modules())


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mamba", "t5"])
def test_greedy_generation_with_cache_equals_without(model_type):
    model = mixer(model_type).eval()
    prompt = ids(2, 5)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **settings)
        uncached = model.generate(input_ids=prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_bf16_model_trains_and_keeps_the_router_in_float32():
    model = mixer(dtype=torch.bfloat16).train()
    layer = next(m for m in model.modules() if isinstance(m, LoraMixerLayer))
    assert layer.loramixer_router["default"].weight.dtype == torch.float32  # PEFT's adapter upcast
    out = model(input_ids=ids(), labels=ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.loramixer_router["default"].weight.grad.abs().sum() > 0
    probs = layer.router_probs(torch.randn(3, layer.in_features, dtype=torch.bfloat16), "default")
    assert probs.dtype == torch.float32


def test_dropout_applies_to_experts_only_in_training():
    model = mixer(lora_dropout=0.5)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=ids()).logits, model(input_ids=ids()).logits)
        model.train()
        assert not torch.equal(model(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_set_routing_changes_only_the_routing_and_is_saved(tmp_path):
    """Trained `soft`, used `topk` top-2: the config and the layers' shared routing table change, nothing else; the
    model then computes what a model built `topk` with the same weights computes, also after a reload."""
    model = mixer(routing="soft", top_k=1)
    model.add_adapter("other", LoraMixerConfig(num_experts=3, r=2, routing="soft", top_k=1, init_weights=False))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    config_before = model.peft_config["default"].to_dict()
    layers = [m for m in model.modules() if isinstance(m, LoraMixerLayer)]
    settings_before = [dict(layer.router_settings) for layer in layers]

    table = model.base_model.router_settings
    assert all(layer.router_settings is table for layer in layers)  # one home, however many layers

    model.set_routing(routing="topk", top_k=2, adapter_name="default")

    assert model.peft_config["default"].to_dict() == {**config_before, "routing": "topk", "top_k": 2}
    assert model.peft_config["other"].routing == "soft" and model.peft_config["other"].top_k == 1
    for layer, before in zip(layers, settings_before):
        assert layer.router_settings["default"] == before["default"]._replace(mode="topk", top_k=2)
        assert layer.router_settings["other"] == before["other"]
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())

    reference = mixer(routing="topk", top_k=2)
    reference.load_state_dict(state, strict=False)
    with torch.no_grad():
        want = reference(input_ids=ids()).logits
        torch.testing.assert_close(model(input_ids=ids()).logits, want, rtol=0, atol=0)
        model.save_pretrained(tmp_path)
        reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
        assert reloaded.peft_config["default"].routing == "topk" and reloaded.peft_config["default"].top_k == 2
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, want, rtol=0, atol=0)

    model.set_routing(top_k=1)  # the active adapter, its routing kept
    assert model.peft_config["default"].routing == "topk" and layers[0].router_settings["default"].top_k == 1
