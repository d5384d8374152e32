"""The BIG-bench benchmark's data: read from an sdist laid out as the real one (built here from the committed
slice, tests/data/bigbench_slice.json: a few examples per task, Apache-2.0, from bigbench 1.0.0), and the committed
manifest of splits."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.bigbench.__main__ import MANIFEST
from benchmarks.bigbench.data import (
    DEFAULT_TASKS,
    SPLITS,
    TaskDataError,
    examples_of,
    read_manifest,
    read_tasks,
    sdist_path,
    select,
    split,
)

SLICE = Path(__file__).resolve().parent / "data" / "bigbench_slice.json"


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """A .tar.gz with the sdist's layout holding the slice's tasks."""
    path = tmp_path_factory.mktemp("bigbench") / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, task in json.loads(SLICE.read_text()).items():
            data = json.dumps(task).encode()
            member = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name.replace(':', '/')}/task.json")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def test_every_default_task_reads_with_answers_as_lists_and_prompts_formatted(sdist):
    tasks = read_tasks(DEFAULT_TASKS, sdist)
    assert list(tasks) == list(DEFAULT_TASKS) and all(len(examples) == 6 for examples in tasks.values())
    for name, examples in tasks.items():
        for example in examples:
            assert isinstance(example.answers, list) and example.answers and example.task == name
            if example.choices is not None:
                assert set(example.answers) <= set(example.choices)
    counting = tasks["object_counting"][0]
    assert counting.choices is None and counting.answers == ["three", "3"]  # several accepted answers
    assert counting.prompt.startswith("\nQ: I have a clarinet") and counting.prompt.endswith("\nA: ")
    plural = tasks["linguistic_mappings:plural_json"][0]  # the task's own prefixes
    assert plural.prompt == "This is a ability. Now there is another one. There are two "
    assert tasks["arithmetic:2_digit_addition"][0].choices is None  # scored on its exact answer
    intent = tasks["intent_recognition"][0]
    assert intent.prompt.startswith("Predict the intent of the utterance.") and len(intent.choices) == 7


def test_options_are_shuffled_per_example_with_a_seed(sdist):
    """Some tasks list the right option first; after the shuffle its position varies, and the same seed gives the
    same order."""
    colors = read_tasks(["reasoning_about_colored_objects"], sdist)["reasoning_about_colored_objects"]
    raw = json.loads(SLICE.read_text())["reasoning_about_colored_objects"]["examples"]
    assert any(example.choices != list(task["target_scores"]) for example, task in zip(colors, raw))
    assert len({example.choices.index(example.answers[0]) for example in colors}) > 1
    again = read_tasks(["reasoning_about_colored_objects"], sdist)["reasoning_about_colored_objects"]
    assert [e.choices for e in again] == [e.choices for e in colors]
    other_seed = read_tasks(["reasoning_about_colored_objects"], sdist, seed=1)["reasoning_about_colored_objects"]
    assert [e.choices for e in other_seed] != [e.choices for e in colors]


def test_repeated_inputs_are_dropped():
    task = {
        "examples": [
            {"input": "1+1", "target": "2"},
            {"input": "1+1", "target": "two"},
            {"input": "2+2", "target": "4"},
        ]
    }
    examples = examples_of("sums", task)
    assert [e.answers for e in examples] == [["2"], ["4"]]


def test_splits_are_seeded_disjoint_and_refuse_a_task_too_small(sdist):
    examples = read_tasks(["hyperbaton"], sdist)["hyperbaton"]
    parts = split(examples, held_out=2, router_train=2, expert_train=10, seed=0)
    assert [len(parts[name]) for name in SPLITS] == [2, 2, 2]
    assert sorted(sum(parts.values(), [])) == sorted(e.id for e in examples)
    assert split(list(reversed(examples)), 2, 2, 10, seed=0) == parts  # by example, whatever the order read
    assert split(examples, 2, 2, 10, seed=1) != parts
    assert [e.id for e in select(examples, parts["held_out"])] == parts["held_out"]
    with pytest.raises(TaskDataError, match="too few"):
        split(examples, held_out=4, router_train=2, expert_train=10)
    with pytest.raises(TaskDataError, match="not in the task data"):
        select(examples, ["feedface0000"])


def test_missing_sdist_or_task_says_what_to_do(tmp_path, sdist, monkeypatch):
    monkeypatch.delenv("LORA_MIXER_BIGBENCH_SDIST", raising=False)
    with pytest.raises(TaskDataError, match="pip download --no-deps --no-binary :all: bigbench"):
        sdist_path(tmp_path / "absent.tar.gz")
    with pytest.raises(TaskDataError, match="task:subtask"):
        read_tasks(["arithmetic:9_digit_addition"], sdist)


def test_committed_manifest_holds_disjoint_splits_of_every_default_task():
    manifest = read_manifest(MANIFEST)
    settings, tasks = manifest["settings"], manifest["tasks"]
    assert list(tasks) == sorted(DEFAULT_TASKS) and settings["held_out"] >= 200
    for name, parts in tasks.items():
        assert len(parts["held_out"]) == settings["held_out"] and len(parts["router_train"]) == settings["router_train"]
        assert 300 <= len(parts["expert_train"]) <= settings["expert_train"], name
        counts = Counter(example_id for ids in parts.values() for example_id in ids)
        assert max(counts.values()) == 1, name
