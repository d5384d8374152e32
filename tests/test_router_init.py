"""Routers initialised from their experts (`router_init="experts"`), checked against independent computations."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_model

from peft_lora_mixer import LoraMixerConfig, from_experts
from peft_lora_mixer.experts.router_init import CALIBRATION_SHAPE, top_input_direction

Q_PROJ, K_PROJ = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"


@pytest.fixture
def expert_dirs(tmp_path):
    """Two random LoRAs of ranks 2 and 3; the first does not adapt k_proj."""
    folders = []
    for index, targets in enumerate([["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"]]):
        torch.manual_seed(index)
        model = get_peft_model(
            tiny_model("llama"), LoraConfig(r=2 + index, target_modules=targets, init_lora_weights=False)
        )
        model.save_pretrained(tmp_path / f"expert{index}")
        folders.append(str(tmp_path / f"expert{index}"))
    return folders


def expert_delta(folder: str, module: str) -> torch.Tensor | None:
    """B @ A of one expert on one module, read back through plain PEFT."""
    model = PeftModel.from_pretrained(tiny_model("llama"), folder)
    layer = model.base_model.model.get_submodule(module)
    if not hasattr(layer, "lora_A"):
        return None
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def calibration_inputs(model, module: str) -> torch.Tensor:
    """The inputs `module` sees when the base model runs on the calibration's random token ids."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(model.config.vocab_size, CALIBRATION_SHAPE, generator=generator)
    seen = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_top_input_direction_is_the_top_right_singular_vector():
    lora_A, lora_B = torch.randn(3, 20), torch.randn(12, 3)
    expected = torch.linalg.svd(lora_B @ lora_A).Vh[0]
    direction = top_input_direction(lora_A, lora_B)
    assert torch.allclose(direction.abs(), expected.abs(), atol=1e-5)
    assert abs(float(direction @ expected)) == pytest.approx(1.0, abs=1e-5)
    assert top_input_direction(lora_A, torch.zeros(12, 3)) is None


def test_routers_point_along_each_experts_direction_signed_by_the_mean_input(expert_dirs):
    inputs = calibration_inputs(tiny_model("llama"), Q_PROJ)
    model = from_experts(tiny_model("llama"), expert_dirs, router_init="experts")
    router = model.base_model.model.get_submodule(Q_PROJ).loramixer_router["default"]
    for index, folder in enumerate(expert_dirs):
        direction = torch.linalg.svd(expert_delta(folder, Q_PROJ)).Vh[0]
        row = router.weight[index].detach()
        assert abs(float(row @ direction)) == pytest.approx(float(row.norm()), rel=1e-4)  # parallel
        assert float((inputs @ row).mean()) > 0  # the sign that makes the mean input score positive
    assert torch.equal(router.bias.detach(), torch.zeros(2))
    logits = router(inputs).detach()
    assert float(logits.square().mean().sqrt()) == pytest.approx(1.0, rel=1e-4)  # unit RMS over the experts present


def test_an_expert_absent_from_a_projection_gets_a_zero_row(expert_dirs):
    model = from_experts(tiny_model("llama"), expert_dirs, router_init="experts")
    router = model.base_model.model.get_submodule(K_PROJ).loramixer_router["default"]
    assert torch.equal(router.weight[0].detach(), torch.zeros(router.in_features))
    assert router.weight[1].detach().norm() > 0


def test_random_init_is_the_default_and_saved_in_the_config(expert_dirs, tmp_path):
    model = from_experts(tiny_model("llama"), expert_dirs)
    router = model.base_model.model.get_submodule(K_PROJ).loramixer_router["default"]
    assert router.weight[0].detach().norm() > 0 and router.bias.detach().abs().sum() > 0
    model.save_pretrained(tmp_path / "mixer")
    assert LoraMixerConfig.from_pretrained(tmp_path / "mixer").router_init == "random"


def test_a_loaded_mixer_keeps_its_saved_routers(expert_dirs, tmp_path):
    model = from_experts(tiny_model("llama"), expert_dirs, router_init="experts")
    router = model.base_model.model.get_submodule(Q_PROJ).loramixer_router["default"]
    with torch.no_grad():
        router.weight.mul_(-3.0)
    model.save_pretrained(tmp_path / "mixer")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "mixer")
    reloaded = loaded.base_model.model.get_submodule(Q_PROJ).loramixer_router["default"]
    assert torch.equal(reloaded.weight, router.weight)


def test_a_second_mixer_adapter_is_initialised_from_its_own_experts(expert_dirs):
    model = from_experts(tiny_model("llama"), expert_dirs)
    model.add_adapter("second", LoraMixerConfig(experts=expert_dirs[::-1], router_init="experts"))
    layer = model.base_model.model.get_submodule(Q_PROJ)
    first, second = layer.loramixer_router["default"].weight, layer.loramixer_router["second"].weight
    direction = torch.linalg.svd(expert_delta(expert_dirs[1], Q_PROJ)).Vh[0]
    assert abs(float(second[0] @ direction)) == pytest.approx(float(second[0].norm()), rel=1e-4)
    assert abs(float(first[1] @ direction)) < 0.9 * float(first[1].norm())  # the random router is left alone


def test_unknown_router_init_is_refused():
    with pytest.raises(ValueError, match="Unknown `router_init` 'svd'; choose one of random, experts"):
        LoraMixerConfig(router_init="svd")
