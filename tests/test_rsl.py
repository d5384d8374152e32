"""The Routing Specialization Loss: values, gradients, the adaptive lambda, and how it enters `outputs.loss`."""

import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer
from peft_lora_mixer.routing_loss.loss import (
    RouterUsage,
    specialization_loss,
    specialization_loss_gradient,
    token_entropy,
    update_entropy_weight,
    valid_tokens,
)

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.2, 0.9]])


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
    value = specialization_loss(LOGITS.softmax(-1), top_k, 0.3, 0.2, sign)
    assert value.item() == pytest.approx(hand_rsl(LOGITS, top_k, 0.3, 0.2, sign), rel=1e-6)


def test_padding_tokens_do_not_count():
    probs = LOGITS.softmax(-1).view(2, 2, 3)
    mask = torch.tensor([[1, 1], [0, 1]])
    masked = specialization_loss(valid_tokens(probs, mask), 1, 0.3, 0.2, 1)
    assert masked.item() == pytest.approx(hand_rsl(LOGITS[[0, 1, 3]], 1, 0.3, 0.2, 1), rel=1e-6)


def test_balance_gradient_pushes_away_from_the_overloaded_expert():
    logits = torch.tensor([[3.0, 0.0, 0.0], [2.5, 0.5, 0.0], [2.0, 0.0, 1.0]], requires_grad=True)
    specialization_loss(logits.softmax(-1), 1, 1.0, 0.0, 1).backward()
    assert (logits.grad[:, 0] > 0).all()  # descent lowers the logit of expert 0, which every token picks


@pytest.mark.parametrize("sign", [1, -1])
def test_entropy_gradient_sign(sign):
    logits = LOGITS.clone().requires_grad_()
    specialization_loss(logits.softmax(-1), 1, 0.0, 1.0, sign).backward()
    before = token_entropy(LOGITS.softmax(-1)).mean()
    after = token_entropy((LOGITS - 0.1 * logits.grad).softmax(-1)).mean()
    assert (after < before) if sign == 1 else (after > before)


def test_balance_counts_every_expert_of_the_router():
    """E in `alpha * E * sum_i pbar_i fbar_i` is the router's number of experts, also when one gets no probability
    mass (routing to an expert without weights on a projection is a valid choice there)."""
    probs = torch.tensor([[0.7, 0.0, 0.3], [0.2, 0.0, 0.8]])
    usage = RouterUsage.of(probs, 1)
    assert usage.num_present.item() == 3
    expected = 3 * (probs.mean(0) * torch.tensor([0.5, 0.0, 0.5])).sum()
    torch.testing.assert_close(specialization_loss(probs, 1, 1.0, 0.0, 1), expected)


def test_entropy_of_absent_experts_has_finite_gradient():
    logits = torch.tensor([[1.0, -math.inf, 0.0]], requires_grad=True)
    specialization_loss(logits.softmax(-1), 1, 1.0, 1.0, 1).backward()
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
    (expected,) = torch.autograd.grad(specialization_loss(probs, top_k, 0.3, 0.7, sign), probs)
    got = specialization_loss_gradient(probs.detach(), RouterUsage.of(probs, top_k), 0.3, 0.7, sign)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)  # float32 sums in another order
    empty = probs[:0].detach()
    assert specialization_loss_gradient(empty, RouterUsage.of(empty, top_k), 0.3, 0.7, sign).shape == (0, 6)


def test_adaptive_lambda_controller_moves_toward_target():
    assert update_entropy_weight(0.1, entropy=1.0, target=0.5, rate=0.1, sign=1) == pytest.approx(0.15)
    assert update_entropy_weight(0.1, entropy=0.2, target=0.5, rate=0.1, sign=1) == pytest.approx(0.07)
    assert update_entropy_weight(0.01, entropy=0.0, target=0.5, rate=0.1, sign=1) == 0.0
    assert update_entropy_weight(0.1, entropy=0.2, target=0.5, rate=0.1, sign=-1) == pytest.approx(0.13)


@pytest.mark.parametrize(
    "field,value",
    [("rsl_balance_weight", -1.0), ("rsl_entropy_weight", float("nan")), ("rsl_entropy_sign", 0),
     ("rsl_entropy_target", 5.0), ("rsl_entropy_adapt_rate", -0.1), ("rsl_preservation_weight", "1")],
)
def test_config_refuses_bad_rsl_values(field, value):
    with pytest.raises(ValueError, match=field):
        LoraMixerConfig(num_experts=4, **{field: value})


# ---- in the model --------------------------------------------------------------------------------------------


def mixer(**config):
    defaults = dict(num_experts=4, top_k=2, init_weights=False, rsl_balance_weight=0.5, rsl_entropy_weight=0.3)
    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(**{**defaults, **config}))
    return model.train()


def batch(seed=1):
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


