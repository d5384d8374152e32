"""Score any model (base, PEFT LoRA, merge, Arrow, X-LoRA, LoRA-Mixer) on the local tasks, example by example.

The lm-eval path is the package's: its `task_manager` and `require_lm_eval` (the one place they are imported
from, so a move of that module changes one line). `evaluate_mixer` itself returns aggregates of mixers only,
while the bootstrap needs every example's score of every row, so lm-eval runs here with `log_samples`; for a
LoRA-Mixer the routing statistics are collected as `evaluate_mixer` does, and the test checks that both agree.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from peft_lora_mixer.integrations.lm_evaluation import evaluate_mixer, require_lm_eval, task_manager  # noqa: F401 (tests)
from peft_lora_mixer.integrations.trainer import find_mixer
from peft_lora_mixer.routing_loss.stats import summarize

METRICS = ("acc", "exact_match")


def score(
    model: torch.nn.Module, tokenizer, tasks: list[str], folder: Path, batch_size: int = 8
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per lm-eval task: {example id: 1.0 or 0.0}, and (LoRA-Mixer only, else empty) the routing statistics."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, folder)
    model.eval()
    language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=512)
    mixer = find_mixer(model)
    per_example, routing = {}, {}
    for task in tasks:
        if mixer is not None:
            mixer.routing_stats(reset=True)
        with mixer.collect_routing_stats() if mixer is not None else nullcontext():
            output = lm_eval.simple_evaluate(
                model=language_model,
                tasks=[task],
                task_manager=manager,
                log_samples=True,
                bootstrap_iters=0,
                verbosity="WARNING",
            )
        per_example[task] = {
            sample["doc"]["id"]: float(next(sample[m] for m in METRICS if m in sample))
            for sample in output["samples"][task]
        }
        if mixer is not None:
            routing[task] = summarize(mixer.routing_stats(reset=True))
    return per_example, routing
