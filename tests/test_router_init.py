"""Routers initialised from their experts (`router_init="experts"`), checked against independent computations."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_model

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer, from_experts
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
    with pytest.raises(ValueError, match="Unknown `router_init` 'svd'; choose one of random, experts, arrow"):
        LoraMixerConfig(router_init="svd")


@pytest.fixture
def arrow_expert_dirs(tmp_path):
    """Three rank-3 LoRAs on q/v/o (PEFT's Arrow needs one rank and one target set), each with one input direction
    much stronger than the others, so that Arrow's 15 power iterations reach the top singular vector; the third
    has a zero delta on o_proj (Arrow's prototype is then 0, like an expert absent there)."""
    folders = []
    for index in range(3):
        config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"])
        model = get_peft_model(tiny_model("llama"), config)  # tiny_model seeds torch: draw the factors after it
        generator = torch.Generator().manual_seed(10 + index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
                if "lora_A" in name:
                    parameter[0].mul_(6.0)
                if "lora_B" in name and index == 2 and "o_proj" in name:
                    parameter.zero_()
        model.save_pretrained(tmp_path / f"arrow{index}")
        folders.append(str(tmp_path / f"arrow{index}"))
    return folders


def arrow_inputs_and_choices(model, module: str, input_ids: torch.Tensor, top_k: int) -> tuple[torch.Tensor, ...]:
    """PEFT Arrow's own per-token choice on `module`: the input it saw, its top_k experts (sorted) and coefficients."""
    layer = model.base_model.model.get_submodule(module)
    seen = []
    handle = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        output = model(input_ids=input_ids).logits
    handle.remove()
    tokens = seen[0].reshape(-1, seen[0].shape[-1])
    scores = (tokens @ layer.lora_arrow["arrow_router"].prototypes.t()).abs()
    top, chosen = scores.topk(top_k, dim=-1)
    coefficients = torch.zeros_like(scores).scatter(1, chosen, torch.softmax(top, dim=-1))
    return tokens, chosen.sort(-1).values, coefficients, output


@pytest.mark.parametrize("top_k", [1, 2])
def test_arrow_init_routes_each_token_as_peft_arrow_does(arrow_expert_dirs, top_k):
    from peft import ArrowConfig, create_arrow_model

    input_ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    arrow = create_arrow_model(tiny_model("llama"), arrow_expert_dirs, ArrowConfig(top_k=top_k, rng_seed=0)).eval()
    mixer = from_experts(tiny_model("llama"), arrow_expert_dirs, router_init="arrow", top_k=top_k).eval()
    assert mixer.peft_config["default"].num_experts == 6
    with torch.no_grad():
        mixer_output = mixer(input_ids=input_ids).logits
    for module in (Q_PROJ, "model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.o_proj"):
        tokens, expected, coefficients, arrow_output = arrow_inputs_and_choices(arrow, module, input_ids, top_k)
        layer = mixer.base_model.model.get_submodule(module)
        with torch.no_grad():  # slots 2e and 2e + 1 are expert e
            chosen = layer.router_logits(tokens, "default").topk(top_k, dim=-1).indices // 2
            gates = layer.gates(tokens, "default").view(len(tokens), 3, 2).sum(-1)
        assert torch.equal(chosen.sort(-1).values, expected)
        assert torch.allclose(gates, coefficients, atol=1e-5)
    assert torch.allclose(mixer_output, arrow_output, atol=1e-4)


def test_arrow_init_trains_as_a_router_and_saves_its_pairs(arrow_expert_dirs, tmp_path):
    model = from_experts(tiny_model("llama"), arrow_expert_dirs, router_init="arrow", top_k=2)
    router = model.base_model.model.get_submodule(Q_PROJ).loramixer_router["default"]
    start = router.weight.detach().clone()
    assert torch.allclose(start[0::2], -start[1::2]) and torch.allclose(start.norm(dim=-1), torch.ones(6), atol=1e-5)
    model.train()
    model(input_ids=torch.arange(3, 19).view(2, 8), labels=torch.arange(3, 19).view(2, 8)).loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "mixer")
    saved = LoraMixerConfig.from_pretrained(tmp_path / "mixer")
    assert (saved.router_init, saved.num_experts, len(saved.resolved_experts)) == ("arrow", 6, 6)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "mixer")
    assert torch.equal(loaded.base_model.model.get_submodule(Q_PROJ).loramixer_router["default"].weight, router.weight)


def test_arrow_init_with_fewer_target_modules_than_the_experts_adapt(arrow_expert_dirs):
    full = from_experts(tiny_model("llama"), arrow_expert_dirs, router_init="arrow", top_k=2)
    model = from_experts(
        tiny_model("llama"), arrow_expert_dirs, router_init="arrow", top_k=2, target_modules=["q_proj"]
    )
    router = model.base_model.model.get_submodule(Q_PROJ).loramixer_router["default"]
    expected = full.base_model.model.get_submodule(Q_PROJ).loramixer_router["default"]
    assert torch.equal(router.weight, expected.weight)
    assert not isinstance(model.base_model.model.get_submodule("model.layers.0.self_attn.v_proj"), LoraMixerLayer)


def test_arrow_init_refuses_a_top_k_arrow_cannot_have(arrow_expert_dirs):
    with pytest.raises(ValueError, match="keeps the top_k of the 3 experts, as Arrow does; `top_k` must be at most 3"):
        LoraMixerConfig(experts=arrow_expert_dirs, router_init="arrow", top_k=4)
    with pytest.raises(ValueError, match=r"held twice each by router_init=arrow"):
        LoraMixerConfig(experts=arrow_expert_dirs, router_init="arrow", num_experts=3)
