"""The router label loss (`router_label_weight`, a batch's `router_labels`): its gradient against an independent
autograd cross-entropy, eager and compiled, alone and with the RSL; what it refuses; the collator and the Trainer."""

import copy

import pytest
import torch
from mixers import ProbeRouters, autograd_rsl, batch, rsl_mixer, valid_tokens
from test_compile import BACKEND, assert_close_relative, fresh_dynamo  # noqa: F401 (the fixture resets Dynamo)
from transformers import Trainer, TrainingArguments

from peft_lora_mixer import ExpertIdsCollator, LoraMixerConfig, RoutingCallback
from peft_lora_mixer.routing_loss.loss import RouterLabels, label_loss, label_loss_gradient

LABELS = torch.tensor([2, 0])  # the batch's two samples: experts 2 and 0


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_gradients(model, inputs, labels, weight: float, rsl: bool) -> dict[str, torch.Tensor]:
    """The task loss plus `weight` times each router's cross-entropy to each sample's expert over its unpadded
    tokens (and the RSL, written out, with `rsl`), differentiated by autograd through the probed probabilities."""
    model.peft_config["default"].add_routing_loss = False
    model.peft_config["default"].router_label_weight = 0.0
    model.zero_grad()
    mask = inputs["attention_mask"].bool()
    with ProbeRouters() as probe:
        task = model(**inputs).loss
    per_token = labels[:, None].expand(mask.shape)[mask]
    cross_entropy = [
        torch.nn.functional.nll_loss(valid_tokens(p, mask).log(), per_token, ignore_index=-100) for p in probe.probs
    ]
    loss = task + weight * torch.stack(cross_entropy).sum()  # the weight is per router
    if rsl:
        loss = loss + torch.stack([autograd_rsl(valid_tokens(p, mask), 2, 0.5, 0.3, 1) for p in probe.probs]).mean()
    loss.backward()
    return gradients(model)


