"""The generated tasks and a user's JSONL tasks as one task source of the benchmark pipeline.

Generated tasks are split as the committed manifest lists them (example ids, no data); a user's file is split from
the seed, and its content's hash names the cache, so an edited file never reuses the rows of the old one.
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import partial
from pathlib import Path

from benchmarks.bigbench.data import task_examples
from benchmarks.bigbench.source import Splits, TaskSource
from benchmarks.bigbench.splits import manifest_entry, read_manifest, split_task

from .generators import TASKS, generate
from .sizes import SIZES
from .task_file import TaskFileError, read_task_file

MANIFEST = Path(__file__).resolve().parent / "manifest.json"
POOL = 1000  # records generated per task, split by `split_ids`: more than any size's splits need
DATA_SEED = 0  # the examples are fixed, as a downloaded task's are; `--seed` moves splits, option order, training


def task_layouts(tasks: list[str], files: dict[str, Path]) -> dict[str, dict]:
    """Every task's records in BIG-bench's layout: generated ones by name, then the files (all checked first)."""
    clashes = sorted(set(files) & set(TASKS))
    if clashes:
        raise TaskFileError(f"--task-file name {', '.join(clashes)} is a generated task's; give the file another name.")
    layouts = {name: read_task_file(path) for name, path in files.items()}
    return {**{name: generate(name, DATA_SEED, POOL) for name in tasks}, **layouts}


def load_splits(files: dict[str, Path], tasks: list[str], size_name: str, seed: int) -> Splits:
    """task -> split -> examples; `tasks` lists the generated tasks first, then the files' names."""
    layouts = task_layouts([task for task in tasks if task not in files], files)
    manifest = read_manifest(MANIFEST) if size_name == "full" else None
    sizes = SIZES[size_name].splits
    splits = {}
    for task in tasks:
        examples = task_examples(layouts[task], seed)[0]
        if task not in files:
            splits[task] = split_task(task, examples, sizes, seed, manifest)
            continue
        try:
            splits[task] = split_task(task, examples, sizes, seed)
        except ValueError as error:  # too few examples for the size's splits
            raise TaskFileError(f"{files[task]}: {error}") from None
    return splits


def _cache_key(files: dict[str, Path], tasks: list[str]) -> str:
    """The content of every task: a file's bytes, a generated task's records and prompt format (so that a change
    to a generator never reuses rows scored on the old examples)."""
    content = {
        name: files[name].read_bytes() if name in files else json.dumps(generate(name, DATA_SEED, POOL)).encode()
        for name in tasks
    }
    return "".join(f"\n{name}:{hashlib.sha256(data).hexdigest()}" for name, data in content.items())


def task_source(files: dict[str, Path]) -> TaskSource:
    """The source of a run over generated tasks and the user's `files` ({task name: JSONL path})."""
    return TaskSource(SIZES, partial(load_splits, files), "tasks-", partial(_cache_key, files))


def write_manifest(tasks: list[str], seed: int, path: Path = MANIFEST) -> dict:
    """Split every generated task from the seed at the full size and record the ids, with what made the data."""
    sizes = SIZES["full"].splits
    manifest = {
        "source": (
            f"benchmarks/tasks/generators.py on Python {platform.python_version()} (Unicode 3.2.0 tables); "
            f"{POOL} records per task, generated with seed {DATA_SEED}"
        ),
        "seed": seed,
        "sizes": vars(sizes),
        "id": "first 16 hex digits of the SHA-256 of the example's input text",
        "tasks": {},
    }
    for task in tasks:
        examples, duplicates = task_examples(generate(task, DATA_SEED, POOL), seed)
        manifest["tasks"][task] = manifest_entry(examples, duplicates, split_task(task, examples, sizes, seed))
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
