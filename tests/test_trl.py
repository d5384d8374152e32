"""`trl.SFTTrainer` on LoRA-Mixer models: the RSL reaches the routers and is logged, completion-only loss."""

import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from lora_experts import save_lora
from mixers import autograd_rsl
from peft import get_peft_model
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer, word
from transformers import TrainerCallback

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer, RoutingCallback, from_experts

REPO = Path(__file__).resolve().parent.parent
RSL = dict(top_k=2, rsl_balance_weight=0.5, rsl_entropy_weight=0.3)


def prompt_completion_dataset(count: int = 8) -> Dataset:
    """Prompts of 4 words and completions of 3; SFTTrainer trains on the completions only (its default here)."""
    return Dataset.from_list(
        [
            {
                "prompt": " ".join(word((7 * i + j) % 120) for j in range(4)),
                "completion": " " + " ".join(word((3 * i + j) % 120) for j in range(3)),
            }
            for i in range(count)
        ]
    )


def joint_mixer():
    """Experts and routers train together."""
    return get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=4, init_weights=False, **RSL))


def plug_and_play_mixer(tmp_path):
    """Routers only, over three frozen PEFT LoRAs."""
    folders = [save_lora(tmp_path / f"expert{i}", seed=i, r=4, target_modules=["q_proj", "v_proj"]) for i in range(3)]
    return from_experts(tiny_model("llama"), folders, **RSL)


class FirstStep(TrainerCallback):
    """Keep the first optimizer step's batch (as the model received it) and gradients, before the update."""

    def __init__(self, model):
        self.batch, self.grads = None, None
        model.register_forward_pre_hook(self._keep_batch, with_kwargs=True)

    def _keep_batch(self, module, args, kwargs):
        if self.batch is None:
            self.batch = {k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels")}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_gradients(model, batch, with_rsl: bool) -> dict[str, torch.Tensor]:
    """Gradients of the mean token cross-entropy over the labelled tokens (+ the RSL of each router, averaged),
    computed here from the logits and from each router's input, with the model's own RSL switched off."""
    config = model.peft_config["default"]
    config.add_routing_loss = False
    router_inputs = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: router_inputs.append((m, args[0])))
        for layer in model.modules()
        if isinstance(layer, LoraMixerLayer)
    ]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for hook in hooks:
        hook.remove()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    if with_rsl:
        mask = batch["attention_mask"].bool()
        losses = []
        for layer, x in router_inputs:
            router = layer.loramixer_router["default"]
            probs = F.linear(x.float(), router.weight, router.bias).softmax(-1)
            losses.append(
                autograd_rsl(
                    probs[mask],
                    config.top_k,
                    config.rsl_balance_weight,
                    config.rsl_entropy_weight,
                    config.rsl_entropy_sign,
                )
            )
        loss = loss + torch.stack(losses).mean()
    loss.backward()
    config.add_routing_loss = True
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("regime", ["joint", "plug_and_play"])
def test_sft_trainer_rsl_reaches_the_routers_and_is_logged(tmp_path, regime):
    model = joint_mixer() if regime == "joint" else plug_and_play_mixer(tmp_path)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("router" in n for n in start) and (regime == "joint") == any("loramixer_A" in n for n in start)
    first = FirstStep(model)
    args = trl.SFTConfig(
        str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        bf16=False,
    )  # SFTConfig's default bf16 autocast: not exact
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=prompt_completion_dataset(),
        processing_class=tiny_tokenizer(),
        callbacks=[RoutingCallback(), first],
    )
    trainer.train()

    labels = first.batch["labels"]
    assert (labels[:, :4] == -100).all() and (labels[:, 4:] != -100).all()  # completion-only: prompts not scored
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(log["rsl/total"] > 0 and 0 < log["routing/balance"] <= 1 for log in logs)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in start:
                param.copy_(start[name])
    expected = reference_gradients(model, first.batch, with_rsl=True)
    without_rsl = reference_gradients(model, first.batch, with_rsl=False)
    for name, grad in expected.items():
        torch.testing.assert_close(first.grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    router_change = max((expected[n] - without_rsl[n]).abs().max().item() for n in expected if "router" in n)
    assert router_change > 1e-4  # the RSL's share of the router gradient is not negligible, so the check bites


def test_sft_example_runs_and_logs_the_rsl(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["trl_sft.py", "--max-steps", "2"])
    runpy.run_path(str(REPO / "examples" / "trl_sft.py"), run_name="__main__")
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(steps) == 2 and all(float(line.split("rsl")[1].split()[0]) > 0 for line in steps)
