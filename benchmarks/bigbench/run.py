"""The pipeline: data and splits, lm-eval tasks, experts, then every row scored and cached, then the summary.

Everything lands under one folder per (size, task set) in the cache, so a rerun skips what is done: the base
model, each expert, each row's per-example scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .carry import expert_digests, pack, read_results, restorable_rows
from .claims import claim
from .data import CACHE, SLICE, load_task, task_files
from .experts import EXPERT_WEIGHTS, train_expert
from .lm_eval_tasks import lm_eval_name, write_tasks
from .methods import Context
from .models import load_base, load_tokenizer, prepare_base
from .plan import plan
from .report import markdown, summarize
from .scoring import score
from .sizes import SIZES
from .source import TaskSource
from .splits import read_manifest, split_task

BENCH_CACHE = CACHE / "bench"


def add_run_options(parser: argparse.ArgumentParser, sizes: Mapping) -> None:
    """The options every benchmark's command line shares: size, seed, rows, threads, rows to restore."""
    parser.add_argument("--size", choices=sorted(sizes), default="full")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, option shuffles and training")
    parser.add_argument(
        "--rows", nargs="+", default=None, help="run only the rows whose key starts with one of these (e.g. expert)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--restore-from",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="an earlier run's results.json: its rows enter the cache unscored when its experts are this run's",
    )


def run_folder(size: str, tasks: list[str], source: TaskSource | None = None) -> Path:
    source = source or BIGBENCH
    digest = hashlib.sha256(("\n".join(tasks) + source.cache_key(tasks)).encode()).hexdigest()[:8]
    return BENCH_CACHE / f"{source.prefix}{size}-{digest}"


def load_splits(tasks: list[str], size_name: str, seed: int) -> dict:
    """task -> split -> examples: the committed slice, or BIG-bench's task files split as the manifest says."""
    size = SIZES[size_name]
    root = SLICE if size.data == "slice" else task_files(tasks)
    manifest = read_manifest() if size.data == "bigbench" else None
    return {task: split_task(task, load_task(root, task, seed)[0], size.splits, seed, manifest) for task in tasks}


BIGBENCH = TaskSource(SIZES, load_splits)


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, so that another run sharing the cache never reads half a row."""
    path.parent.mkdir(exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)


def _train_experts(train, expert_dirs: list[Path], log, poll_seconds: float = 30.0) -> None:
    """Train (`train(index)`) every expert no other live run is training, then wait for those it is, taking over
    any whose run dies meanwhile."""

    def missing(indices) -> list[int]:
        return [index for index in indices if not (expert_dirs[index] / EXPERT_WEIGHTS).is_file()]

    pending = missing(range(len(expert_dirs)))
    while pending:
        for index in pending:
            with claim(expert_dirs[index].with_name(expert_dirs[index].name + ".claim")) as mine:
                if mine:
                    train(index)  # returns at once when another run finished the expert meanwhile
        pending = missing(pending)
        if pending:
            log(f"waiting for expert(s) {pending}, which another run is training")
            time.sleep(poll_seconds)


def _score_row(built, tokenizer, tasks: list[str], folder: Path, batch_size: int) -> tuple[dict, dict]:
    """Every task's per-example scores (and routing statistics) of one model, or of {task: model}, each task
    scored with its own model."""
    models = built if isinstance(built, dict) else dict.fromkeys(tasks, built)
    scores, routing = {}, {}
    for model, group in _grouped(models).items():
        per_task, stats = score(model, tokenizer, [lm_eval_name(task) for task in group], folder, batch_size)
        scores.update({task: per_task[lm_eval_name(task)] for task in group})
        routing.update(stats)
    return {task: scores[task] for task in tasks}, routing


def _grouped(models: dict) -> dict:
    """{task: model} as {model: [tasks]}, so a model shared by tasks is scored on all of them in one call."""
    groups: dict = {}
    for task, model in models.items():
        groups.setdefault(model, []).append(task)
    return groups


def run(
    tasks: list[str],
    size_name: str,
    seed: int = 0,
    rows: list[str] | None = None,
    log=print,
    source: TaskSource = BIGBENCH,
    restore_from: Path | None = None,
) -> dict:
    """Run (or resume) the benchmark on `source`'s tasks; return and write the summary of every row in the cache,
    computed now or before. `rows`: compute only the rows whose key starts with one of these prefixes.
    `restore_from`: an earlier run's results file, whose rows enter the cache unscored if its experts are these."""
    started = time.perf_counter()
    size = source.sizes[size_name]
    splits = source.splits(tasks, size_name, seed)  # first: bad data stops the run before the cache is touched
    earlier = read_results(restore_from) if restore_from is not None else None
    folder = run_folder(size_name, tasks, source)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.json").write_text(json.dumps(tasks))
    base_dir = BENCH_CACHE / f"base-{size.model}"
    prepare_base(size.model, base_dir, seed)
    tokenizer = load_tokenizer(base_dir)
    write_tasks(folder / "lm-eval-tasks", {task: parts["heldout"] for task, parts in splits.items()})
    expert_dirs = [folder / "experts" / f"{i}-{task.replace(':', '__')}" for i, task in enumerate(tasks)]
    ctx = Context(base_dir, expert_dirs, tokenizer, size, splits, folder, log)
    planned = plan(ctx, tasks)
    selected = [row for row in planned if rows is None or row.key.startswith(tuple(rows))]
    if earlier is not None or any(row.method != "base" for row in selected):  # every other row needs the experts
        _train_experts(
            lambda i: train_expert(
                load_base(base_dir), i, splits[tasks[i]]["expert"], expert_dirs[i], size, tokenizer, seed, log
            ),
            expert_dirs,
            log,
        )
    row_path = {row: folder / "rows" / f"{row.key}.json" for row in planned}
    if earlier is not None:
        restored = restorable_rows(earlier, restore_from, expert_digests(expert_dirs), splits)
        missing = [(row, path) for row, path in row_path.items() if row.key in restored and not path.is_file()]
        for row, path in missing:
            _write_atomically(path, json.dumps(restored[row.key]))
        log(
            f"restored {len(missing)} rows from {restore_from} (the cache held the other {len(restored) - len(missing)})"
        )
    for row in tqdm(selected, desc="rows"):
        with claim(row_path[row].with_suffix(".claim")) as mine:
            if not mine:
                log(f"row {row.key}: another run is scoring it")
            elif not row_path[row].is_file():
                log(f"row {row.key}: building and scoring")
                torch.manual_seed(seed)
                built = row.build()
                scores, routing = _score_row(built, tokenizer, tasks, folder / "lm-eval-tasks", size.eval_batch_size)
                _write_atomically(row_path[row], json.dumps({"row": row.key, "scores": scores, "routing": routing}))
    results = {row: json.loads(path.read_text()) for row, path in row_path.items() if path.is_file()}
    per_task = size.router_examples_per_task
    router_all = size.splits.router * (1 if per_task else len(tasks))
    summary = summarize(results, tasks, size_name, folder, router_all, per_task)
    if all((expert_dir / EXPERT_WEIGHTS).is_file() for expert_dir in expert_dirs):
        summary["experts"] = expert_digests(expert_dirs)  # what makes the rows restorable elsewhere
    summary["per_example"] = pack({row.key: result for row, result in results.items()}, splits)
    summary["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    (folder / "results.json").write_text(json.dumps(summary, indent=2))
    (folder / "results.md").write_text(markdown(summary))
    log(f"results: {folder / 'results.json'}")
    return summary