@pytest.mark.parametrize("rsl", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_label_loss_gradient_equals_an_autograd_cross_entropy(rsl, compiled):
    model = rsl_mixer(add_routing_loss=rsl, router_label_weight=0.7)
    model.set_trainable(routers=True, experts=True)
    reference = copy.deepcopy(model)
    inputs = batch()
    labels = torch.tensor([2, -100 if rsl else 0])  # with the RSL: the second sample has no label
    forward = torch.compile(model, backend=BACKEND, fullgraph=True) if compiled else model
    forward(**inputs, router_labels=labels).loss.backward()
    expected = reference_gradients(reference, inputs, labels, 0.7, rsl)
    assert_close_relative(gradients(model), expected)
    without = reference_gradients(copy.deepcopy(reference), inputs, labels, 0.0, rsl)
    router = next(name for name in expected if "router" in name)
    assert (expected[router] - without[router]).norm() > 0.05 * expected[router].norm()  # the labels matter here
    reported = model.routing_loss()
    routers = sum(name.endswith("loramixer_router.default.weight") for name, _ in model.named_parameters())
    assert reported.label > 0
    if not rsl:  # the label loss alone: its weight counts once per router
        torch.testing.assert_close(reported.total, 0.7 * routers * reported.label)


def test_arrow_slots_share_their_expert_label():
    """Under router_init='arrow' expert i holds slots 2i and 2i+1: the target is their summed probability."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1], [0.4, 0.3, 0.2, 0.1]], requires_grad=True)
    labels = RouterLabels.of(torch.tensor([1, 0, -100]), torch.Size([3, 1]), 4, 2, torch.ones(3))
    expected = -(torch.log(probs[0, 2] + probs[0, 3]) + torch.log(probs[1, 0] + probs[1, 1])) / 2
    expected.backward()
    torch.testing.assert_close(label_loss(probs.detach(), labels), expected.detach())
    torch.testing.assert_close(label_loss_gradient(probs.detach(), labels), probs.grad)


def test_without_labels_a_mixer_without_the_rsl_builds_no_router_loss():
    """The label weight (1 by default) costs nothing until a batch brings labels: no router is watched."""
    model = rsl_mixer(add_routing_loss=False)
    model(**batch()).loss.backward()
    assert model.routing_loss() is None
    model(**batch(), router_labels=LABELS).loss.backward()
    assert model.routing_loss().label > 0 and model.routing_loss().balance >= 0


def test_labels_count_in_training_only_and_change_nothing_else():
    model, inputs = rsl_mixer(router_label_weight=1.0), batch()
    model.eval()
    with torch.no_grad():
        evaluated = model(**inputs, router_labels=LABELS).logits
        assert torch.equal(evaluated, model(**inputs).logits)
    model.train()
    trained = model(**inputs, router_labels=LABELS)
    assert torch.equal(trained.logits, model(**inputs).logits)  # the labels shape the gradient, not the output


@pytest.mark.parametrize(
    "config, labels, message",
    [
        (dict(router_label_weight=0.0), LABELS, "no active adapter has `router_label_weight`"),
        (dict(router_label_weight=1.0), torch.tensor([4, 0]), r"in \[0, 4\)"),
        (dict(router_label_weight=1.0), torch.tensor([-1, 0]), "or -100"),
        (dict(router_label_weight=1.0), torch.tensor([1.0, 0.0]), "whole-number"),
        (dict(router_label_weight=1.0), torch.tensor([[1, 0]]), "shape"),
        (dict(router_label_weight=1.0), torch.tensor([1, 0, 2]), "holds 3 labels"),
    ],
)
def test_bad_router_labels_are_refused(config, labels, message):
    model = rsl_mixer(**config)
    with pytest.raises(ValueError, match=message):
        model(**batch(), router_labels=labels)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf"), "1"])
def test_bad_label_weight_is_refused(weight):
    with pytest.raises(ValueError, match="router_label_weight"):
        LoraMixerConfig(router_label_weight=weight)


def test_collator_makes_router_labels_and_refuses_bad_values():
    collate = ExpertIdsCollator(key="router_labels")
    features = [{"input_ids": [1, 2], "expert_id": 3}, {"input_ids": [3, 4], "expert_id": None}]
    batch_ = collate(features)
    assert batch_["router_labels"].tolist() == [3, -100] and "expert_id" not in batch_
    with pytest.raises(ValueError, match="whole numbers"):
        collate([{"input_ids": [1, 2], "expert_id": 1.5}])
    with pytest.raises(ValueError, match="key"):
        ExpertIdsCollator(key="labels")


def test_trainer_with_labels_teaches_the_routers_the_labelled_expert(tmp_path):
    """Trainer steps over samples whose tokens come from four ids per expert (separable by a linear router on the
    tiny model's 32 features), labelled with that expert: the label loss falls and is logged, and afterwards every
    router puts most tokens on their sample's expert (top-1)."""
    model = rsl_mixer(add_routing_loss=False, router_label_weight=1.0, top_k=1)
    model.set_trainable(routers=True, experts=False)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(64):
        expert = index % 4
        ids = torch.randint(4 * expert, 4 * (expert + 1), (8,), generator=generator)
        samples.append({"input_ids": ids, "labels": ids, "expert_id": expert})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=60,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        logging_steps=20,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=samples,
        data_collator=ExpertIdsCollator(key="router_labels"),
        callbacks=[RoutingCallback()],
    )
    trainer.train()
    logged = [log["rsl/label"] for log in trainer.state.log_history if "rsl/label" in log]
    assert len(logged) == 3 and logged[-1] < 0.5 * logged[0]
    model.eval()
    for expert in range(4):
        probe_inputs = torch.stack([s["input_ids"] for s in samples if s["expert_id"] == expert])
        with torch.no_grad(), ProbeRouters() as probe:
            model(input_ids=probe_inputs)
        share = torch.stack([(p.argmax(-1) == expert).float().mean() for p in probe.probs]).mean()
        assert share > 0.9, (expert, share)


@pytest.mark.parametrize("model_type", ["t5", "bart", "mamba"])
def test_labels_reach_encoder_decoder_and_ssm_routers(model_type):
    """Every router of an encoder-decoder (encoder, decoder, cross-attention) and of Mamba gets the sample's label
    over its own tokens: each router's gradient changes with the labels."""
    model = rsl_mixer(model_type, add_routing_loss=False)
    model.set_trainable(routers=True, experts=False)
    source = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=source, labels=source)
    model(**inputs).loss.backward()
    plain = gradients(model)
    model.zero_grad()
    model(**inputs, router_labels=torch.tensor([1, 3])).loss.backward()
    taught = gradients(model)
    assert model.routing_loss().label > 0 and plain.keys() == taught.keys()
    assert all(not torch.allclose(plain[name], taught[name]) for name in plain), model_type
