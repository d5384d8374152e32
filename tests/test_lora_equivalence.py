"""A routed expert forced one-hot equals PEFT's own LoRA holding the same A/B weights."""

import pytest
import torch
from lora_experts import save_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_model

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer


def copy_expert_into_lora(mixer_model, lora_model, expert: int, rank: int) -> None:
    """Write expert `expert`'s rank slots of every mixer layer into the matching PEFT LoRA layer."""
    lora_modules = dict(lora_model.named_modules())
    for name, module in mixer_model.named_modules():
        if isinstance(module, LoraMixerLayer):
            lora_layer = lora_modules[name]
            rows = slice(expert * rank, (expert + 1) * rank)
            with torch.no_grad():
                lora_layer.lora_A["default"].weight.copy_(module.loramixer_A["default"][rows])
                lora_layer.lora_B["default"].weight.copy_(module.loramixer_B["default"][:, rows])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "mamba"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forced_expert_equals_peft_lora(model_type, use_rslora):
    rank, alpha, experts = 4, 12, 3
    targets = {
        "gpt2": ["c_attn", "attn.c_proj"],
        "phi3": ["qkv_proj", "o_proj"],
        "mamba": ["in_proj"],
    }  # PEFT LoRA refuses Mamba out_proj
    target_modules = targets.get(model_type, ["q_proj", "k_proj", "v_proj", "o_proj"])
    mixer_model = get_peft_model(
        tiny_model(model_type),
        LoraMixerConfig(
            num_experts=experts,
            r=rank,
            lora_alpha=alpha,
            use_rslora=use_rslora,
            target_modules=target_modules,
            init_weights=False,
        ),
    )
    lora_model = get_peft_model(
        tiny_model(model_type),
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            use_rslora=use_rslora,
            target_modules=target_modules,
            fan_in_fan_out=model_type == "gpt2",
        ),
    )
    ids = torch.randint(0, VOCAB, (2, 7))
    for expert in range(experts):
        copy_expert_into_lora(mixer_model, lora_model, expert, rank)
        with torch.no_grad(), mixer_model.route_to(expert):
            routed = mixer_model(input_ids=ids).logits
        with torch.no_grad():
            expected = lora_model(input_ids=ids).logits
        torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def test_forced_expert_equals_peft_lora_on_bfloat16_model():
    """Float32 experts on a bfloat16 model (PEFT's `autocast_adapter_dtype`): the delta is added in float32 and the
    sum rounded once to bfloat16, as PEFT LoRA does."""
    rank, target_modules = 4, ["q_proj", "v_proj"]
    mixer_model = get_peft_model(
        tiny_model("llama").to(torch.bfloat16),
        LoraMixerConfig(num_experts=2, r=rank, target_modules=target_modules, init_weights=False),
    )
    lora_model = get_peft_model(
        tiny_model("llama").to(torch.bfloat16), LoraConfig(r=rank, target_modules=target_modules)
    )
    layer = mixer_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.loramixer_A["default"].dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    copy_expert_into_lora(mixer_model, lora_model, expert=1, rank=rank)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad(), mixer_model.route_to(1):
        routed = mixer_model(input_ids=ids).logits
    with torch.no_grad():
        expected = lora_model(input_ids=ids).logits
        with lora_model.disable_adapter():
            base = lora_model(input_ids=ids).logits
    assert routed.dtype == torch.bfloat16
    assert (expected - base).abs().max() > 0.1  # the experts matter at this tolerance
    torch.testing.assert_close(routed, expected, rtol=1.6e-2, atol=1e-2)  # bfloat16: 8 bits of mantissa


def test_route_to_one_expert_per_sample():
    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=3, r=2, init_weights=False))
    ids = torch.randint(0, VOCAB, (3, 6))
    with torch.no_grad():
        with model.route_to([2, 0, 1]):
            mixed = model(input_ids=ids).logits
        for sample, expert in enumerate([2, 0, 1]):
            with model.route_to(expert):
                alone = model(input_ids=ids[sample : sample + 1]).logits
            torch.testing.assert_close(mixed[sample : sample + 1], alone, rtol=1e-5, atol=1e-6)


def test_route_to_restores_learned_routing():
    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=3, r=2, init_weights=False))
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        learned = model(input_ids=ids).logits
        with model.route_to([0, 1]):
            assert not torch.allclose(model(input_ids=ids).logits, learned)
        assert torch.equal(model(input_ids=ids).logits, learned)


def test_experts_from_files_stay_exact_on_a_bfloat16_base(tmp_path):
    """Experts read from float32 files keep their values and their scales on a bfloat16 base, as PEFT keeps LoRA
    weights in float32 there; new experts and routers are float32 as PEFT's are."""
    folders = [
        save_lora(tmp_path / f"e{seed}", seed, r=3, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        for seed in range(2)
    ]  # scale 16 / 3: not a bfloat16 number
    mixer = get_peft_model(tiny_model("llama", dtype=torch.bfloat16), LoraMixerConfig(experts=folders))
    layer = mixer.base_model.model.model.layers[0].self_attn.q_proj
    file = load_file(f"{folders[1]}/adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    assert torch.equal(layer.loramixer_A["default"][3:], file[f"{prefix}.lora_A.weight"])
    assert torch.equal(layer.loramixer_B["default"][:, 3:], file[f"{prefix}.lora_B.weight"])
    assert torch.equal(layer.loramixer_expert_scaling["default"], torch.tensor([16 / 3, 16 / 3]))
    assert layer.loramixer_router["default"].weight.dtype == torch.float32

    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_model("llama"), folders[1])(input_ids=ids).logits  # float32 reference
        lora_bf16 = PeftModel.from_pretrained(tiny_model("llama", dtype=torch.bfloat16), folders[1])
        peft_error = (lora_bf16(input_ids=ids).logits.float() - want).abs().max()
        with mixer.route_to(1):
            routed = mixer(input_ids=ids).logits
        assert (routed.float() - want).abs().max() <= peft_error

        mixer.save_pretrained(tmp_path / "mixer")
        reloaded = PeftModel.from_pretrained(tiny_model("llama", dtype=torch.bfloat16), tmp_path / "mixer")
        assert torch.equal(reloaded(input_ids=ids).logits, mixer(input_ids=ids).logits)

    new = get_peft_model(tiny_model("llama", dtype=torch.bfloat16), LoraMixerConfig(num_experts=2, r=3))
    new_layer = new.base_model.model.model.layers[0].self_attn.q_proj
    assert {p.dtype for p in new_layer.parameters() if p.requires_grad} == {torch.float32}
    assert new_layer.loramixer_expert_scaling["default"].dtype == torch.float32


def test_experts_follow_the_base_dtype_without_autocast_adapter_dtype(tmp_path):
    """`autocast_adapter_dtype=False` keeps PEFT LoRA weights in the base's dtype: the experts follow it too."""
    folder = save_lora(tmp_path / "e0", 0, r=3, target_modules=["q_proj"])
    mixer = get_peft_model(
        tiny_model("llama", dtype=torch.bfloat16),
        LoraMixerConfig(experts=[folder], top_k=1),
        autocast_adapter_dtype=False,
    )
    layer = mixer.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.loramixer_A["default"].dtype == layer.loramixer_router["default"].weight.dtype == torch.bfloat16
