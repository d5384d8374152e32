"""A synthetic multi-domain language-modelling task for the two-stage training tests.

Domain d draws its tokens uniformly from its own range [d * SPAN, (d + 1) * SPAN): the best an expert can do is
learn that range (loss log(SPAN) instead of log(vocabulary)), and an expert of another domain makes it worse, so
each token has one right expert and the routers can be checked against it.
"""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_model
from transformers import Trainer, TrainingArguments, default_data_collator

from peft_lora_mixer import ExpertIdsCollator, LoraMixerConfig
from peft_lora_mixer.routing_loss.stats import ModuleRoutingStats, usage_balance

NUM_DOMAINS = 4
SPAN = 32
SEQ_LEN = 12


def domain_samples(domain: int, count: int, seed: int) -> list[dict]:
    """`count` sequences of domain `domain` as Trainer samples (input_ids, labels, attention_mask, expert_id)."""
    generator = torch.Generator().manual_seed(seed * 100 + domain)
    ids = torch.randint(0, SPAN, (count, SEQ_LEN), generator=generator) + domain * SPAN
    return [
        {"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row), "expert_id": domain}
        for row in ids
    ]


def mixed_samples(count_per_domain: int, seed: int) -> list[dict]:
    return [s for d in range(NUM_DOMAINS) for s in domain_samples(d, count_per_domain, seed)]


def domain_base():
    """A tiny llama whose embeddings and output head have a direction per domain.

    Random 32-wide embeddings of 128 tokens are not linearly separable by domain, and a random head cannot
    favour a whole range; real domains have both kinds of structure. The embedding of domain d's tokens leans
    on hidden unit d, its output rows on unit NUM_DOMAINS + d: the base model cannot map one to the other, an
    expert can.
    """
    base = tiny_model("llama")
    with torch.no_grad():
        for domain in range(NUM_DOMAINS):
            rows = slice(domain * SPAN, (domain + 1) * SPAN)
            base.model.embed_tokens.weight[rows, domain] += 1.0
            base.lm_head.weight[rows, NUM_DOMAINS + domain] += 1.0
    return base


def mixer_model(**config) -> PeftModel:
    """`domain_base` with one expert per domain. The experts sit on `o_proj` only: with several adapted projections
    per layer one of them can carry a domain's mapping alone, and the others' routing then barely changes the loss,
    so it is not learned.
    """
    base = domain_base()
    defaults = dict(
        r=8,
        lora_alpha=16,
        num_experts=NUM_DOMAINS,
        top_k=1,
        target_modules=["o_proj"],
        rsl_balance_weight=0.1,
        rsl_entropy_weight=0.3,
    )
    return get_peft_model(base, LoraMixerConfig(**{**defaults, **config}))


def train(
    model: PeftModel, samples: list[dict], output_dir: str, steps: int, lr: float, forced: bool = False, **args
) -> Trainer:
    """A plain Trainer run; `forced`: route each sample to its domain's expert (stage 1) via the collator."""
    defaults = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**{**defaults, **args}),
        train_dataset=samples,
        data_collator=ExpertIdsCollator() if forced else collate_without_domain,
    )
    trainer.train()
    return trainer


def collate_without_domain(features: list[dict]) -> dict:
    """Stage 2 and later: the routers decide, so the domain column stays out of the batch."""
    return default_data_collator([{k: v for k, v in f.items() if k != "expert_id"} for f in features])


@torch.no_grad()
def routing_by_domain(model: PeftModel, seed: int, count: int = 16) -> dict[int, dict[str, ModuleRoutingStats]]:
    """Routing statistics of held-out samples, per domain, in eval mode."""
    model.eval()
    result = {}
    for domain in range(NUM_DOMAINS):
        batch = domain_samples(domain, count, seed)
        ids = torch.stack([s["input_ids"] for s in batch])
        model.routing_stats(reset=True)
        with model.collect_routing_stats():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        result[domain] = model.routing_stats(reset=True)
    return result


def routing_figures(stats: dict[int, dict[str, ModuleRoutingStats]]) -> dict[str, float]:
    """accuracy: share of held-out tokens whose top-1 expert is their domain's (mean over modules and domains);
    entropy: mean per-token routing entropy; balance: normalised entropy of the all-domain top-1 usage."""
    modules = list(stats[0])
    accuracy = sum(stats[d][m].usage[d].item() for d in stats for m in modules) / (len(stats) * len(modules))
    entropy = sum(stats[d][m].entropy for d in stats for m in modules) / (len(stats) * len(modules))
    balance = sum(usage_balance(sum(stats[d][m].usage for d in stats) / len(stats)) for m in modules) / len(modules)
    return {"accuracy": accuracy, "entropy": entropy, "balance": balance}
