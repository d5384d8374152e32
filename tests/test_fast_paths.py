"""The fast paths of the layer equal a plain per-expert reference, compile without graph breaks, keep the router
in float32 under autocast."""

from __future__ import annotations

import pytest
import torch
from mixers import make_layer, reference_gates
from peft import get_peft_model
from tiny_models import tiny_model
from torch import nn

from peft_lora_mixer import ExpertSpec, LoraMixerConfig, LoraMixerLayer
from peft_lora_mixer.routing import SORT_MAX_ELEMENTS, top_k_indices, top_k_routes
from peft_lora_mixer.selected_experts import (
    MIN_EXPERTS_PER_SELECTED,
    MIN_EXPERTS_PER_SELECTED_STRAIGHT_THROUGH,
    MIN_TOKENS,
)

IN, OUT, R = 24, 20, 4
MANY = 2 * MIN_EXPERTS_PER_SELECTED_STRAIGHT_THROUGH  # enough experts for the selected-experts path at k <= 2
TOKENS = (2, MIN_TOKENS // 2 + 3)  # batch x sequence, just over the token threshold


def reference_delta(layer: LoraMixerLayer, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum_e g_e s_e B_e A_e x, one expert at a time."""
    A, B = layer.loramixer_A["default"], layer.loramixer_B["default"]
    ranks = torch.bincount(layer.loramixer_slot_expert["default"], minlength=gates.shape[-1]).tolist()
    delta = torch.zeros(*x.shape[:-1], OUT)
    for e, (A_e, B_e) in enumerate(zip(A.split(ranks), B.split(ranks, dim=1))):
        delta = delta + gates[..., e : e + 1] * layer.loramixer_expert_scaling["default"][e] * (x @ A_e.T @ B_e.T)
    return delta


def reference_probs(layer: LoraMixerLayer, x: torch.Tensor) -> torch.Tensor:
    router = layer.loramixer_router["default"]
    logits = x @ router.weight.T + router.bias
    return torch.softmax(logits / 0.7, dim=-1)


def outputs_and_grads(layer: LoraMixerLayer, x: torch.Tensor, forward) -> list[torch.Tensor]:
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    out = forward(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    params = [layer.loramixer_A["default"], layer.loramixer_B["default"], layer.loramixer_router["default"].weight]
    return [out.detach(), x.grad] + [torch.zeros(()) if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("routing", ["soft", "topk", "hard_soft"])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (MANY, 1), (MANY, 2)])
def test_layer_matches_reference_in_training(routing, num_experts, top_k):
    layer = make_layer([ExpertSpec(R, 0.5)] * num_experts, routing, top_k)
    x = torch.randn(*TOKENS, IN)
    selected = layer.selected_routes(x, "default") is not None
    assert selected == (routing != "soft" and num_experts == MANY)  # the path under test is the one intended
    ours = outputs_and_grads(layer, x, layer)
    ref = outputs_and_grads(
        layer,
        x,
        lambda x: (
            layer.base_layer(x) + reference_delta(layer, x, reference_gates(reference_probs(layer, x), routing, top_k))
        ),
    )
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_straight_through_needs_more_experts_per_selected_one():
    """Between the two crossovers `topk` trains on the selected experts and `hard_soft` on the dense path."""
    num_experts = 2 * MIN_EXPERTS_PER_SELECTED
    assert num_experts < 2 * MIN_EXPERTS_PER_SELECTED_STRAIGHT_THROUGH
    x = torch.randn(*TOKENS, IN)
    assert make_layer([ExpertSpec(R, 0.5)] * num_experts, "topk").selected_routes(x, "default") is not None
    hard_soft = make_layer([ExpertSpec(R, 0.5)] * num_experts, "hard_soft")
    assert hard_soft.selected_routes(x, "default") is None
    with torch.no_grad():  # without autograd hard_soft is topk
        assert hard_soft.selected_routes(x, "default") is not None


@pytest.mark.parametrize("routing", ["topk", "hard_soft"])
def test_selected_experts_path_in_inference(routing):
    layer = make_layer([ExpertSpec(R, 0.5)] * MANY, routing, top_k=2)
    x = torch.randn(*TOKENS, IN)
    with torch.no_grad():
        assert layer.selected_routes(x, "default") is not None
        want = layer.base_layer(x) + reference_delta(layer, x, reference_gates(reference_probs(layer, x), "topk", 2))
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        few_tokens = x[:, :3]
        assert layer.selected_routes(few_tokens, "default") is None  # decoding stays dense


@pytest.mark.parametrize("num_experts", [4, MANY])
def test_forced_routing_matches_reference(num_experts):
    layer = make_layer([ExpertSpec(R, 0.5)] * num_experts, "hard_soft", top_k=2)
    x = torch.randn(*TOKENS, IN)
    ids = torch.tensor([num_experts - 1, 1])
    layer.forced_expert_ids = ids
    assert (layer.selected_routes(x, "default") is not None) == (num_experts == MANY)
    ours = outputs_and_grads(layer, x, layer)
    one_hot = torch.nn.functional.one_hot(ids, num_experts).float()[:, None, :]
    ref = outputs_and_grads(layer, x, lambda x: layer.base_layer(x) + reference_delta(layer, x, one_hot))
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_experts_of_different_ranks_and_an_absent_one():
    layer = make_layer([ExpertSpec(2, 1.0), ExpertSpec(0, 1.0), ExpertSpec(5, 0.3), ExpertSpec(3, 2.0)], "topk", 2)
    x = torch.randn(*TOKENS, IN)
    assert layer.selected_routes(x, "default") is None
    ours = outputs_and_grads(layer, x, layer)
    ref = outputs_and_grads(
        layer,
        x,
        lambda x: (
            layer.base_layer(x) + reference_delta(layer, x, reference_gates(reference_probs(layer, x), "topk", 2))
        ),
    )
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_ties_go_to_the_lower_index(k):
    probs = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.1, 0.4, 0.1, 0.4],
            [0.0, 0.5, 0.0, 0.5],
            [0.0, 0.0, 1.0, 0.0],
            [0.2, 0.3, 0.3, 0.2],
        ]
    )
    assert top_k_indices(probs, k).tolist() == [
        row[:k] for row in [[0, 1, 2], [1, 3, 0], [1, 3, 0], [2, 0, 1], [1, 2, 0]]
    ]
    torch.manual_seed(0)
    many = torch.softmax(
        torch.randint(0, 3, (500, 64)).float() + torch.randn(500, 64) * (torch.rand(500, 1) < 0.5), dim=-1
    )
    stable = torch.sort(many, dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(top_k_indices(many, k), stable)


@pytest.mark.parametrize("k", [2, 3])
def test_top_k_routes_agree_for_few_and_many_tokens(k):
    """A decoding step's few tokens take the sorting path and many tokens the integer keys: same routes exactly."""
    torch.manual_seed(0)
    logits = torch.randint(-2, 2, (500, 64)).float() + torch.randn(500, 64) * (torch.rand(500, 1) < 0.5)
    many = logits.requires_grad_(True)  # signed, with exact ties in half of the tokens
    few = many[: SORT_MAX_ELEMENTS // 64]
    assert many.numel() > SORT_MAX_ELEMENTS >= few.numel()
    (index_many, weight_many), (index_few, weight_few) = top_k_routes(many, k), top_k_routes(few, k)
    assert torch.equal(index_few, index_many[: len(few)]) and torch.equal(weight_few, weight_many[: len(few)])
    assert torch.equal(index_few, torch.sort(few, dim=-1, descending=True, stable=True).indices[..., :k])
    second = torch.arange(k) == 1  # the weight of each token's second expert: it depends on all k kept values
    (grad_many,) = torch.autograd.grad(weight_many[: len(few), second].sum(), many)
    (grad_few,) = torch.autograd.grad(weight_few[:, second].sum(), many)
    assert grad_many.abs().sum() > 0
    torch.testing.assert_close(grad_few, grad_many)


def test_nearly_tied_values_keep_their_order():
    """Distinct values one float32 step apart are never reordered by the tie-break."""
    high = torch.tensor(0.3)
    low = torch.nextafter(high, torch.tensor(0.0))
    tiny_high = torch.tensor(1e-40)  # subnormal
    tiny_low = torch.nextafter(tiny_high, torch.tensor(0.0))
    probs = torch.stack([torch.stack([low, high, tiny_low, tiny_high])])
    assert top_k_indices(probs, 4).tolist() == [[1, 0, 3, 2]]
    negative = -high
    logits = torch.stack(
        [torch.stack([torch.nextafter(negative, torch.tensor(-1.0)), negative, -tiny_high, -tiny_low])]
    )
    assert top_k_indices(logits, 4).tolist() == [[3, 2, 1, 0]]


def test_top_k_of_signed_logits_orders_like_a_stable_sort():
    """Logits are signed: negative values, -0.0 against +0.0 (equal: a tie) and -inf (absent experts) included."""
    inf = float("inf")
    logits = torch.tensor(
        [[-0.0, 0.0, -1.0, 2.0], [-inf, -3.0, -inf, -2.5], [0.0, -0.0, -0.0, 1e-45], [-1e-45, -0.0, -inf, -1.0]]
    )
    stable = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    for k in (2, 3, 4):
        assert torch.equal(top_k_indices(logits, k), stable[:, :k])
    assert stable[0].tolist() == [3, 0, 1, 2] and stable[2].tolist() == [3, 0, 1, 2]


@pytest.mark.parametrize("routing", ["topk", "hard_soft"])
def test_training_and_inference_route_alike(routing):
    """Inference routes on the logits alone; training adds the router's gradient as exact zeros: the same gates and
    the same selected experts and weights, to the bit."""
    layer = make_layer([ExpertSpec(R, 0.5)] * MANY, routing, top_k=2)
    x = torch.randn(*TOKENS, IN)
    gates, routes = layer.gates(x, "default"), layer.selected_routes(x, "default")
    assert gates.requires_grad and (routes.weight.requires_grad or routes.straight_through_probs.requires_grad)
    with torch.no_grad():
        assert torch.equal(layer.gates(x, "default"), gates)
        index, weight, _ = layer.selected_routes(x, "default")
    assert torch.equal(index, routes.index) and torch.equal(weight, routes.weight)
    torch.testing.assert_close(gates.gather(-1, index), weight, rtol=0, atol=0)


@pytest.mark.parametrize("routing,num_experts", [("hard_soft", 4), ("topk", MANY)])
def test_layer_compiles_without_graph_breaks(routing, num_experts):
    layer = make_layer([ExpertSpec(R, 0.5)] * num_experts, routing, top_k=2)
    x = torch.randn(*TOKENS, IN)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_layer_matches_eager():
    layer = make_layer([ExpertSpec(R, 0.5)] * MANY, "topk", top_k=2)
    x = torch.randn(*TOKENS, IN)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, backend="eager")(x), layer(x), atol=1e-5, rtol=1e-5)


def test_router_stays_float32_under_bf16_autocast():
    layer = make_layer([ExpertSpec(R, 0.5)] * 4, "hard_soft", top_k=2)
    x = torch.randn(*TOKENS, IN)
    want = layer.router_probs(x, "default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = layer.router_probs(x, "default")
        out = layer(x)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, want, atol=0, rtol=0)  # bf16 logits would differ by ~1e-2
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_straight_through_selected_path_trains_under_bf16_autocast():
    layer = make_layer([ExpertSpec(R, 0.5)] * MANY, "hard_soft", top_k=2)
    x = torch.randn(*TOKENS, IN)
    want = outputs_and_grads(layer, x, layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.selected_routes(x, "default") is not None
        got = outputs_and_grads(layer, x, layer)
    assert got[0].dtype == torch.bfloat16
    for g, w in zip(got, want):  # output, input, A, B and router gradients: bf16 rounding only
        torch.testing.assert_close(g.float(), w, atol=3e-2 * w.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [30, 32])
@pytest.mark.parametrize("rank", range(1, 10))
def test_selected_experts_path_on_unaligned_shapes(rank, width, dtype):
    """`grouped_mm` needs 16-byte aligned rows: other ranks and widths run dense, with the same result, on both sides
    of the token threshold, in training and in inference."""
    torch.manual_seed(0)
    layer = LoraMixerLayer(
        nn.Linear(width, width),
        "default",
        [ExpertSpec(rank, 0.5)] * MIN_EXPERTS_PER_SELECTED,
        routing="topk",
        top_k=1,
        router_temperature=1.0,
        lora_dropout=0.0,
        init_weights=False,
    ).to(dtype)
    bytes_per_value = torch.finfo(dtype).bits // 8
    aligned = rank * bytes_per_value % 16 == 0 and width * bytes_per_value % 16 == 0
    for num_tokens in (MIN_TOKENS - 1, MIN_TOKENS + 44):
        x = torch.randn(1, num_tokens, width, dtype=dtype)
        assert (layer.selected_routes(x, "default") is not None) == (aligned and num_tokens >= MIN_TOKENS)
        out = layer(x)
        out.float().square().sum().backward()  # training: the router and the experts get gradients
        assert layer.loramixer_router["default"].weight.grad.abs().sum() > 0
        with torch.no_grad():
            gates = layer.gates(x, "default")
            A, B = layer.loramixer_A["default"].float(), layer.loramixer_B["default"].float()
            experts = (
                torch.einsum("tbi,eri,oer->tbeo", x.float(), A.view(-1, rank, width), B.view(width, -1, rank)) * 0.5
            )
            want = layer.base_layer(x).float() + (gates.unsqueeze(-1) * experts).sum(-2)
            torch.testing.assert_close(
                layer(x).float(),
                want,
                atol=1e-5 if dtype == torch.float32 else 5e-2,
                rtol=1e-5 if dtype == torch.float32 else 2e-2,
            )
        layer.zero_grad()


def test_selected_experts_path_on_a_tiny_llama_with_rank_2():
    """The shapes of the report: 16 rank-2 experts, top-1, a 300-token prompt; training, evaluation, forced routing
    and generation."""
    model = get_peft_model(
        tiny_model("llama"), LoraMixerConfig(num_experts=16, top_k=1, r=2, routing="topk", init_weights=False)
    )
    ids = torch.randint(0, 128, (1, 300))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        with model.route_to([3]):
            model(input_ids=ids)
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 302)
