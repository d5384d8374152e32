"""QLoRA: the mixer over a bitsandbytes 4-bit (nf4, fp4) or 8-bit base on CPU trains, matches PEFT LoRA, saves, reloads.

bitsandbytes' CPU 4-bit kernels need in_features to be a multiple of the quantisation block (64), hence a base a bit
wider than the other tests' tiny llama.
"""

from __future__ import annotations

import pytest
import torch
from lora_experts import save_lora
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open
from tiny_models import VOCAB
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from peft_lora_mixer import LoraMixerConfig, from_experts

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
INPUT = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> str:
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def expert_folders(base_folder, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("experts")
    return [
        save_lora(
            root / "a",
            seed=1,
            base=AutoModelForCausalLM.from_pretrained(base_folder),
            r=4,
            target_modules=["q_proj", "v_proj"],
        ),
        save_lora(
            root / "b",
            seed=2,
            base=AutoModelForCausalLM.from_pretrained(base_folder),
            r=2,
            lora_alpha=8,
            target_modules=["q_proj", "o_proj"],
        ),
    ]


def quantized(base_folder: str, kind: str, **overrides) -> AutoModelForCausalLM:
    config = BitsAndBytesConfig(**{**QUANTIZATIONS[kind], **overrides})
    return AutoModelForCausalLM.from_pretrained(base_folder, quantization_config=config).eval()


def qlora_mixer(base_folder: str, kind: str, gradient_checkpointing: bool) -> PeftModel:
    model = prepare_model_for_kbit_training(quantized(base_folder, kind), gradient_checkpointing)
    torch.manual_seed(3)
    return get_peft_model(model, LoraMixerConfig(num_experts=3, r=4, top_k=2, init_weights=False))


def trainable_gradients(model: PeftModel) -> dict[str, torch.Tensor]:
    model.train()
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_qlora_trains_routers_and_experts_with_gradient_checkpointing(base_folder, kind):
    checkpointed = qlora_mixer(base_folder, kind, gradient_checkpointing=True)
    assert checkpointed.base_model.model.is_gradient_checkpointing
    gradients = trainable_gradients(checkpointed)
    kinds = {name.split(".loramixer_")[1].split(".")[0] for name in gradients}
    assert kinds == {"A", "B", "router"}  # nothing else trains, in particular no quantised weight
    assert all(grad is not None and grad.abs().sum() > 0 for grad in gradients.values())
    assert checkpointed.routing_loss().total > 0  # the RSL is part of the loss, through the recomputed forward too

    plain = trainable_gradients(qlora_mixer(base_folder, kind, gradient_checkpointing=False))
    assert gradients.keys() == plain.keys()
    for name, grad in gradients.items():  # recomputing the forward changes no gradient
        torch.testing.assert_close(grad, plain[name], msg=name)


@pytest.mark.parametrize(
    ("kind", "overrides", "tolerance"),
    [
        ("nf4", {}, None),
        ("fp4", {}, None),
        ("int8", {}, None),
        ("nf4", {"bnb_4bit_quant_storage": torch.bfloat16}, None),  # the storage FSDP-QLoRA uses
        # bfloat16 compute rounds each quantised layer's input: float32 rounding noise may flip one bfloat16 digit
        ("nf4", {"bnb_4bit_compute_dtype": torch.bfloat16}, dict(rtol=0, atol=2e-2)),
    ],
)
def test_forced_routing_over_quantized_base_equals_peft_lora(base_folder, expert_folders, kind, overrides, tolerance):
    mixer = from_experts(quantized(base_folder, kind, **overrides), expert_folders, top_k=1)
    assert {p.dtype for name, p in mixer.named_parameters() if ".loramixer_" in name} == {torch.float32}
    for expert, folder in enumerate(expert_folders):
        lora = PeftModel.from_pretrained(quantized(base_folder, kind, **overrides), folder)
        with torch.no_grad(), mixer.route_to(expert):
            routed = mixer(input_ids=INPUT).logits
        with torch.no_grad():
            expected = lora(input_ids=INPUT).logits
        torch.testing.assert_close(routed, expected, **(tolerance or {}))


def test_qlora_mixer_saves_reloads_and_generates(base_folder, tmp_path):
    mixer = qlora_mixer(base_folder, "nf4", gradient_checkpointing=True)
    optimizer = torch.optim.AdamW([p for p in mixer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        trainable_gradients(mixer)
        optimizer.step()
        optimizer.zero_grad()
    mixer.eval()
    with torch.no_grad():
        expected = mixer(input_ids=INPUT).logits
    generated = mixer.generate(input_ids=INPUT[:1, :4], max_new_tokens=6, do_sample=False)

    mixer.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as file:
        assert all(".loramixer_" in name for name in file.keys())  # none of the quantised base
    loaded = PeftModel.from_pretrained(quantized(base_folder, "nf4"), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT).logits, expected, rtol=0, atol=0)
    assert torch.equal(loaded.generate(input_ids=INPUT[:1, :4], max_new_tokens=6, do_sample=False), generated)
    assert generated.shape == (1, 10)
