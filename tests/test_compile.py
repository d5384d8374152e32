"""`torch.compile` trains what eager trains: the RSL's gradient reaches the routers in the compiled backward, for
every routing mode and RSL option, in a hand loop, the Trainer and TRL; training and inference trace as one graph.

The compiled runs use the `aot_eager` backend: it traces forward and backward as AOTAutograd does for inductor (where
a backward that read Python state at backward time went wrong) without inductor's code generation, which takes
minutes on a CPU; one slow test runs inductor itself.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from mixers import batch, mixer, rsl_mixer
from torch._dynamo.utils import counters
from transformers import GenerationConfig, Trainer, TrainingArguments
from transformers.generation import CompileConfig

from peft_lora_mixer import RoutingCallback

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def step_gradients(model, inputs, compiled: bool, fullgraph: bool = True, backend: str = BACKEND):
    """One training forward and backward of `outputs.loss`: the trainable parameters' gradients."""
    model.zero_grad()
    forward = torch.compile(model, backend=backend, fullgraph=fullgraph) if compiled else model
    forward(**inputs).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def assert_close_relative(got, expected, rtol=1e-4):
    assert got.keys() == expected.keys() and any("router" in name for name in expected)
    for name, value in expected.items():
        error = (got[name] - value).norm() / value.norm().clamp_min(1e-12)
        assert error <= rtol, f"{name}: relative difference {error.item():.2e}"


def assert_rsl_matters(model_factory, inputs):
    """The RSL changes the routers' gradients: otherwise a backward without it would pass these tests."""
    with_rsl = step_gradients(model_factory(), inputs, compiled=False)
    model = model_factory()
    for config in model.peft_config.values():
        config.add_routing_loss = False
    without = step_gradients(model, inputs, compiled=False)
    router = next(name for name in with_rsl if "router" in name)
    assert (with_rsl[router] - without[router]).norm() > 0.05 * with_rsl[router].norm()


def compiled_equals_eager(model_factory, inputs, steps: int = 1, fullgraph: bool = True, lr: float = 0.5):
    """Train `steps` SGD steps eagerly and compiled from the same start; every step's gradients must agree."""
    eager, compiled = model_factory(), model_factory()
    compiled.load_state_dict(eager.state_dict())
    eager_opt = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=lr)
    compiled_opt = torch.optim.SGD([p for p in compiled.parameters() if p.requires_grad], lr=lr)
    forward = torch.compile(compiled, backend=BACKEND, fullgraph=fullgraph)
    for _ in range(steps):
        expected = step_gradients(eager, inputs, compiled=False)
        compiled.zero_grad()
        forward(**inputs).loss.backward()
        got = {name: p.grad.clone() for name, p in compiled.named_parameters() if p.grad is not None}
        assert_close_relative(got, expected)
        reported, reported_eager = compiled.routing_loss(), eager.routing_loss()
        torch.testing.assert_close(reported.total, reported_eager.total, rtol=1e-5, atol=1e-6)
        eager_opt.step()
        compiled_opt.step()
    return eager, compiled


@pytest.mark.parametrize("routing", ["hard_soft", "topk", "soft"])
def test_compiled_training_step_equals_eager_with_the_rsl(routing):
    def factory():
        model = rsl_mixer(routing=routing)
        model.set_trainable(routers=True, experts=True)
        return model

    inputs = batch()
    assert_rsl_matters(factory, inputs)
    compiled_equals_eager(factory, inputs, steps=2)


def test_compiled_selected_experts_model_equals_eager():
    """64 experts, top-2 over 256 tokens: eager computes the selected experts only, compiled (on CPU) the dense
    mixture; both give the same gradients, the RSL's included."""
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, labels=ids)
    compiled_equals_eager(lambda: rsl_mixer(routing="topk", num_experts=64, r=4), inputs)


@pytest.mark.slow
def test_adaptive_entropy_target_and_preservation_compile_exactly():
    """lambda moves each step (a tensor the compiled graph reads afresh) and the preservation term pulls the trained
    experts back to theta(0): three steps, compiled and eager, agree at every step."""

    def factory():
        model = rsl_mixer(rsl_entropy_target=0.2, rsl_entropy_adapt_rate=0.5, rsl_preservation_weight=0.5)
        model.set_trainable(routers=True, experts=True)
        return model

    eager, compiled = compiled_equals_eager(factory, batch(), steps=3)
    lam_eager, lam_compiled = eager.routing_loss().entropy_weight, compiled.routing_loss().entropy_weight
    assert lam_eager != 0.3  # the controller moved it
    torch.testing.assert_close(lam_compiled, lam_eager)
    assert eager.routing_loss().preservation > 0


