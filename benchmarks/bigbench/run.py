"""The pipeline: data and splits, lm-eval tasks, experts, then every row scored and cached, then the summary.

Everything lands under one folder per (size, task set) in the cache, so a rerun skips what is done: the base
model, each expert, each row's per-example scores.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import CACHE, SLICE, extracted_tasks, load_task
from .experts import train_expert
from .lm_eval_tasks import lm_eval_name, write_tasks
from .methods import Context
from .models import load_base, load_tokenizer, prepare_base
from .plan import plan
from .report import markdown, summarize
from .scoring import score
from .sizes import SIZES
from .splits import read_manifest, split_task

BENCH_CACHE = CACHE / "bench"


def run_folder(size: str, tasks: list[str]) -> Path:
    digest = hashlib.sha256("\n".join(tasks).encode()).hexdigest()[:8]
    return BENCH_CACHE / f"{size}-{digest}"


def load_splits(tasks: list[str], size_name: str, seed: int) -> dict:
    """task -> split -> examples: the committed slice, or the sdist split as the manifest says."""
    size = SIZES[size_name]
    root = SLICE if size.data == "slice" else extracted_tasks(tasks)
    manifest = read_manifest() if size.data == "sdist" else None
    return {task: split_task(task, load_task(root, task, seed)[0], size.splits, seed, manifest) for task in tasks}


def run(tasks: list[str], size_name: str, seed: int = 0, rows: str | None = None, log=print) -> dict:
    """Run (or resume) the benchmark; return and write the summary. `rows`: only rows whose key starts with it."""
    started = time.perf_counter()
    size = SIZES[size_name]
    folder = run_folder(size_name, tasks)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.json").write_text(json.dumps(tasks))
    splits = load_splits(tasks, size_name, seed)
    base_dir = BENCH_CACHE / f"base-{size.model}"
    prepare_base(size.model, base_dir, seed)
    tokenizer = load_tokenizer(base_dir)
    names = write_tasks(folder / "lm-eval-tasks", {task: parts["heldout"] for task, parts in splits.items()})
    expert_dirs = [folder / "experts" / f"{i}-{task.replace(':', '__')}" for i, task in enumerate(tasks)]
    ctx = Context(base_dir, expert_dirs, tokenizer, size, splits, folder, log)
    selected = [row for row in plan(ctx, tasks) if rows is None or row.key.startswith(rows)]
    if any(row.method != "base" for row in selected):  # every other row needs the experts
        for index, (task, expert_dir) in enumerate(zip(tasks, expert_dirs)):
            train_expert(load_base(base_dir), index, splits[task]["expert"], expert_dir, size, tokenizer, seed, log)
    results = {}
    for row in tqdm(selected, desc="rows"):
        path = folder / "rows" / f"{row.key}.json"
        if not path.is_file():
            log(f"row {row.key}: building and scoring")
            torch.manual_seed(seed)
            per_task, routing = score(row.build(), tokenizer, names, folder / "lm-eval-tasks", size.eval_batch_size)
            scores = {task: per_task[lm_eval_name(task)] for task in tasks}
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"row": row.key, "scores": scores, "routing": routing}))
        results[row] = json.loads(path.read_text())
    summary = summarize(results, tasks, size_name, folder, size.splits.router * len(tasks))
    summary["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    (folder / "results.json").write_text(json.dumps(summary, indent=2))
    (folder / "results.md").write_text(markdown(summary))
    log(f"results: {folder / 'results.json'}")
    return summary
