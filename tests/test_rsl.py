"""The Routing Specialization Loss: values, gradients, the adaptive lambda, and how it reaches the routers."""

import math

import pytest
import torch
from mixers import ProbeRouters, autograd_rsl, batch, rsl_mixer

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer
from peft_lora_mixer.routing_loss.loss import (
    RouterLossSettings,
    RouterUsage,
    balance_term,
    specialization_loss,
    specialization_loss_gradient,
    token_entropy,
    update_entropy_weight,
)

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.2, 0.9]])


def rsl(probs, top_k, alpha, lam, sign, mask=None):
    """The library's RSL value of one router."""
    usage = RouterUsage.of(probs, top_k, token_mask=mask)
    return specialization_loss(probs, usage, RouterLossSettings(alpha, lam, sign)).term


def backward_rsl(probs, top_k, alpha, lam, sign, mask=None):
    """Backpropagate the library's closed-form RSL gradient from `probs` (as the routers' node does)."""
    usage = RouterUsage.of(probs, top_k, token_mask=mask)
    probs.backward(specialization_loss_gradient(probs.detach(), usage, RouterLossSettings(alpha, lam, sign)))


def hand_rsl(logits, top_k, alpha, lam, sign):
    """The RSL with Python floats and loops, straight from its definition."""
    probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in logits.tolist()]
    n, e = len(probs), len(probs[0])
    pbar = [sum(p[i] for p in probs) / n for i in range(e)]
    fbar = [sum(i in sorted(range(e), key=lambda j: -p[j])[:top_k] for p in probs) / n for i in range(e)]
    entropy = sum(-sum(v * math.log(v) for v in p) for p in probs) / n
    return alpha * e * sum(a * b for a, b in zip(pbar, fbar)) + sign * lam * entropy


@pytest.mark.parametrize("top_k,sign", [(1, 1), (2, 1), (2, -1)])
def test_rsl_equals_hand_computation(top_k, sign):
    value = rsl(LOGITS.softmax(-1), top_k, 0.3, 0.2, sign)
    assert value.item() == pytest.approx(hand_rsl(LOGITS, top_k, 0.3, 0.2, sign), rel=1e-6)


def test_padding_tokens_do_not_count():
    probs = LOGITS.softmax(-1).view(2, 2, 3)
    mask = torch.tensor([[1, 1], [0, 1]])
    masked = rsl(probs, 1, 0.3, 0.2, 1, mask)
    assert masked.item() == pytest.approx(hand_rsl(LOGITS[[0, 1, 3]], 1, 0.3, 0.2, 1), rel=1e-6)


def test_balance_gradient_pushes_away_from_the_overloaded_expert():
    logits = torch.tensor([[3.0, 0.0, 0.0], [2.5, 0.5, 0.0], [2.0, 0.0, 1.0]], requires_grad=True)
    backward_rsl(logits.softmax(-1), 1, 1.0, 0.0, 1)
    assert (logits.grad[:, 0] > 0).all()  # descent lowers the logit of expert 0, which every token picks


@pytest.mark.parametrize("sign", [1, -1])
def test_entropy_gradient_sign(sign):
    logits = LOGITS.clone().requires_grad_()
    backward_rsl(logits.softmax(-1), 1, 0.0, 1.0, sign)
    before = token_entropy(LOGITS.softmax(-1)).mean()
    after = token_entropy((LOGITS - 0.1 * logits.grad).softmax(-1)).mean()
    assert (after < before) if sign == 1 else (after > before)


def test_balance_counts_every_expert_of_the_router():
    """E in `alpha * E * sum_i pbar_i fbar_i` is the router's number of experts, also when one gets no probability
    mass (routing to an expert without weights on a projection is a valid choice there)."""
    probs = torch.tensor([[0.7, 0.0, 0.3], [0.2, 0.0, 0.8]])
    usage = RouterUsage.of(probs, 1)
    assert usage.num_experts.item() == 3
    expected = 3 * (probs.mean(0) * torch.tensor([0.5, 0.0, 0.5])).sum()
    torch.testing.assert_close(balance_term(probs, usage), expected)


