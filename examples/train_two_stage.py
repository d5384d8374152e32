"""Joint two-stage LoRA-Mixer training with a plain `transformers.Trainer`, offline, on a tiny model (< 1 min).

Stage 1 trains each expert on its own domain (forced routing from the dataset's `domain` column); stage 2 freezes
the experts and trains the routers with the Routing Specialization Loss. Four synthetic domains: domain d draws its
tokens from its own range of the vocabulary, so every token has one right expert.

    python examples/train_two_stage.py [--plot usage.png]

The same script runs under `torchrun --nproc_per_node 2 examples/train_two_stage.py` (DDP, gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

from peft_lora_mixer import ExpertIdsCollator, LoraMixerConfig, RoutingCallback

DOMAINS, SPAN, SEQ_LEN = 4, 32, 12


def domain_dataset(count_per_domain: int, seed: int) -> list[dict]:
    """Samples with input_ids, labels, attention_mask and their `domain` (the stage-1 expert id)."""
    samples = []
    for domain in range(DOMAINS):
        generator = torch.Generator().manual_seed(seed * 100 + domain)
        for ids in torch.randint(0, SPAN, (count_per_domain, SEQ_LEN), generator=generator) + domain * SPAN:
            samples.append(
                {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), "domain": domain}
            )
    return samples


def build_model() -> PeftModel:
    """A tiny llama whose embeddings and output head carry a direction per domain (as real domains do)."""
    config = LlamaConfig(
        vocab_size=DOMAINS * SPAN,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    with torch.no_grad():
        for domain in range(DOMAINS):
            base.model.embed_tokens.weight[domain * SPAN : (domain + 1) * SPAN, domain] += 1.0
            base.lm_head.weight[domain * SPAN : (domain + 1) * SPAN, DOMAINS + domain] += 1.0
    mixer = LoraMixerConfig(
        r=8,
        lora_alpha=16,
        num_experts=DOMAINS,
        top_k=1,
        target_modules=["o_proj"],
        rsl_balance_weight=0.1,
        rsl_entropy_weight=0.3,
    )
    return get_peft_model(base, mixer)


def run_stage(
    model: PeftModel,
    samples: list[dict],
    output_dir: str,
    steps: int,
    lr: float,
    forced: bool,
    args: argparse.Namespace,
) -> Trainer:
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        remove_unused_columns=False,  # keep the `domain` column for ExpertIdsCollator
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        log_level="error",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=samples,
        data_collator=ExpertIdsCollator(column="domain") if forced else _drop_domain,
        callbacks=[RoutingCallback()],
    )
    trainer.train()
    return trainer


def _drop_domain(features: list[dict]) -> dict:
    return default_data_collator([{k: v for k, v in f.items() if k != "domain"} for f in features])


@torch.no_grad()
def routing_accuracy(model: PeftModel) -> tuple[float, dict]:
    """Share of held-out tokens whose top-1 expert is their domain's, and the statistics per domain."""
    model.eval()
    by_domain = {}
    for domain in range(DOMAINS):
        ids = torch.stack([s["input_ids"] for s in domain_dataset(16, seed=7)[domain * 16 : (domain + 1) * 16]])
        model.routing_stats(reset=True)
        with model.collect_routing_stats():
            model(input_ids=ids)
        by_domain[f"domain {domain}"] = model.routing_stats(reset=True)
    hits = [stats.usage[d].item() for d, per_module in enumerate(by_domain.values()) for stats in per_module.values()]
    return sum(hits) / len(hits), by_domain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--losses", help="write both stages' logged losses to this JSON file")
    parser.add_argument("--plot", help="write a usage heatmap per domain to this PNG (needs matplotlib)")
    args = parser.parse_args()

    model = build_model()
    with tempfile.TemporaryDirectory() as output_dir:
        model.set_trainable(routers=False, experts=True)  # stage 1: experts, forced routing
        stage1 = run_stage(model, domain_dataset(32, seed=0), output_dir, args.stage1_steps, 1e-2, True, args)
        model.set_trainable(routers=True, experts=False)  # stage 2: routers, RSL
        stage2 = run_stage(model, domain_dataset(32, seed=1), output_dir, args.stage2_steps, 2e-2, False, args)
    if not stage2.is_world_process_zero():
        return
    logs = [[h for h in trainer.state.log_history if "loss" in h] for trainer in (stage1, stage2)]
    world_size = stage2.args.world_size
    print(f"processes: {world_size}, global batch: {world_size * args.batch_size * args.grad_accum}")
    print(f"stage 1 loss {logs[0][0]['loss']:.3f} -> {logs[0][-1]['loss']:.3f}")
    print(f"stage 2 loss {logs[1][0]['loss']:.3f} -> {logs[1][-1]['loss']:.3f}, last logs: {logs[1][-1]}")
    accuracy, by_domain = routing_accuracy(model)
    print(f"held-out tokens routed to their domain's expert: {accuracy:.1%}")
    if args.losses:
        with open(args.losses, "w") as f:
            json.dump([[h["loss"] for h in stage] for stage in logs], f)
    if args.plot:
        from peft_lora_mixer.plot import plot_usage_heatmap

        print("heatmap:", plot_usage_heatmap(by_domain, args.plot))


if __name__ == "__main__":
    main()
