"""Router labels for data without task labels: each sample's best expert, found by routing it to each in turn.

Plug-and-play routers trained from the task loss alone can settle on mixtures that half work
(docs/plug_and_play.md#when-router-training-stalls); teaching them each sample's expert (`router_labels`) removes
that. Where the router data does not say which task a sample belongs to, the frozen experts can: the expert whose
forced routing (`route_to`) gives the sample the lowest loss is its label. This costs one forward per expert and
sample, without gradients, before training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import default_data_collator

from ..integrations.trainer import find_mixer

NO_LABEL = -100


def best_expert_labels(
    model: torch.nn.Module,
    samples: Sequence[dict[str, Any]],
    collate: Callable[[list[dict]], dict] = default_data_collator,
    batch_size: int = 8,
) -> list[int]:
    """Each sample's expert index (0, 1, ... in the adapter's `experts` order) whose forced routing gives it the
    lowest loss, the mean over its labelled tokens; -100 for a sample without labelled tokens.

    Args:
        model: a LoRA-Mixer model (a `PeftModel` or the bare `LoraMixerModel`) with one active adapter.
        samples: the router training samples, each holding the model's inputs and `labels` (-100: not scored), as
            `collate` takes them.
        collate: batches samples into the model's keyword arguments (padding `labels` with -100); the batch is
            moved to the device of the model's first parameter.
        batch_size: samples per forward.

    The model is run in eval mode without gradients and left in the mode it was in; nothing else changes.
    """
    mixer = find_mixer(model)
    if mixer is None:
        raise TypeError(f"best_expert_labels() needs a LoRA-Mixer model, got a {type(model).__name__}.")
    if len(mixer.active_adapters) != 1:
        raise ValueError(
            f"best_expert_labels() labels the experts of one adapter; {mixer.active_adapters} are active. "
            "Activate one with `model.set_adapter(name)`."
        )
    config = mixer.peft_config[mixer.active_adapters[0]]
    copies = config.copies_per_expert  # under router_init="arrow" expert e takes slots 2e and 2e + 1
    encoder_decoder = bool(getattr(getattr(mixer.model, "config", None), "is_encoder_decoder", False))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = []
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                batch = collate(list(samples[start : start + batch_size]))
                batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                per_expert = []
                for expert in range(config.num_distinct_experts):
                    with mixer.route_to(expert * copies):
                        per_expert.append(sample_losses(model(**batch).logits, batch["labels"], encoder_decoder))
                losses.append(torch.stack(per_expert, dim=-1))  # (batch, experts)
    finally:
        model.train(was_training)
    losses = torch.cat(losses)
    best = losses.argmin(-1)
    best[losses.isnan().all(-1)] = NO_LABEL
    return best.tolist()


def sample_losses(logits: torch.Tensor, labels: torch.Tensor, encoder_decoder: bool) -> torch.Tensor:
    """Each sample's mean cross-entropy over its labelled tokens ((batch,), NaN without any), from `logits`
    ((batch, seq, vocab)) and `labels` ((batch, seq)): shifted by one for a decoder-only model, whose logits at
    position t predict token t + 1, aligned for an encoder-decoder's decoder."""
    labels = labels.to(logits.device)
    if not encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=NO_LABEL, reduction="none"
    )
    counted = (labels != NO_LABEL).sum(-1)
    return per_token.sum(-1) / counted  # 0 / 0 = NaN for a sample without labelled tokens