def test_entropy_of_absent_experts_has_finite_gradient():
    logits = torch.tensor([[1.0, -math.inf, 0.0]], requires_grad=True)
    backward_rsl(logits.softmax(-1), 1, 1.0, 1.0, 1)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("top_k,sign", [(1, 1), (2, 1), (2, -1)])
def test_closed_form_gradient_equals_autograd(top_k, sign):
    """The routers' backward uses the RSL's gradient in closed form; autograd of the loss is the reference, with
    absent experts (probability 0), probabilities below the entropy's clamp, and an empty batch."""
    torch.manual_seed(0)
    logits = torch.randn(33, 6) * 3
    logits[:, 4] = -math.inf  # an absent expert
    probs = logits.softmax(-1)
    probs[0, 1] = 1e-40  # subnormal: below the clamp that keeps the entropy's logarithm finite
    probs[1, 2] = 1e-30  # small, above it
    probs.requires_grad_()
    assert 0 < probs[0, 1] < torch.finfo(torch.float32).tiny < probs[1, 2]
    (expected,) = torch.autograd.grad(autograd_rsl(probs, top_k, 0.3, 0.7, sign), probs)
    backward_rsl(probs, top_k, 0.3, 0.7, sign)
    got = probs.grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)  # float32 sums in another order
    assert rsl(probs.detach(), top_k, 0.3, 0.7, sign).item() == pytest.approx(
        autograd_rsl(probs.detach(), top_k, 0.3, 0.7, sign).item(), rel=1e-6
    )
    padding = torch.zeros(probs.shape[0], dtype=torch.bool)  # a batch of padding only: no token counts
    usage = RouterUsage.of(probs, top_k, token_mask=padding)
    settings = RouterLossSettings(0.3, 0.7, sign)
    assert not specialization_loss_gradient(probs.detach(), usage, settings).any()
    assert specialization_loss(probs.detach(), usage, settings).term.item() == 0.0


def test_adaptive_lambda_controller_moves_toward_target():
    def step(weight, entropy, sign):
        return update_entropy_weight(torch.tensor(weight), torch.tensor(entropy), 0.5, 0.1, sign).item()

    assert step(0.1, 1.0, 1) == pytest.approx(0.15)
    assert step(0.1, 0.2, 1) == pytest.approx(0.07)
    assert step(0.01, 0.0, 1) == 0.0
    assert step(0.1, 0.2, -1) == pytest.approx(0.13)


@pytest.mark.parametrize(
    "field,value",
    [
        ("rsl_balance_weight", -1.0),
        ("rsl_entropy_weight", float("nan")),
        ("rsl_entropy_sign", 0),
        ("rsl_entropy_target", 5.0),
        ("rsl_entropy_adapt_rate", -0.1),
        ("rsl_preservation_weight", "1"),
    ],
)
def test_config_refuses_bad_rsl_values(field, value):
    with pytest.raises(ValueError, match=field):
        LoraMixerConfig(num_experts=4, **{field: value})


# ---- in the model --------------------------------------------------------------------------------------------


def parameter_gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def reference_gradients(model, inputs, task_weight=1.0, rsl_weight=1.0, **forward_kwargs) -> dict[str, torch.Tensor]:
    """Gradients of `task_weight * outputs.loss + rsl_weight * RSL`, the RSL by autograd (the model's own off)."""
    model.peft_config["default"].add_routing_loss = False
    with ProbeRouters() as probe:
        task = model(**inputs, **forward_kwargs).loss
    (task_weight * task + rsl_weight * probe.rsl(inputs["attention_mask"].bool())).backward()
    model.peft_config["default"].add_routing_loss = True
    return parameter_gradients(model)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])  # PeftModel and PeftModelForCausalLM forward differently
