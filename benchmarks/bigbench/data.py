"""BIG-bench examples, read offline from the `bigbench` sdist's `task.json` files, as prompts with listed answers.

BIG-bench's data ships on PyPI only inside the sdist (about 358 MB). It is downloaded once, by hand, outside the
repository; the task files a run needs are extracted from it into the cache on first use. The committed slice
(`slice/`) has the same layout, so the same reader serves the tests.
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
SDIST_ENV = "BIGBENCH_SDIST"
DEFAULT_SDIST = CACHE / "bigbench-sdist"
DOWNLOAD_HINT = f"pip download --no-deps --no-binary :all: bigbench -d {DEFAULT_SDIST}"
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


def sdist_archive(source: Optional[Path] = None) -> Path:
    """The sdist archive: `source`, else $BIGBENCH_SDIST, else the default cache folder (a file or the folder
    holding it); a FileNotFoundError that says how to download it when there is none."""
    location = Path(source or os.environ.get(SDIST_ENV, DEFAULT_SDIST)).expanduser()
    archives = sorted(location.glob("bigbench-*.tar.gz")) if location.is_dir() else [location]
    if not archives or not archives[-1].is_file():
        raise FileNotFoundError(
            f"BIG-bench's sdist is not at {location}. Download it once (about 358 MB, outside the repository): "
            f"{DOWNLOAD_HINT}  (or set ${SDIST_ENV} to the archive or its folder)."
        )
    return archives[-1]


def extracted_tasks(names: list[str], source: Optional[Path] = None) -> Path:
    """A `benchmark_tasks` folder holding the named tasks' `task.json`, extracted from the sdist into the cache once.

    A subtask name without its folder's `_json` suffix is matched too. Unknown names raise, listing them.
    """
    archive = sdist_archive(source)
    root = CACHE / "bigbench" / archive.name.removesuffix(".tar.gz") / TASKS_FOLDER
    if all(resolve(root, name) is not None for name in names):
        return root
    wanted = {str(task_path(name)) for name in names} | {str(task_path(name)) + "_json" for name in names}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if TASKS_FOLDER in parts and parts[-1] == "task.json":
                relative = Path(*parts[parts.index(TASKS_FOLDER) + 1 : -1])
                if str(relative) in wanted:
                    (root / relative).mkdir(parents=True, exist_ok=True)
                    (root / relative / "task.json").write_bytes(tar.extractfile(member).read())
    missing = [name for name in names if resolve(root, name) is None]
    if missing:
        raise ValueError(f"BIG-bench has no task {', '.join(map(repr, missing))} (subtasks are named task:subtask).")
    return root


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
    task = json.loads(path.read_text())
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
