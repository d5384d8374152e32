"""The held-out examples as lm-eval local tasks: one JSONL file and one YAML file per BIG-bench task.

lm-eval's own `bigbench_*` tasks fetch their data from the Hub; these read the files written here. `data_files`
is an absolute path because lm-eval resolves a relative one against the working folder, not the YAML's.
Multiple choice is scored by accuracy over the listed options, a generated answer by exact match against any of
the example's answers after the leading space the model generates is stripped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import Example

MAX_NEW_TOKENS = 24


def lm_eval_name(task: str) -> str:
    """The lm-eval task name of a BIG-bench task or `task:subtask`."""
    return "bigbench_local_" + task.replace(":", "__")


def write_tasks(folder: Path, heldout: dict[str, list[Example]]) -> list[str]:
    """Write every task's held-out examples and task YAML into `folder`; return the lm-eval task names."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task, examples in heldout.items():
        name = lm_eval_name(task)
        data = folder / f"{name}.jsonl"
        _write_if_changed(data, "".join(json.dumps(_record(example)) + "\n" for example in examples))
        _write_if_changed(folder / f"{name}.yaml", _yaml(name, data, multiple_choice=examples[0].choices is not None))
        names.append(name)
    return names


def _write_if_changed(path: Path, text: str) -> None:
    """Leave an identical file alone, so that a second run on the same cache never reads a half-written one."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _record(example: Example) -> dict:
    record = {"id": example.id, "prompt": example.prompt, "answers": example.answers}
    if example.choices is not None:
        record.update(choices=example.choices, label=example.label)
    return record


def _yaml(name: str, data: Path, multiple_choice: bool) -> str:
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
    head += "test_split: test\ndoc_to_text: prompt\n"
    if multiple_choice:
        return head + (
            "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        )
    return head + (
        "output_type: generate_until\ndoc_to_target: answers\n"
        f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {MAX_NEW_TOKENS}\n  do_sample: false\n'
        "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