def test_outputs_loss_is_the_task_loss_and_the_reported_rsl_an_independent_computation(task_type):
    model, inputs = rsl_mixer(task_type=task_type), batch()
    with ProbeRouters() as probe:
        with_rsl = model(**inputs).loss
    routing = model.routing_loss()
    model.peft_config["default"].add_routing_loss = False
    task = model(**inputs).loss
    expected = probe.rsl(inputs["attention_mask"].bool())
    assert routing.scale.item() == 1.0
    assert with_rsl.item() == task.item()  # the RSL is reported, never added to `outputs.loss`
    assert routing.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert routing.total.item() == pytest.approx(0.5 * routing.balance.item() + 0.3 * routing.entropy.item(), rel=1e-5)


def test_no_rsl_in_eval_or_without_autograd_and_the_old_term_is_a_zero():
    model, inputs = rsl_mixer(), batch()
    model.eval()
    with torch.no_grad():
        eval_loss = model(**inputs).loss
    assert model.routing_loss() is None
    model.train()
    with torch.no_grad():
        model(**inputs)  # training mode without autograd (e.g. a metric pass): no RSL
    assert model.routing_loss() is None
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert outputs.loss is None and model.routing_loss().total.item() > 0  # label-free forwards build it too
    with pytest.warns(FutureWarning, match="no longer needed"):
        assert model.routing_loss_term().item() == 0.0
    model.peft_config["default"].add_routing_loss = False
    assert model(**inputs).loss.item() == pytest.approx(eval_loss.item(), abs=1e-6)
    assert all(layer.routing_observer is None for layer in model.modules() if isinstance(layer, LoraMixerLayer))


def test_routing_gradient_equals_direct_differentiation_whatever_scales_the_task_loss():
    model, inputs = rsl_mixer(), batch()
    model(**inputs).loss.backward()
    got = parameter_gradients(model)
    torch.testing.assert_close(got, reference_gradients(model, inputs), atol=1e-6, rtol=1e-5)
    # the RSL rides on the routers' probabilities: a loss scaled downstream does not scale it
    (model(**inputs).loss * 0.25).backward()
    injected = parameter_gradients(model)
    torch.testing.assert_close(injected, reference_gradients(model, inputs, task_weight=0.25), atol=1e-6, rtol=1e-5)
    assert any(injected[n].abs().sum() > 0 for n in injected if "router" in n)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    inputs = batch()

    def gradients(checkpointing):
        model = rsl_mixer()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        calls = []
        for layer in model.modules():
            if isinstance(layer, LoraMixerLayer):
                layer.register_forward_hook(lambda *args: calls.append(1))
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert checkpointed_calls == 2 * plain_calls  # every layer really was recomputed in backward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("sign", [1, -1])
def test_a_positive_entropy_weight_lowers_the_routers_entropy_over_training(sign):
    """`rsl_entropy_sign=1` with lambda > 0 sharpens routing, -1 flattens it (the config's docstring)."""
    model, inputs = rsl_mixer(rsl_balance_weight=0.0, rsl_entropy_weight=1.0, rsl_entropy_sign=sign), batch()
    model.set_trainable(routers=True, experts=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    entropies = []
    for _ in range(20):
        model(**inputs).loss.backward()
        entropies.append(model.routing_loss().entropy.item())
        optimizer.step()
        optimizer.zero_grad()
    assert (entropies[-1] < 0.8 * entropies[0]) if sign == 1 else (entropies[-1] > entropies[0] + 0.05)


def test_adaptive_lambda_in_the_model_moves_toward_target():
    model, inputs = rsl_mixer(rsl_entropy_target=0.0, rsl_entropy_adapt_rate=0.5), batch()
    model(**inputs)
    first = model.routing_loss()
    model(**inputs)
    second = model.routing_loss()
    assert first.entropy_weight.item() == pytest.approx(0.3)
    # entropy > target and we minimise it: lambda grows by rate * (H - target)
    assert second.entropy_weight.item() == pytest.approx(0.3 + 0.5 * first.entropy.item(), rel=1e-5)
    state = model.routing_loss_state()
    model.load_routing_loss_state({"entropy_weights": {"default": 0.05}})
    model(**inputs)
    assert model.routing_loss().entropy_weight.item() == pytest.approx(0.05)
    assert state is not None


def test_token_count_scaling_under_trainer_normalisation():
    model, inputs = rsl_mixer(), batch()
    model(**inputs, num_items_in_batch=torch.tensor(20)).loss.backward()
    got = parameter_gradients(model)
    counted = inputs["labels"][:, 1:].ne(-100).sum().item()
    assert model.routing_loss().scale.item() == pytest.approx(counted / 20)
    expected = reference_gradients(model, inputs, rsl_weight=counted / 20, num_items_in_batch=torch.tensor(20))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_without_a_token_count_the_rsl_is_averaged_over_the_accumulation_steps():
    model, inputs = rsl_mixer(), batch()
    model.base_model.routing_loss_accumulation_steps = 4  # as `RoutingCallback` sets it from the Trainer's arguments
    model(**inputs).loss.backward()
    got = parameter_gradients(model)
    assert model.routing_loss().scale.item() == 0.25
    torch.testing.assert_close(got, reference_gradients(model, inputs, rsl_weight=0.25), atol=1e-6, rtol=1e-5)


def test_routing_stats_count_only_unpadded_tokens_and_cost_nothing_when_off():
    model, inputs = rsl_mixer(), batch()
    model.eval()
    with torch.no_grad():
        model(**inputs)
        assert model.routing_stats() == {}
        with model.collect_routing_stats():
            model(**inputs)
    stats = model.routing_stats()
    layers = [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraMixerLayer)]
    assert sorted(stats) == sorted(layers)
    for module in stats.values():
        assert module.tokens == int(inputs["attention_mask"].sum())
        assert module.usage.sum().item() == pytest.approx(1.0)
        assert module.top_k_usage.sum().item() == pytest.approx(2.0)
        assert 0.0 <= module.entropy <= math.log(4)


