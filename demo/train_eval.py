"""The demo's evaluation, through transformers' own `generate` (its training: `benchmarks.training.fit`)."""

from __future__ import annotations

import torch
from transformers import default_data_collator

from .tasks import EOS_ID, LENGTH, PAD_ID, Domain, decode, evaluation_set


@torch.no_grad()
def exact_match(model: torch.nn.Module, domain: Domain, count: int, seed: int) -> float:
    """Fraction of held-out prompts whose greedy answer is exactly right."""
    prompts, answers = evaluation_set(domain, count, seed)
    model.eval()
    input_ids = torch.tensor(prompts)
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=LENGTH + 1,
        do_sample=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    predictions = [decode(row[input_ids.shape[1] :].tolist())[: LENGTH + 1] for row in generated]
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, samples: list[dict], batch_size: int) -> float:
    """Mean cross-entropy (nats) over the labelled tokens of `samples` (all of one length), as the model reports it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = default_data_collator(
            [{k: s[k] for k in ("input_ids", "attention_mask", "labels")} for s in samples[start : start + batch_size]]
        )
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    model.train(was_training)
    return total / count
