"""The routing-collapse warning of `RoutingCallback`: it fires, once, on a forced collapse and stays silent on
balanced routing; `find_collapses` against hand-made statistics."""

import warnings

import pytest
import torch
from domains import NUM_DOMAINS, collate_without_domain, domain_samples, mixed_samples, mixer_model
from transformers import Trainer, TrainingArguments

from peft_lora_mixer import LoraMixerLayer, ModuleRoutingStats, RoutingCallback, RoutingCollapseWarning
from peft_lora_mixer.integrations.collapse import collapse_message, find_collapses


def stats(usage: list[float], top_k_usage: list[float], tokens: int = 1000) -> ModuleRoutingStats:
    return ModuleRoutingStats(tokens, torch.tensor(usage), torch.tensor(top_k_usage), torch.tensor(usage), 0.5)


def test_find_collapses_names_the_dominant_and_the_unused_experts():
    found = find_collapses(
        {
            "balanced": stats([0.3, 0.3, 0.4], [0.6, 0.6, 0.8]),
            "dominated": stats([0.96, 0.04, 0.0], [1.0, 0.5, 0.5]),
            "dead": stats([0.5, 0.5, 0.0], [0.9, 0.9, 0.0]),
            "few tokens": stats([1.0, 0.0, 0.0], [1.0, 0.0, 0.0], tokens=10),
            "one expert": stats([1.0], [1.0]),
        }
    )
    assert [(c.module, c.dominant, c.unused) for c in found] == [
        ("dominated", (0, pytest.approx(0.96)), ()),
        ("dead", None, (2,)),
    ]
    # router_init="arrow" holds each expert as two slots: one slot of a pair unused is no collapse
    pairs = {"arrow": stats([0.3, 0.0, 0.0, 0.4, 0.3, 0.0], [0.5, 0.0, 0.0, 0.7, 0.8, 0.0])}
    assert find_collapses(pairs, copies=2) == []
    assert [c.unused for c in find_collapses(pairs)] == [(1, 2, 5)]
    message = collapse_message(found, modules=5)
    assert "2 of 5 routed modules" in message and "expert 0 is the first choice of 96% of tokens" in message
    assert "dead (expert 2 never chosen, over 1000 tokens)" in message and "rsl_balance_weight" in message


def train_routers(model, tmp_path, **callback) -> tuple[Trainer, list[warnings.WarningMessage]]:
    model.set_trainable(routers=True, experts=False)
    trainer = Trainer(
        model=model,
        train_dataset=mixed_samples(8, seed=0),
        data_collator=collate_without_domain,
        args=TrainingArguments(
            str(tmp_path),
            max_steps=3,
            logging_steps=1,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            remove_unused_columns=False,
            disable_tqdm=True,
        ),
        callbacks=[RoutingCallback(collapse_min_tokens=32, **callback)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return trainer, [w for w in caught if issubclass(w.category, RoutingCollapseWarning)]


def routers(model) -> list[torch.nn.Linear]:
    return [m.loramixer_router["default"] for m in model.modules() if isinstance(m, LoraMixerLayer)]


def test_a_forced_collapse_is_warned_once_with_its_modules(tmp_path):
    model = mixer_model()
    with torch.no_grad():
        for router in routers(model):  # expert 0 wins every token by far
            router.weight.zero_()
            router.bias.copy_(torch.tensor([50.0] + [0.0] * (router.out_features - 1)))
    trainer, caught = train_routers(model, tmp_path)
    assert len(caught) == 1  # three logs, one warning
    message = str(caught[0].message)
    names = [n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraMixerLayer)]
    assert f"in {len(names)} of {len(names)} routed modules" in message
    assert f"{names[0]} (expert 0 is the first choice of 100% of tokens; experts 1, 2, 3 never chosen" in message
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [log["routing/collapsed_modules"] for log in logs] == [len(names)] * 3


@torch.no_grad()
def route_each_domain_to_its_expert(model) -> None:
    """Router rows = each domain's mean input to the module, centred: domain d's tokens go to expert d."""
    for layer in (m for m in model.modules() if isinstance(m, LoraMixerLayer)):
        seen = []
        handle = layer.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(args[0]))
        for domain in range(NUM_DOMAINS):
            model(input_ids=torch.stack([s["input_ids"] for s in domain_samples(domain, 8, seed=0)]))
        handle.remove()
        means = torch.stack([inputs.reshape(-1, inputs.shape[-1]).mean(0) for inputs in seen])
        layer.loramixer_router["default"].weight.copy_(20 * (means - means.mean(0)))
        layer.loramixer_router["default"].bias.zero_()


def test_balanced_routing_is_not_warned(tmp_path):
    model = mixer_model()
    route_each_domain_to_its_expert(model)
    trainer, caught = train_routers(model, tmp_path)
    assert caught == []
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [log["routing/collapsed_modules"] for log in logs] == [0] * 3
    assert all(log["routing/balance"] > 0.9 for log in logs)
