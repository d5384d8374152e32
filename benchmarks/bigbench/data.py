"""BIG-bench task data, read offline from the `bigbench` sdist, as examples with fixed, seeded splits.

The sdist (Apache-2.0, about 358 MB) is downloaded once, outside the repository, and never at test time:

    pip download --no-deps --no-binary :all: bigbench -d ~/.cache/peft-lora-mixer/bigbench

Each task is a `task.json` inside it; a task is named as BIG-bench names it, a subtask as `task:subtask`
(`arithmetic:2_digit_addition`, `linguistic_mappings:plural_json`). Multiple-choice tasks (`target_scores`) keep
their options in an order shuffled per example with a fixed seed (some tasks list the right option first), and
every example's answers are a list (lm-eval reads single or multiple answers from the first record). Examples whose
input repeats are dropped (the first is kept). Splits are by example: a seeded permutation of the example ids, cut
into held-out, router-train and expert-train; the ids per split are the manifest the repository commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

SDIST_ENV = "LORA_MIXER_BIGBENCH_SDIST"
DEFAULT_SDIST = Path.home() / ".cache" / "peft-lora-mixer" / "bigbench" / "bigbench-1.0.0.tar.gz"
TASKS_FOLDER = "bigbench/benchmark_tasks"
# BIG-bench's defaults for a JSON task's prefixes (its task schema)
DEFAULT_INPUT_PREFIX, DEFAULT_OUTPUT_PREFIX = "\nQ: ", "\nA: "
SPLITS = ("held_out", "router_train", "expert_train")

# Tasks a 135M model learns something of in a few hundred LoRA steps, in different formats: multiple choice with
# 2, 7 and 18 options, short generative answers (counting, arithmetic, string mappings); each has 500+ examples.
DEFAULT_TASKS = (
    "hyperbaton",
    "intent_recognition",
    "reasoning_about_colored_objects",
    "object_counting",
    "arithmetic:2_digit_addition",
    "linguistic_mappings:plural_json",
    "linguistic_mappings:sentence_negation_json",
)


@dataclass(frozen=True)
class Example:
    """One example: the prompt as the task formats it, the options (multiple choice; None for a generative task),
    and the accepted answers (one or more)."""

    id: str
    task: str
    prompt: str
    answers: list[str]
    choices: Optional[list[str]] = None


class TaskDataError(ValueError):
    """The sdist or a task in it is missing or not a BIG-bench JSON task."""


def sdist_path(path: Optional[os.PathLike] = None) -> Path:
    """The sdist: `path`, else `$LORA_MIXER_BIGBENCH_SDIST`, else the default cache location; an error that says how
    to get it when it is not there."""
    found = Path(path or os.environ.get(SDIST_ENV) or DEFAULT_SDIST).expanduser()
    if not found.is_file():
        raise TaskDataError(
            f"BIG-bench's task data is not at {found}. Download the sdist once (outside the repository): "
            f"`pip download --no-deps --no-binary :all: bigbench -d {DEFAULT_SDIST.parent}`, or point "
            f"{SDIST_ENV} at the .tar.gz."
        )
    return found


def read_tasks(names: Sequence[str], sdist: Optional[os.PathLike] = None, seed: int = 0) -> dict[str, list[Example]]:
    """The examples of each named task or subtask, read from the sdist in one pass."""
    wanted = {_member_suffix(name): name for name in names}
    found: dict[str, list[Example]] = {}
    with tarfile.open(sdist_path(sdist)) as archive:
        for member in archive:
            suffix = member.name.split(f"/{TASKS_FOLDER}/", 1)[-1]
            if suffix in wanted:
                name = wanted[suffix]
                found[name] = examples_of(name, json.load(archive.extractfile(member)), seed)
    missing = [name for name in names if name not in found]
    if missing:
        raise TaskDataError(f"No BIG-bench JSON task {missing} in the sdist (a subtask is named `task:subtask`).")
    return {name: found[name] for name in names}


def _member_suffix(name: str) -> str:
    return "/".join(name.split(":")) + "/task.json"


def examples_of(name: str, task: dict, seed: int = 0) -> list[Example]:
    """A task.json's examples, formatted, deduplicated by input, options shuffled per example (seeded)."""
    if "examples" not in task:
        raise TaskDataError(f"{name} has no `examples`: it is a programmatic task, not a JSON task.")
    prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    examples, seen = [], set()
    for raw in task["examples"]:
        if raw["input"] in seen:
            continue
        seen.add(raw["input"])
        prompt = f"{prefix}{input_prefix}{raw['input']}{output_prefix}"
        example_id = hashlib.sha1(f"{name}\n{raw['input']}".encode()).hexdigest()[:12]
        if "target" in raw:  # generative (arithmetic lists options too; its metric is the exact answer)
            target = raw["target"]
            answers = [target] if isinstance(target, str) else list(target)
            examples.append(Example(example_id, name, prompt, answers))
        else:
            scores = raw["target_scores"]
            best = max(scores.values())
            choices = list(scores)
            random.Random(f"{seed}:{example_id}").shuffle(choices)
            answers = [choice for choice in choices if scores[choice] == best]
            examples.append(Example(example_id, name, prompt, answers, choices))
    return examples


def split(
    examples: Sequence[Example], held_out: int, router_train: int, expert_train: int, seed: int = 0
) -> dict[str, list[str]]:
    """Example ids per split: a seeded permutation cut into `held_out`, `router_train` and up to `expert_train` of
    the rest (an expert trains a few hundred steps: hyperbaton's 50,000 examples would only bloat the manifest)."""
    if len(examples) < held_out + router_train + 1:
        raise TaskDataError(
            f"{examples[0].task if examples else 'A task'} has {len(examples)} examples after deduplication: too few "
            f"for {held_out} held-out and {router_train} router-train examples and any to train its expert."
        )
    ids = sorted(example.id for example in examples)
    random.Random(seed).shuffle(ids)
    cuts = (held_out, held_out + router_train)
    return dict(zip(SPLITS, (ids[: cuts[0]], ids[cuts[0] : cuts[1]], ids[cuts[1] : cuts[1] + expert_train])))


def write_manifest(path: Path, splits: dict[str, dict[str, list[str]]], settings: dict) -> None:
    """The splits of every task (`{task: {split: [ids]}}`) and how they were made, as the repository commits them."""
    path.write_text(json.dumps({"settings": settings, "tasks": splits}, indent=1, sort_keys=True) + "\n")


def read_manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def select(examples: Iterable[Example], ids: Iterable[str]) -> list[Example]:
    """The examples with these ids, in the ids' order; an error naming any id the data lacks."""
    by_id = {example.id: example for example in examples}
    missing = [example_id for example_id in ids if example_id not in by_id]
    if missing:
        raise TaskDataError(f"{len(missing)} ids of the manifest are not in the task data (e.g. {missing[0]}).")
    return [by_id[example_id] for example_id in ids]


def as_records(examples: Iterable[Example]) -> list[dict]:
    return [asdict(example) for example in examples]
