"""Where a run's tasks come from: BIG-bench's task files, generated tasks, a user's JSONL files.

The pipeline (experts, rows, scoring, report) is the same for every source; a source gives the examples of each
task split three ways, its budgets per size, and what names its cache folder, so that two sources (or two versions
of a user's file) never share a cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .data import Example
from .sizes import BenchSize

Splits = dict[str, dict[str, list[Example]]]  # task -> split -> examples


@dataclass(frozen=True)
class TaskSource:
    """`splits(tasks, size_name, seed)` loads and splits the tasks, raising on bad data before anything is written;
    `sizes` are the source's budgets by name; `cache_key(tasks)` is hashed with the task names into the run folder's
    name (BIG-bench's is empty, so its folders stay where earlier runs left them), and `prefix` starts that name."""

    sizes: Mapping[str, BenchSize]
    splits: Callable[[list[str], str, int], Splits]
    prefix: str = ""
    cache_key: Callable[[list[str]], str] = lambda tasks: ""
