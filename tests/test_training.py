"""Two-stage training with a plain Trainer: specialisation, logging, resuming, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from domains import (
    NUM_DOMAINS,
    collate_without_domain,
    domain_samples,
    mixed_samples,
    mixer_model,
    routing_by_domain,
    routing_figures,
    train,
)
from transformers import Trainer, TrainingArguments

from peft_lora_mixer import ExpertIdsCollator, LoraMixerLayer, RoutingCallback

REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def loss_by_forced_expert(model, domain: int, expert: int) -> float:
    ids = torch.stack([s["input_ids"] for s in domain_samples(domain, 16, seed=5)])
    with model.route_to(expert):
        return model(input_ids=ids, labels=ids).loss.item()


def test_two_stage_rsl_routes_domains_sharper_and_no_less_balanced(tmp_path):
    model = mixer_model()
    model.set_trainable(routers=False, experts=True)
    train(model, mixed_samples(32, seed=0), str(tmp_path), steps=150, lr=1e-2, forced=True)
    model.eval()
    for domain in range(NUM_DOMAINS):  # stage 1 made expert d the best one on domain d
        losses = [loss_by_forced_expert(model, domain, expert) for expert in range(NUM_DOMAINS)]
        assert min(range(NUM_DOMAINS), key=losses.__getitem__) == domain, losses

    stage1 = {k: v.clone() for k, v in model.state_dict().items()}
    figures = {}
    for with_rsl in (False, True):
        model.load_state_dict(stage1)
        model.peft_config["default"].add_routing_loss = with_rsl
        model.set_trainable(routers=True, experts=False)
        train(model, mixed_samples(32, seed=1), str(tmp_path), steps=200, lr=2e-2)
        figures[with_rsl] = routing_figures(routing_by_domain(model, seed=2))
        for name, param in model.named_parameters():  # stage 2 left the experts as stage 1 made them
            if "loramixer_A" in name or "loramixer_B" in name:
                torch.testing.assert_close(param, stage1[name], rtol=0, atol=0)
    print(f"\nrouting figures without RSL: {figures[False]}\nrouting figures with RSL:    {figures[True]}")
    assert figures[True]["accuracy"] >= 0.9
    assert figures[True]["entropy"] < 0.75 * figures[False]["entropy"]
    # "no less balanced": normalised usage entropy within 0.01 (both runs are near-perfectly balanced here)
    assert figures[True]["balance"] >= figures[False]["balance"] - 0.01


def test_callback_logs_rsl_parts_and_stats(tmp_path):
    model = mixer_model()
    model.set_trainable(routers=True, experts=True)
    trainer = Trainer(
        model=model,
        train_dataset=mixed_samples(4, seed=0),
        data_collator=collate_without_domain,
        args=TrainingArguments(
            str(tmp_path),
            max_steps=4,
            logging_steps=2,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            remove_unused_columns=False,
            disable_tqdm=True,
        ),
        callbacks=[RoutingCallback()],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert {
            "rsl/total",
            "rsl/balance",
            "rsl/entropy",
            "rsl/entropy_weight",
            "routing/entropy",
            "routing/balance",
        } <= set(log)
        assert 0 < log["routing/balance"] <= 1 and log["rsl/total"] > 0


def resumable_run(output_dir: Path, resume: bool = False) -> dict[str, torch.Tensor]:
    """Joint training (routers and experts 0-1) with preservation and an adaptive lambda, checkpoint at step 3."""
    model = mixer_model(rsl_entropy_target=0.2, rsl_entropy_adapt_rate=0.2, rsl_preservation_weight=0.5)
    model.set_trainable(routers=True, experts=[0, 1])
    args = TrainingArguments(
        str(output_dir),
        max_steps=6,
        save_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        save_only_model=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=mixed_samples(8, seed=3),
        data_collator=collate_without_domain,
        callbacks=[RoutingCallback()],
    )
    forwards = []
    model.get_base_model().register_forward_hook(lambda *args: forwards.append(1))
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-3") if resume else None)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "loramixer_" in n}
    weights["lambda"] = model.routing_loss().entropy_weight
    return weights, len(forwards)


def test_resumed_trainer_run_equals_straight_run(tmp_path):
    straight, straight_forwards = resumable_run(tmp_path / "straight")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.rename(tmp_path / "straight" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed, resumed_forwards = resumable_run(resumed_dir, resume=True)
    assert (straight_forwards, resumed_forwards) == (12, 6)  # the resumed run really started at step 3
    assert straight["lambda"].item() != pytest.approx(0.1)  # the controller did move lambda
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow
def test_ddp_matches_single_process_with_the_same_global_batch(tmp_path):
    """2 processes x batch 4 against 1 process x batch 4 x 2 accumulation steps: the same micro-batches meet in
    each optimizer step, so the loss curves agree up to float summation order (tolerance 1e-4 absolute)."""
    script = str(REPO / "examples" / "train_two_stage.py")
    common = ["--stage1-steps", "8", "--stage2-steps", "8", "--batch-size", "4", "--logging-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    single, ddp = tmp_path / "single.json", tmp_path / "ddp.json"
    single_run = subprocess.run(
        [sys.executable, script, *common, "--grad-accum", "2", "--losses", str(single)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "processes: 1, global batch: 8" in single_run.stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    result = subprocess.run(
        [*torchrun, script, *common, "--losses", str(ddp)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2, global batch: 8" in result.stdout
    single_losses, ddp_losses = json.loads(single.read_text()), json.loads(ddp.read_text())
    print(f"\nsingle process: {single_losses}\nDDP (2 processes): {ddp_losses}")
    for stage_single, stage_ddp in zip(single_losses, ddp_losses):
        assert len(stage_single) == len(stage_ddp) == 8
        assert stage_ddp == pytest.approx(stage_single, abs=1e-4)
    assert single_losses[0][-1] < single_losses[0][0]  # it did train


def test_usage_heatmap_png(tmp_path):
    from peft_lora_mixer.plot import plot_usage_heatmap

    stats = routing_by_domain(mixer_model(), seed=2, count=2)
    path = plot_usage_heatmap({f"domain {d}": s for d, s in stats.items()}, tmp_path / "usage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="collect them"):
        plot_usage_heatmap({"empty": {}}, tmp_path / "empty.png")


def test_expert_ids_collator_needs_its_column():
    collator = ExpertIdsCollator(column="domain")
    batch = collator(
        [{"input_ids": torch.tensor([1, 2]), "domain": 3}, {"input_ids": torch.tensor([3, 4]), "domain": 0}]
    )
    assert batch["expert_ids"].tolist() == [3, 0] and "domain" not in batch
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        collator([{"input_ids": torch.tensor([1, 2])}])


@pytest.mark.parametrize("reentrant", [True, False])
def test_trainer_with_gradient_checkpointing_trains_like_without(tmp_path, reentrant):
    def run(**checkpointing):
        model = mixer_model()
        model.set_trainable(routers=True, experts=True)
        calls = []
        next(m for m in model.modules() if isinstance(m, LoraMixerLayer)).register_forward_hook(
            lambda *args: calls.append(1)
        )
        train(model, mixed_samples(4, seed=0), str(tmp_path), steps=3, lr=1e-2, **checkpointing)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = run()
    checkpointed, checkpointed_calls = run(
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    assert checkpointed_calls == 2 * plain_calls  # the layers really were recomputed in backward
    assert any("router" in name for name in plain)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, atol=1e-6, rtol=1e-5, msg=name)
