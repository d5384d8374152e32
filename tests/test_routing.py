"""The routed computation against an independent per-expert reference, for every routing mode."""

import pytest
import torch
from mixers import make_layer, reference_gates
from torch import nn

from peft_lora_mixer import ExpertSpec, LoraMixerLayer

IN, OUT, R, E = 12, 10, 3, 5


def routing_layer(routing: str, top_k: int, num_experts: int = E, temperature: float = 1.0) -> LoraMixerLayer:
    """`num_experts` experts of rank R on a 12 -> 10 projection."""
    return make_layer([ExpertSpec(R, 2.0 / R)] * num_experts, routing, top_k, temperature, IN, OUT)


def reference_output(layer: LoraMixerLayer, x: torch.Tensor, routing: str, k: int, temperature: float = 1.0):
    """W x + sum_e g_e s_e B_e A_e x with one loop over experts and plain matrix products."""
    router = layer.loramixer_router["default"]
    probs = torch.softmax((x @ router.weight.T + router.bias) / temperature, dim=-1)
    gates = reference_gates(probs, routing, k)
    base = layer.base_layer
    out = x @ base.weight.T + base.bias
    A, B = layer.loramixer_A["default"], layer.loramixer_B["default"]
    for e in range(router.out_features):
        A_e, B_e = A[e * R : (e + 1) * R], B[:, e * R : (e + 1) * R]
        out = out + gates[:, e : e + 1] * (2.0 / R) * (x @ A_e.T @ B_e.T)
    return out


@pytest.mark.parametrize("routing", ["soft", "topk", "hard_soft"])
@pytest.mark.parametrize("top_k", [1, 2, E])
def test_matches_per_expert_reference(routing, top_k):
    layer = routing_layer(routing, top_k, temperature=0.7)
    x = torch.randn(17, IN)
    torch.testing.assert_close(layer(x), reference_output(layer, x, routing, top_k, 0.7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(IN,), (3, 4, IN), (2, 3, 2, IN), "transposed"])
def test_any_input_shape_routes_each_token_alike(shape):
    """The layer flattens its input's tokens once (the base layer included) and restores the shape at the end."""
    layer = routing_layer("hard_soft", top_k=2)
    x = torch.randn(4, 3, IN).transpose(0, 1) if shape == "transposed" else torch.randn(*shape)
    out = layer(x)
    assert out.shape == (*x.shape[:-1], OUT)
    tokens = x.reshape(-1, IN)
    expected = reference_output(layer, tokens, "hard_soft", 2)
    torch.testing.assert_close(out.reshape(-1, OUT), expected, rtol=1e-5, atol=1e-6)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("routing", ["topk", "hard_soft"])
def test_ties_go_to_lower_expert_index(routing):
    layer = routing_layer(routing, top_k=2)
    with torch.no_grad():
        layer.loramixer_router["default"].weight.zero_()
        layer.loramixer_router["default"].bias.copy_(torch.tensor([0.0, 1.0, 1.0, 1.0, -1.0]))
    x = torch.randn(4, IN)
    gates = layer.gates(x, "default")
    assert torch.equal(gates[:, 3], torch.zeros(4)) and torch.equal(gates[:, 0], torch.zeros(4))
    torch.testing.assert_close(gates[:, 1:3], torch.full((4, 2), 0.5))
    torch.testing.assert_close(layer(x), reference_output(layer, x, routing, 2))


@pytest.mark.parametrize("routing", ["topk", "hard_soft"])
def test_top_k_equal_to_num_experts_is_soft(routing):
    x = torch.randn(9, IN)
    torch.testing.assert_close(routing_layer(routing, top_k=E)(x), routing_layer("soft", top_k=E)(x))


def test_hard_soft_forward_is_sparse_and_router_gradient_is_dense_softmax():
    layer = routing_layer("hard_soft", top_k=2)
    x = torch.randn(6, IN)
    router = layer.loramixer_router["default"]
    upstream = torch.randn(6, E)

    gates = layer.gates(x, "default")
    assert torch.equal((gates > 0).sum(-1), torch.full((6,), 2))
    torch.testing.assert_close(gates, reference_gates(layer.router_probs(x, "default").detach(), "topk", 2))
    (gates * upstream).sum().backward()
    straight_through = router.weight.grad.clone()

    router.weight.grad = None
    (layer.router_probs(x, "default") * upstream).sum().backward()
    torch.testing.assert_close(straight_through, router.weight.grad)


