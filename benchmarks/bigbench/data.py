"""BIG-bench examples, read offline from BIG-bench's `task.json` files, as prompts with listed answers.

The task files come from a BIG-bench checkout (github.com/google/BIG-bench, `bigbench/benchmark_tasks`) or from the
`bigbench` 1.0.0 sdist (about 358 MB) where a package index serves it; pypi.org itself serves only 0.0.1, a
placeholder without the data. Either is fetched once, by hand, outside the repository. From an sdist, the task
files a run needs are extracted into the cache on first use. The committed slice (`slice/`) has the same layout,
so the same reader serves the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CACHE = Path(os.environ.get("PEFT_LORA_MIXER_CACHE", Path.home() / ".cache" / "peft-lora-mixer"))
DATA_ENV = "BIGBENCH_DATA"
DEFAULT_DATA = CACHE / "bigbench-data"
DATA_HINT = (
    f"git clone --depth 1 https://github.com/google/BIG-bench {DEFAULT_DATA}  (or put the bigbench 1.0.0 sdist, "
    f"bigbench-1.0.0.tar.gz, in that folder; set ${DATA_ENV} to use another place)"
)
SLICE = Path(__file__).resolve().parent / "slice"
TASKS_FOLDER = "benchmark_tasks"


@dataclass(frozen=True)
class Example:
    """One BIG-bench example as it is scored.

    `answers` always holds a list (lm-eval reads single or multiple answers from the first record), and `label`
    is the index of the right one of `choices` for multiple choice, None for a generated answer.
    """

    id: str
    prompt: str
    answers: list[str]
    choices: Optional[list[str]] = None
    label: Optional[int] = None

    @property
    def target(self) -> str:
        """The answer trained on: the right choice, or the first listed answer."""
        return self.choices[self.label] if self.choices is not None else self.answers[0]


def task_path(name: str) -> Path:
    """`task` or `task:subtask` as a path under `benchmark_tasks` (`linguistic_mappings:plural` finds `plural_json`)."""
    return Path(*name.split(":"))


def data_location(source: Optional[Path] = None) -> Path:
    """Where BIG-bench's data is: `source`, else $BIGBENCH_DATA, else the default cache folder."""
    return Path(source or os.environ.get(DATA_ENV, DEFAULT_DATA)).expanduser()


def checkout_tasks(location: Path) -> Optional[Path]:
    """The `benchmark_tasks` folder of a BIG-bench checkout at `location` (or `location` itself), or None."""
    for candidate in (location, location / TASKS_FOLDER, location / "bigbench" / TASKS_FOLDER):
        if candidate.name == TASKS_FOLDER and candidate.is_dir():
            return candidate
    return None


def sdist_archive(location: Path) -> Path:
    """The sdist archive at `location` (the file, or the newest `bigbench-*.tar.gz` in the folder); a
    FileNotFoundError that says how to get the data when there is none."""
    archives = sorted(location.glob("bigbench-*.tar.gz")) if location.is_dir() else [location]
    if not archives or not archives[-1].is_file():
        raise FileNotFoundError(
            f"No BIG-bench data at {location}: neither a BIG-bench checkout nor a bigbench-*.tar.gz sdist. "
            f"Get it once, outside the repository: {DATA_HINT}."
        )
    return archives[-1]


def task_files(names: list[str], source: Optional[Path] = None) -> Path:
    """A `benchmark_tasks` folder holding the named tasks' `task.json`: a checkout's own, or one extracted from the
    sdist into the cache once.

    A subtask name without its folder's `_json` suffix is matched too. Unknown names raise, listing them.
    """
    location = data_location(source)
    root = checkout_tasks(location)
    if root is None:
        archive = sdist_archive(location)
        root = CACHE / "bigbench" / archive.name.removesuffix(".tar.gz") / TASKS_FOLDER
        if not all(resolve(root, name) is not None for name in names):
            _extract(archive, names, root)
    missing = [name for name in names if resolve(root, name) is None]
    if missing:
        raise ValueError(f"BIG-bench has no task {', '.join(map(repr, missing))} (subtasks are named task:subtask).")
    return root


def source_name(root: Path) -> str:
    """What a `task_files` folder was read from, for the manifest: the sdist's name, or "BIG-bench checkout"."""
    extracted = CACHE / "bigbench"
    return root.parent.name + " sdist" if root.parent.parent == extracted else "BIG-bench checkout"


def _extract(archive: Path, names: list[str], root: Path) -> None:
    """Copy the named tasks' `task.json` out of the sdist; a ValueError when the archive holds no task data."""
    wanted = {str(task_path(name)) for name in names} | {str(task_path(name)) + "_json" for name in names}
    holds_tasks = False
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if TASKS_FOLDER in parts and parts[-1] == "task.json":
                holds_tasks = True
                relative = Path(*parts[parts.index(TASKS_FOLDER) + 1 : -1])
                if str(relative) in wanted:
                    (root / relative).mkdir(parents=True, exist_ok=True)
                    (root / relative / "task.json").write_bytes(tar.extractfile(member).read())
    if not holds_tasks:
        raise ValueError(
            f"{archive} holds no BIG-bench task data (no {TASKS_FOLDER}/*/task.json): pypi.org's `bigbench` 0.0.1 "
            f"is a placeholder. Use a checkout or the 1.0.0 sdist instead: {DATA_HINT}."
        )


def resolve(root: Path, name: str) -> Optional[Path]:
    """The `task.json` of `name` under `root`, or None."""
    for candidate in (task_path(name), task_path(name).with_name(task_path(name).name + "_json")):
        if (root / candidate / "task.json").is_file():
            return root / candidate / "task.json"
    return None


def load_task(root: Path, name: str, seed: int) -> tuple[list[Example], int]:
    """The task's examples without duplicates (same input text: the first is kept), and how many were dropped.

    Prompts follow BIG-bench's JSON task format (task prefix, input prefix, choices if it appends them, output
    prefix). Options are shuffled with a seed per example, since some tasks list the right one first.
    """
    path = resolve(root, name)
    if path is None:
        raise ValueError(f"No task.json for {name!r} under {root}.")
    return task_examples(json.loads(path.read_text()), seed)


def task_examples(task: dict, seed: int) -> tuple[list[Example], int]:
    """The examples of a task in BIG-bench's `task.json` layout (a dict), as `load_task` returns them; other
    task sources (generated tasks, a user's JSONL file) produce this layout so that one reader makes every prompt."""
    seen: set[str] = set()
    examples = []
    for raw in task["examples"]:
        if raw["input"] in seen:
            continue
        seen.add(raw["input"])
        examples.append(_example(task, raw, seed))
    return examples, len(task["examples"]) - len(examples)


def example_id(text: str) -> str:
    """An example's id: the first 16 hex digits of the SHA-256 of its input text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _example(task: dict, raw: dict, seed: int) -> Example:
    identity = example_id(raw["input"])
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    text = task.get("task_prefix", "") + input_prefix + raw["input"]
    if "target" in raw:  # generated answer (arithmetic has both forms; its answer is generated here)
        targets = raw["target"] if isinstance(raw["target"], list) else [raw["target"]]
        return Example(identity, (text + output_prefix).strip(), [str(t).strip() for t in targets])
    choices = list(raw["target_scores"])
    random.Random(f"{seed}:{identity}").shuffle(choices)
    best = max(raw["target_scores"].values())
    answers = [choice for choice in choices if raw["target_scores"][choice] == best]
    if task.get("append_choices_to_input", True):
        text += "".join(f"\n  choice: {choice}" for choice in choices)
    return Example(identity, (text + output_prefix).strip(), answers, choices, choices.index(answers[0]))
