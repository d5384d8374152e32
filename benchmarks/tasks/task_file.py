"""A user's own task as a JSONL file: one example a line, read and checked before a run touches its cache.

Each line is an object with `prompt` and `answer` (a string, or a list of accepted strings) for a generated answer,
or `prompt`, `options` (a list of strings) and `answer` (one of the options) for multiple choice. The prompt is used
as written (no "Q:"/"A:" added, options not appended): the answer follows it after a space, as in every task here.
"""

from __future__ import annotations

import json
from pathlib import Path


class TaskFileError(ValueError):
    """A task file that cannot be read as examples; the message names the file and the line."""


def parse_task_file_option(value: str) -> tuple[str, Path]:
    """`NAME=path.jsonl` as (name, path); an argparse-style message when it is not."""
    name, separator, path = value.partition("=")
    if not separator or not name or not path:
        raise TaskFileError(f"--task-file takes NAME=path.jsonl, got {value!r}.")
    if name != name.strip() or ":" in name or "/" in name:
        raise TaskFileError(f"--task-file name {name!r}: use a plain name without spaces, ':' or '/'.")
    return name, Path(path).expanduser()


def read_task_file(path: Path) -> dict:
    """The file's examples in BIG-bench's `task.json` layout (empty prefixes, options not appended)."""
    if not path.is_file():
        raise TaskFileError(f"Task file {path} does not exist.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            records.append(_record(path, number, line))
    if not records:
        raise TaskFileError(f"Task file {path} holds no examples.")
    kinds = {"options" in record for record in records}
    if len(kinds) > 1:
        raise TaskFileError(f"{path}: mixes multiple-choice lines (with `options`) and generated ones; use one kind.")
    examples = [_as_bigbench(record) for record in records]
    return {
        "example_input_prefix": "",
        "example_output_prefix": "",
        "append_choices_to_input": False,
        "examples": examples,
    }


def _record(path: Path, number: int, line: str) -> dict:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TaskFileError(f"{where}: not valid JSON ({error.msg}).") from None
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}: expected an object with `prompt` and `answer`, got {type(record).__name__}.")
    for field in ("prompt", "answer"):
        if field not in record:
            raise TaskFileError(f"{where}: missing field `{field}` (each line needs `prompt` and `answer`).")
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise TaskFileError(f"{where}: `prompt` must be a non-empty string.")
    answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
    if not answers or not all(isinstance(answer, str) and answer.strip() for answer in answers):
        raise TaskFileError(f"{where}: `answer` must be a non-empty string or a list of them.")
    if "options" in record:
        options = record["options"]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise TaskFileError(f"{where}: `options` must be a list of at least two strings.")
        if len(set(options)) != len(options):
            raise TaskFileError(f"{where}: `options` lists the same option twice.")
        if len(answers) != 1 or answers[0] not in options:
            raise TaskFileError(
                f"{where}: with `options`, `answer` must be exactly one of them, got {record['answer']!r}."
            )
    return record


def _as_bigbench(record: dict) -> dict:
    if "options" in record:
        return {"input": record["prompt"], "target_scores": {o: int(o == record["answer"]) for o in record["options"]}}
    return {"input": record["prompt"], "target": record["answer"]}