def test_set_trainable_freezes_single_experts_and_preservation_term():
    model, inputs = rsl_mixer(rsl_preservation_weight=2.0), batch()
    model.set_trainable(routers=False, experts=[1])
    layer = next(m for m in model.modules() if isinstance(m, LoraMixerLayer))
    r = 8
    with torch.no_grad():
        layer.loramixer_A["default"][r : 2 * r] += 0.1  # expert 1 moves away from theta(0)
    model(**inputs).loss.backward()
    grad_A, grad_B = layer.loramixer_A["default"].grad, layer.loramixer_B["default"].grad
    assert layer.loramixer_router["default"].weight.grad is None
    assert grad_A[:r].abs().sum() == 0 and grad_A[2 * r :].abs().sum() == 0 and grad_A[r : 2 * r].abs().sum() > 0
    assert grad_B[:, :r].abs().sum() == 0 and grad_B[:, r : 2 * r].abs().sum() > 0
    routing = model.routing_loss()
    assert routing.preservation.item() == pytest.approx(0.01 * r * layer.in_features, rel=1e-4)
    assert routing.total.item() == pytest.approx(
        0.5 * routing.balance.item() + 0.3 * routing.entropy.item() + 2.0 * routing.preservation.item(), rel=1e-5
    )
    # the preservation gradient is 2 * beta * (theta - theta(0)), pulling expert 1 back to where it started
    with_preservation = grad_A.clone()
    model.zero_grad()
    model.peft_config["default"].rsl_preservation_weight = 0.0
    model(**inputs).loss.backward()
    difference = with_preservation - layer.loramixer_A["default"].grad
    torch.testing.assert_close(difference[r : 2 * r], torch.full_like(difference[r : 2 * r], 2 * 2.0 * 0.1))
    with pytest.raises(ValueError, match="Expert ids must lie in"):
        model.set_trainable(routers=True, experts=[4])
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.set_trainable(routers=True, experts=True, adapter_name="other")
    assert not layer.loramixer_router["default"].weight.requires_grad  # the refused calls changed nothing


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_forced_routing_by_keyword_matches_route_to(task_type):
    model, inputs = rsl_mixer(task_type=task_type), batch()
    model.eval()
    with torch.no_grad():
        by_keyword = model(**inputs, expert_ids=torch.tensor([2, 0])).logits
        with model.route_to([2, 0]):
            by_context = model(**inputs).logits
        routed = model(**inputs).logits
    torch.testing.assert_close(by_keyword, by_context)
    assert not torch.allclose(by_keyword, routed)