class ProbeRouters:
    """Keep every router's probabilities (with their graph) during a forward: the independent RSL computation."""

    def __init__(self):
        self.probs, self.original = [], LoraMixerLayer.router_logits

    def __enter__(self):
        def router_logits(layer, x, adapter_name):
            logits = self.original(layer, x, adapter_name)
            self.probs.append(torch.softmax(logits, dim=-1))
            return logits

        LoraMixerLayer.router_logits = router_logits
        return self

    def __exit__(self, *exc):
        LoraMixerLayer.router_logits = self.original

    def rsl(self, mask, top_k=2, alpha=0.5, lam=0.3, sign=1):
        losses = [specialization_loss(valid_tokens(p, mask), top_k, alpha, lam, sign) for p in self.probs]
        return torch.stack(losses).mean()


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])  # PeftModel and PeftModelForCausalLM forward differently
def test_added_loss_equals_routing_loss_and_an_independent_computation(task_type):
    model, inputs = mixer(task_type=task_type), batch()
    with ProbeRouters() as probe:
        with_rsl = model(**inputs).loss
    routing = model.routing_loss()
    model.peft_config["default"].add_routing_loss = False
    task = model(**inputs).loss
    expected = probe.rsl(inputs["attention_mask"].bool())
    assert routing.scale.item() == 1.0
    assert (with_rsl - task).item() == pytest.approx(routing.total.item() * routing.scale.item(), abs=1e-6)
    assert routing.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert routing.total.item() == pytest.approx(
        0.5 * routing.balance.item() + 0.3 * routing.entropy.item(), rel=1e-5
    )


def test_nothing_added_in_eval_or_without_labels():
    model, inputs = mixer(), batch()
    model.eval()
    with torch.no_grad():
        eval_loss = model(**inputs).loss
    assert model.routing_loss() is None
    model.train()
    model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert model.routing_loss() is None
    model.peft_config["default"].add_routing_loss = False
    assert model(**inputs).loss.item() == pytest.approx(eval_loss.item(), abs=1e-6)
    assert all(layer.routing_observer is None for layer in model.modules() if isinstance(layer, LoraMixerLayer))


def test_routing_gradient_equals_direct_differentiation():
    model, inputs = mixer(), batch()
    (model(**inputs).loss * 0.25).backward()  # the injected RSL gradient must follow the loss scaling too
    injected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.peft_config["default"].add_routing_loss = False
    with ProbeRouters() as probe:
        task = model(**inputs).loss
    ((task + probe.rsl(inputs["attention_mask"].bool())) * 0.25).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, injected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(injected[n].abs().sum() > 0 for n in injected if "router" in n)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    inputs = batch()

    def gradients(checkpointing):
        model = mixer()
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


def test_adaptive_lambda_in_the_model_moves_toward_target():
    model, inputs = mixer(rsl_entropy_target=0.0, rsl_entropy_adapt_rate=0.5), batch()
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
    model, inputs = mixer(), batch()
    loss = model(**inputs, num_items_in_batch=torch.tensor(20)).loss
    routing = model.routing_loss()
    counted = inputs["labels"][:, 1:].ne(-100).sum().item()
    assert routing.scale.item() == pytest.approx(counted / 20)
    model.peft_config["default"].add_routing_loss = False
    task = model(**inputs, num_items_in_batch=torch.tensor(20)).loss
    assert (loss - task).item() == pytest.approx(routing.total.item() * counted / 20, abs=1e-6)


def test_routing_stats_count_only_unpadded_tokens_and_cost_nothing_when_off():
    model, inputs = mixer(), batch()
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
    model, inputs = mixer(rsl_preservation_weight=2.0), batch()
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
    model, inputs = mixer(task_type=task_type), batch()
    model.eval()
    with torch.no_grad():
        by_keyword = model(**inputs, expert_ids=torch.tensor([2, 0])).logits
        with model.route_to([2, 0]):
            by_context = model(**inputs).logits
        routed = model(**inputs).logits
    torch.testing.assert_close(by_keyword, by_context)
    assert not torch.allclose(by_keyword, routed)


def test_training_only_stats_leave_out_eval_forwards():
    model, inputs = mixer(), batch()
    model.record_routing_stats(True, training_only=True)
    model.eval()
    with torch.no_grad():
        model(**inputs)
    assert model.routing_stats() == {}
    model.train()
    model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # no labels: stats only
    assert model.routing_loss() is None
    assert {m.tokens for m in model.routing_stats(reset=True).values()} == {int(inputs["attention_mask"].sum())}
    model.eval()
    with torch.no_grad():
        with model.collect_routing_stats():  # an explicit request records eval forwards too...
            model(**inputs)
        assert model.routing_stats(reset=True)
        model(**inputs)  # ...and leaves the training-only recording as it was
    assert model.routing_stats() == {}
