"""Training with a plain `transformers.Trainer`, as the demo and the BIG-bench benchmark both train."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator


def fit(
    model: torch.nn.Module,
    samples: list[dict],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    data_collator=default_data_collator,
    keep_columns: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> None:
    """Train with a plain Trainer for `steps` optimizer steps (`keep_columns`: pass `expert_id` to the collator)."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(20, steps // 10),
            weight_decay=0.0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=True,
            remove_unused_columns=not keep_columns,
            dataloader_num_workers=0,
        )
        if not keep_columns:
            samples = [{k: v for k, v in s.items() if k != "expert_id"} for s in samples]
        Trainer(
            model=model, args=args, train_dataset=samples, data_collator=data_collator, callbacks=list(callbacks)
        ).train()