def test_topk_router_gradient_only_through_kept_experts():
    layer = routing_layer("topk", top_k=2)
    x = torch.randn(6, IN)
    probs = layer.router_probs(x, "default")
    upstream = torch.randn(6, E)
    (layer.gates(x, "default") * upstream).sum().backward()
    got = layer.loramixer_router["default"].weight.grad.clone()
    layer.zero_grad()
    (reference_gates(probs, "topk", 2) * upstream).sum().backward()  # autograd through the renormalised kept ones
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, layer.loramixer_router["default"].weight.grad)


def test_top_1_topk_weights_the_expert_by_its_probability_and_trains_the_router():
    """Renormalised, a single kept expert weighs 1 whatever the router says: Switch routing keeps its probability,
    so the router gets the gradient of p_best. (The selected-experts path: tests/test_fast_paths.py.)"""
    layer = routing_layer("topk", top_k=1)
    x = torch.randn(6, IN)
    probs = layer.router_probs(x, "default")
    best = probs.argmax(-1, keepdim=True)
    A, B = layer.loramixer_A["default"].view(E, R, IN), layer.loramixer_B["default"].view(OUT, E, R).permute(1, 2, 0)
    delta = probs.gather(-1, best) * (2.0 / R) * torch.einsum("ti,tri,tro->to", x, A[best[:, 0]], B[best[:, 0]])
    upstream = torch.randn(6, OUT)
    (delta * upstream).sum().backward()
    want = layer.loramixer_router["default"].weight.grad.clone()
    layer.zero_grad()
    out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x) + delta.detach(), rtol=1e-5, atol=1e-6)
    ((out - layer.base_layer(x).detach()) * upstream).sum().backward()
    got = layer.loramixer_router["default"].weight.grad
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_forced_routing_of_an_unbatched_token():
    """A 1-D input is one token of one sample: one expert id (an int or a list of one) routes it."""
    layer = routing_layer("hard_soft", top_k=2)
    x = torch.randn(IN)
    for ids in (torch.tensor(3), torch.tensor([3])):
        layer.forced_expert_ids = ids
        assert torch.equal(layer.gates(x, "default"), torch.nn.functional.one_hot(torch.tensor(3), E).float())
        A, B = layer.loramixer_A["default"][3 * R : 4 * R], layer.loramixer_B["default"][:, 3 * R : 4 * R]
        torch.testing.assert_close(layer(x), layer.base_layer(x) + (2.0 / R) * (B @ (A @ x)))


def test_forced_routing_is_one_hot_per_sample():
    layer = routing_layer("hard_soft", top_k=2)
    x = torch.randn(3, 4, IN)
    layer.forced_expert_ids = torch.tensor([4, 0, 2])
    gates = layer.gates(x, "default")
    expected = torch.nn.functional.one_hot(torch.tensor([4, 0, 2]), E).float()[:, None, :].expand(3, 4, E)
    assert torch.equal(gates.expand(3, 4, E), expected)
    flat = layer.gates(x.reshape(-1, IN), "default", token_shape=x.shape[:-1])  # tokens as the layer's forward has them
    assert torch.equal(flat, expected.reshape(-1, E))
    layer.forced_expert_ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="one expert id per sample"):
        layer(x)


def test_expert_without_weights_keeps_its_routing_share_and_adds_nothing():
    """The router routes over all E experts on every projection; the share of an expert without weights here is
    simply not added: delta = sum over the experts present of g_e s_e B_e A_e x, g the softmax over all E."""
    torch.manual_seed(0)
    layer = LoraMixerLayer(
        nn.Linear(IN, OUT),
        "default",
        [ExpertSpec(R, 1.0), ExpertSpec(0, 1.0), ExpertSpec(2, 0.5)],
        routing="soft",
        top_k=3,
        router_temperature=1.0,
        lora_dropout=0.0,
        init_weights=False,
    )
    x = torch.randn(5, IN)
    router = layer.loramixer_router["default"]
    gates = torch.softmax(x @ router.weight.T + router.bias, dim=-1)
    torch.testing.assert_close(layer.gates(x, "default"), gates)
    assert (gates[:, 1] > 0).all()
    assert layer.loramixer_A["default"].shape == (R + 2, IN)
    A, B = layer.loramixer_A["default"], layer.loramixer_B["default"]
    delta = gates[:, :1] * (x @ A[:R].T @ B[:, :R].T) + gates[:, 2:] * 0.5 * (x @ A[R:].T @ B[:, R:].T)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + delta)
    with torch.no_grad():  # routing everything to the expert without weights leaves the projection as it was
        router.bias.copy_(torch.tensor([-1e4, 1e4, -1e4]))
    torch.testing.assert_close(layer(x), layer.base_layer(x))