def test_training_only_stats_leave_out_eval_forwards():
    model, inputs = rsl_mixer(), batch()
    model.record_routing_stats(True, training_only=True)
    model.eval()
    with torch.no_grad():
        model(**inputs)
    assert model.routing_stats() == {}
    model.train()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # no autograd: stats only
    assert model.routing_loss() is None
    assert {m.tokens for m in model.routing_stats(reset=True).values()} == {int(inputs["attention_mask"].sum())}
    model.eval()
    with torch.no_grad():
        with model.collect_routing_stats():  # an explicit request records eval forwards too...
            model(**inputs)
        assert model.routing_stats(reset=True)
        model(**inputs)  # ...and leaves the training-only recording as it was
    assert model.routing_stats() == {}


# ---- the RSL's definition: one top-k, the right padding mask, theta(0) whenever the term is on ---------------------


def test_expert_usage_fraction_picks_experts_as_routing_does_where_softmax_underflows():
    logits = torch.tensor([[0.0, -200.0, -150.0]])
    probs = logits.softmax(-1)
    assert probs[0, 1] == probs[0, 2] == 0.0  # float32 cannot tell experts 1 and 2 apart...
    assert RouterUsage.of(probs, 2, logits).fraction.tolist() == [1.0, 0.0, 1.0]  # ...routing's logits can

    model, inputs = rsl_mixer(), batch()
    for layer in model.modules():
        if isinstance(layer, LoraMixerLayer):
            router = layer.loramixer_router["default"]
            torch.nn.init.zeros_(router.weight)
            with torch.no_grad():
                router.bias.copy_(torch.tensor([0.0, -200.0, -150.0, -300.0]))
    model.eval()
    with torch.no_grad(), model.collect_routing_stats():
        model(**inputs)
    for stats in model.routing_stats().values():
        assert stats.top_k_usage.tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_encoder_decoder_routers_count_their_own_side_unpadded_tokens(model_type):
    model = rsl_mixer(model_type)
    source = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    source_mask = torch.ones_like(source)
    source_mask[1, 6:] = 0  # 16 source tokens, 4 of them padding
    labels = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    labels[0, 5:] = -100  # 12 scored target tokens of 14
    model.eval()
    with torch.no_grad(), model.collect_routing_stats():
        model(input_ids=source, attention_mask=source_mask, labels=labels)
    stats = model.routing_stats(reset=True)
    cross_attention = ("EncDecAttention", "encoder_attn")
    for name, module in stats.items():
        parts = name.split(".")
        reads_source = "encoder" in parts or (
            any(block in parts for block in cross_attention) and parts[-1] in ("k", "v", "k_proj", "v_proj")
        )
        assert module.tokens == (16 if reads_source else 12), name
    # a given decoder mask wins over the labels
    decoder_mask = torch.ones_like(labels)
    decoder_mask[1, 3:] = 0
    with torch.no_grad(), model.collect_routing_stats():
        model(input_ids=source, attention_mask=source_mask, labels=labels, decoder_attention_mask=decoder_mask)
    assert {m.tokens for m in model.routing_stats().values()} == {16, 10}


def test_preservation_term_is_on_without_set_trainable():
    model, inputs = rsl_mixer(rsl_preservation_weight=1.0), batch()
    model(**inputs)  # the first training forward records theta(0)
    assert model.routing_loss().preservation.item() == 0.0
    layer = next(m for m in model.modules() if isinstance(m, LoraMixerLayer))
    with torch.no_grad():
        layer.loramixer_A["default"] += 0.1
    model(**inputs)
    expected = 0.01 * layer.loramixer_A["default"].numel()
    assert model.routing_loss().preservation.item() == pytest.approx(expected, rel=1e-4)
