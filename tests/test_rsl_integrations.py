"""The RSL reaches the routers whatever computes the task loss: the Trainer with label smoothing or
`compute_loss_func`, a hand-written loop, TRL's SFTTrainer (its default loss from log-probabilities, label smoothing,
a custom loss), under gradient checkpointing; each checked against the RSL differentiated by autograd."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from mixers import ProbeRouters, batch, rsl_mixer
from tiny_tokenizer import tiny_tokenizer
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother

from peft_lora_mixer import RoutingCallback, RoutingLossMixin


def shifted_cross_entropy(outputs, labels, num_items_in_batch=None):
    """A causal LM's loss computed outside the model, as a custom loss function would."""
    logits = outputs["logits"][:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def reference_gradients(model, inputs, task_loss) -> dict[str, torch.Tensor]:
    """The gradients of `task_loss(outputs, labels) + RSL`, the RSL computed by autograd from the routers'
    probabilities (the model's own RSL switched off)."""
    config = model.peft_config["default"]
    model.zero_grad()
    config.add_routing_loss = False
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with ProbeRouters() as probe:
        outputs = model(**forward_inputs)
    (task_loss(outputs, inputs["labels"]) + probe.rsl(inputs["attention_mask"].bool())).backward()
    config.add_routing_loss = True
    result = gradients(model)
    model.zero_grad()
    return result


def assert_same_gradients(got, expected):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert any(value.abs().sum() > 0 for name, value in got.items() if "router" in name)


def trainer_args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        **kwargs,
    )


def training_step_gradients(trainer, model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this step runs without
    trainer.training_step(model, dict(inputs))
    return gradients(model)


@pytest.mark.parametrize("routers_only", [True, False])
def test_trainer_with_label_smoothing_trains_the_routers_with_the_rsl(tmp_path, routers_only):
    model, inputs = rsl_mixer(), batch()
    model.set_trainable(routers=True, experts=not routers_only)
    smoother = LabelSmoother(epsilon=0.1)
    expected = reference_gradients(model, inputs, lambda out, labels: smoother(out, labels, shift_labels=True))
    trainer = Trainer(model=model, args=trainer_args(tmp_path, label_smoothing_factor=0.1))
    assert_same_gradients(training_step_gradients(trainer, model, inputs), expected)
    assert model.routing_loss().scale.item() == 1.0


def test_trainer_with_compute_loss_func_trains_the_routers_with_the_rsl(tmp_path):
    model, inputs = rsl_mixer(), batch()
    expected = reference_gradients(model, inputs, shifted_cross_entropy)
    trainer = Trainer(model=model, args=trainer_args(tmp_path), compute_loss_func=shifted_cross_entropy)
    assert_same_gradients(training_step_gradients(trainer, model, inputs), expected)


@pytest.mark.parametrize("checkpointing", [None, True, False])  # off, reentrant, non-reentrant
def test_hand_loop_with_its_own_loss_trains_the_routers_with_the_rsl(checkpointing):
    model, inputs = rsl_mixer(), batch()
    expected = reference_gradients(model, inputs, shifted_cross_entropy)
    if checkpointing is not None:
        model.get_base_model().gradient_checkpointing_enable({"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        shifted_cross_entropy(model(**forward_inputs), inputs["labels"]).backward()
    assert_same_gradients(gradients(model), expected)


def test_the_deprecated_mixin_is_a_no_op_that_says_so(tmp_path):
    model, inputs = rsl_mixer(), batch()
    expected = reference_gradients(model, inputs, shifted_cross_entropy)
    with pytest.warns(FutureWarning, match="no longer needed"):
        trainer_class = type("RoutingTrainer", (RoutingLossMixin, Trainer), {})
    trainer = trainer_class(model=model, args=trainer_args(tmp_path), compute_loss_func=shifted_cross_entropy)
    assert_same_gradients(training_step_gradients(trainer, model, inputs), expected)  # counted once, not twice


def sft_trainer(tmp_path, model, **config):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ids = torch.randint(2, 128, (8, 10), generator=torch.Generator().manual_seed(0))
    args = SFTConfig(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        **config,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
        processing_class=tiny_tokenizer(),
        callbacks=[RoutingCallback()],
    )


@pytest.mark.parametrize(
    "loss_path",
    [
        "default",  # the loss from the fused log-probabilities, never `outputs.loss`
        "label_smoothing",
        "compute_loss_func",
    ],
)
@pytest.mark.parametrize("reentrant", [None, True, False])  # None: SFTConfig's default checkpointing
def test_sft_trainer_trains_the_routers_with_the_rsl_with_exact_gradients(tmp_path, loss_path, reentrant):
    model, inputs = rsl_mixer(), batch()
    model.set_trainable(routers=True, experts=True)
    smoother = LabelSmoother(epsilon=0.1)
    task_losses = {
        "default": shifted_cross_entropy,
        "label_smoothing": lambda out, labels: smoother(out, labels, shift_labels=True),
        "compute_loss_func": shifted_cross_entropy,
    }
    expected = reference_gradients(model, inputs, task_losses[loss_path])
    kwargs = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    kwargs.update({"label_smoothing": dict(label_smoothing_factor=0.1)}.get(loss_path, {}))
    trainer = sft_trainer(tmp_path, model, **kwargs)
    if loss_path == "compute_loss_func":
        trainer.compute_loss_func = shifted_cross_entropy
    # what `train()` does first with SFTConfig's default `gradient_checkpointing=True`
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    got = training_step_gradients(trainer, model, inputs)
    assert model.get_base_model().is_gradient_checkpointing  # SFTTrainer's default: the hard case
    assert_same_gradients(got, expected)


def test_sft_trainer_trains_routers_over_frozen_experts_and_logs_the_rsl(tmp_path):
    model = rsl_mixer()
    model.set_trainable(routers=True, experts=False)
    router = next(p for n, p in model.named_parameters() if "loramixer_router" in n)
    before = router.detach().clone()
    trainer = sft_trainer(tmp_path, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(log["rsl/total"] > 0 for log in logs)
    assert not torch.equal(router, before)


@pytest.mark.parametrize("reentrant", [True, False])
def test_two_forwards_then_one_backward_under_checkpointing(reentrant):
    """Accumulating two micro-batches' losses before one backward: each recomputed router finds its own forward."""
    first, second = batch(seed=1), batch(seed=2)

    def gradients_of_the_sum(checkpointing: bool):
        model = rsl_mixer()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        (model(**first).loss + 0.5 * model(**second).loss).backward()
        return gradients(model)

    assert_same_gradients(gradients_of_the_sum(True), gradients_of_the_sum(False))
