"""Score a LoRA-Mixer with lm-evaluation-harness, with each task's routing statistics beside its scores.

The paper reports accuracy per benchmark (its Table 2); `evaluate_mixer` runs lm-eval's Python API one task at a
time on an already-built mixer, recording the routing statistics of the forwards each task made, so a score comes
with which experts produced it. lm-eval is an optional extra (`pip install 'peft-lora-mixer[eval]'`), imported
only here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..routing_loss.stats import ModuleRoutingStats, summarize
from .trainer import find_mixer

INSTALL_HINT = "pip install 'peft-lora-mixer[eval]'"


@dataclass(frozen=True)
class TaskEvaluation:
    """One requested task: lm-eval's numeric metrics per (sub)task, and the routing over the tokens it fed.

    `scores[name]["acc,none"]` is lm-eval's key layout (metric, filter). `routing` holds `routing/entropy` and
    `routing/balance` (see `stats.summarize`) and `tokens`, the tokens each router saw; `usage[i]` is the share of
    those tokens whose top-1 expert is i, averaged over the routers.
    """

    task: str
    scores: dict[str, dict[str, float]]
    routing: dict[str, float]
    usage: list[float]


def require_lm_eval():
    """The `lm_eval` module, or an ImportError that says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(f"Evaluation needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None
    return lm_eval


def task_manager(tasks: Sequence[str], include_path: Optional[Union[str, Path]] = None):
    """lm-eval's TaskManager holding every task in `tasks`, else a ValueError naming the missing ones.

    Only `include_path` is indexed when it holds every task: indexing lm-eval's thousands of built-in task files
    takes seconds to tens of seconds.
    """
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("No tasks given: name lm-eval tasks or groups, e.g. arc_easy gsm8k.")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"Task folder {str(include_path)!r} does not exist.")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    missing = [task for task in tasks if task not in manager.all_tasks]
    if missing:
        raise ValueError(
            f"lm-eval knows no task {', '.join(map(repr, missing))}. Check the names with `lm-eval ls tasks`, or "
            "pass the folder holding your task YAML files as `include_path` (`--include-path`)."
        )
    return manager


def evaluate_mixer(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: Optional[Union[str, Path]] = None,
    manager=None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 1,
) -> list[TaskEvaluation]:
    """Score `model` (a PeftModel with a LoRA-Mixer adapter) on each lm-eval task, with its routing statistics.

    Tasks run one at a time, each with fresh statistics. Keep `batch_size=1` for exact statistics: lm-eval pads
    its log-likelihood batches without an attention mask, so larger batches count the padding tokens too.
    `limit`: at most this many documents per task (a fraction below 1: that share), as in lm-eval. `manager`: the
    result of `task_manager(tasks, include_path)` when already built (then `include_path` is not read).
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    mixer = find_mixer(model)
    if mixer is None:
        raise ValueError("evaluate_mixer needs a model with a LoRA-Mixer adapter (PeftModel over LoraMixerConfig).")
    manager = manager if manager is not None else task_manager(tasks, include_path)
    model.eval()
    language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = []
    for task in tasks:
        mixer.routing_stats(reset=True)
        with mixer.collect_routing_stats():
            output = lm_eval.simple_evaluate(
                model=language_model,
                tasks=[task],
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=False,
                bootstrap_iters=0,
            )
        results.append(_task_evaluation(task, output["results"], mixer.routing_stats(reset=True)))
    return results


def _task_evaluation(
    task: str, results: dict[str, dict[str, Any]], stats: dict[str, ModuleRoutingStats]
) -> TaskEvaluation:
    scores = {
        name: {
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key
        }
        for name, metrics in results.items()
    }
    routing = {**summarize(stats), "tokens": max((module.tokens for module in stats.values()), default=0)}
    usage = torch.stack([module.usage for module in stats.values()]).mean(0).tolist() if stats else []
    return TaskEvaluation(task, scores, routing, usage)


def format_report(results: Sequence[TaskEvaluation], names: Optional[Sequence[str]] = None) -> str:
    """One line per (sub)task and metric, the routing statistics of the requested task beside it; the top-1 usage
    columns are headed by the experts' `names` (default: their indices)."""
    names = [str(name) for name in names] if names is not None else [str(i) for i in range(_num_experts(results))]
    widths = [max(len(name), 4) for name in names]
    usage_header = " ".join(f"{name:>{width}}" for name, width in zip(names, widths))
    header = f"{'task':<28}{'metric':<22}{'value':>8}  {'tokens':>8}{'entropy':>9}{'balance':>9}  "
    lines = [" " * len(header) + "top-1 usage per expert", header + usage_header]
    for result in results:
        routing = result.routing
        beside = (
            f"{int(routing['tokens']):>8}{routing.get('routing/entropy', math.nan):>9.3f}"
            f"{routing.get('routing/balance', math.nan):>9.3f}  "
            + " ".join(f"{share:>{width}.2f}" for share, width in zip(result.usage, widths))
        )
        for name, metrics in result.scores.items():
            for metric, value in metrics.items():
                if "_stderr" not in metric:
                    lines.append(f"{name[:27]:<28}{metric[:21]:<22}{value:>8.4f}  {beside}")
    return "\n".join(lines)


def _num_experts(results: Sequence[TaskEvaluation]) -> int:
    return max((len(result.usage) for result in results), default=0)