def test_global_batch_balance_compiles_with_its_all_reduce():
    """`rsl_balance_scope="global_batch"` all-reduces the routers' usage inside the forward; in a one-process group
    it is the local usage, compiled or not."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        compiled_equals_eager(lambda: rsl_mixer(rsl_balance_scope="global_batch"), batch())
    finally:
        dist.destroy_process_group()


def test_forced_routing_compiles_exactly():
    """Stage 1: `expert_ids` in the forward's keywords, and `route_to`; the experts train, the routers get nothing."""

    def factory():
        model = rsl_mixer()
        model.set_trainable(routers=False, experts=True)
        return model

    inputs = {**batch(), "expert_ids": torch.tensor([2, 0])}
    eager, compiled = factory(), factory()
    compiled.load_state_dict(eager.state_dict())
    expected = step_gradients(eager, inputs, compiled=False)
    got = step_gradients(compiled, inputs, compiled=True, fullgraph=False)  # the ids are checked on the host
    assert not any("router" in name for name in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-7)
    torch._dynamo.reset()
    with compiled.route_to([2, 0]):  # set outside the compiled call: the ids are plain inputs of one graph
        forced = step_gradients(compiled, batch(), compiled=True, fullgraph=True)
    for name, value in expected.items():
        torch.testing.assert_close(forced[name], value, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_compiles_exactly(reentrant):
    def factory():
        model = rsl_mixer()
        model.set_trainable(routers=True, experts=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return model

    compiled_equals_eager(factory, batch(), fullgraph=False)


def seeded_rsl_mixer():
    torch.manual_seed(0)
    return rsl_mixer()


def trainer_weights(tmp_path, compiled: bool, accumulation: int) -> dict[str, torch.Tensor]:
    model = seeded_rsl_mixer()
    model.set_trainable(routers=True, experts=True)
    ids = torch.randint(2, 128, (8, 10), generator=torch.Generator().manual_seed(0))
    samples = [dict(input_ids=row, labels=row) for row in ids]
    args = TrainingArguments(
        str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_steps=3,
        learning_rate=5e-2,
        per_device_train_batch_size=8 // accumulation // 2,
        gradient_accumulation_steps=accumulation,
        torch_compile=compiled,
        torch_compile_backend=BACKEND if compiled else None,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=samples, callbacks=[RoutingCallback()]).train()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_torch_compile_trains_what_eager_trains(tmp_path, accumulation):
    eager = trainer_weights(tmp_path / "eager", compiled=False, accumulation=accumulation)
    compiled = trainer_weights(tmp_path / "compiled", compiled=True, accumulation=accumulation)
    start = {name: p.detach() for name, p in seeded_rsl_mixer().named_parameters() if name in eager}
    assert any((eager[name] - start[name]).abs().max() > 0 for name in eager if "router" in name)
    assert_close_relative(compiled, eager)


@pytest.mark.parametrize("model_type,routing", [("llama", "hard_soft"), ("llama", "topk"), ("mamba", "hard_soft")])
def test_training_and_inference_trace_as_one_graph(model_type, routing):
    """`fullgraph=True` refuses any graph break: a host sync (`.item()`, a data-dependent shape) or untraceable
    Python on the hot path would raise here. Inference (eval, no_grad) equals eager."""
    model = rsl_mixer(model_type, routing=routing)
    inputs = batch()
    step_gradients(model, inputs, compiled=True)  # training forward + backward
    model.eval()
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"]).logits
        torch.testing.assert_close(compiled(input_ids=inputs["input_ids"]).logits, expected)


def test_generate_with_static_cache_and_compile_config_equals_eager():
    model = mixer(routing="hard_soft")
    model.eval()
    prompt = batch()["input_ids"][:, :4]
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(input_ids=prompt, generation_config=copy.deepcopy(config), disable_compile=True)
    config.compile_config = CompileConfig(fullgraph=True, backend=BACKEND)
    config.compile_config._compile_all_devices = True  # transformers compiles decoding on accelerators only
    got = model.generate(input_ids=prompt, generation_config=config)
    assert counters["stats"]["unique_graphs"] >= 1  # the decoding steps really ran compiled, as one graph
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_sft_trainer_with_torch_compile_trains_the_routers_with_the_rsl(tmp_path):
    from datasets import Dataset
    from tiny_tokenizer import tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    def run(compiled: bool):
        model = seeded_rsl_mixer()
        ids = torch.randint(2, 128, (8, 10), generator=torch.Generator().manual_seed(0))
        args = SFTConfig(
            str(tmp_path / str(compiled)),
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=5e-2,
            report_to=[],
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
            gradient_checkpointing=False,
            torch_compile=compiled,
            torch_compile_backend=BACKEND if compiled else None,
        )
        dataset = Dataset.from_dict({"input_ids": ids.tolist()})
        SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer()).train()
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    assert_close_relative(run(True), run(False))


@pytest.mark.slow
def test_inductor_training_step_equals_eager():
    """The real backend, once: inductor's generated kernels give eager's gradients, the RSL's included."""
    inputs = batch()
    expected = step_gradients(rsl_mixer(), inputs, compiled=False)
    assert_close_relative(step_gradients(rsl_mixer(), inputs, compiled=True, backend="inductor"), expected)
