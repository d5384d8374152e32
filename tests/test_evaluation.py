"""`lora-mixer eval`: lm-evaluation-harness scores of a saved mixer on local tasks, routing statistics per task."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer, word
from transformers import AutoModelForCausalLM

from peft_lora_mixer import LoraMixerConfig
from peft_lora_mixer.cli.commands import main
from peft_lora_mixer.routing_loss.stats import summarize

# Two tasks over different words, so the routers see different tokens in each: (first word, count of documents)
TASKS = {"low_words": (0, 6), "high_words": (80, 5)}

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def task_documents(first: int, count: int) -> list[dict]:
    """A question of three words and two one-word answers; the label alternates."""
    return [
        {
            "question": " ".join(word(first + i + j) for j in range(3)),
            "choices": [word(first + i + 3), word(first + i + 20)],
            "label": i % 2,
        }
        for i in range(count)
    ]


@pytest.fixture
def saved(tmp_path):
    """A tiny llama with its tokenizer, a mixer over it, and a folder holding the local tasks."""
    base, mixer, tasks = tmp_path / "base", tmp_path / "mixer", tmp_path / "tasks"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=4, init_weights=False)).save_pretrained(mixer)
    return base, mixer, write_tasks(tasks, list(TASKS))


def write_tasks(folder: Path, names: list[str]) -> Path:
    """lm-eval task files for the named `TASKS`, with their documents, in `folder` (an `--include-path`)."""
    folder.mkdir()
    for name in names:
        data = folder / f"{name}.jsonl"
        data.write_text("\n".join(json.dumps(doc) for doc in task_documents(*TASKS[name])))
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return folder


@torch.no_grad()
def expected_results(base, mixer, first: int, count: int) -> tuple[float, dict]:
    """Accuracy from the mixer's log-probabilities of each choice, and the routing statistics of the contexts."""
    tokenizer = tiny_tokenizer()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), mixer).eval()
    hits = []
    with model.collect_routing_stats():
        for doc in task_documents(first, count):
            context = torch.tensor([tokenizer(doc["question"])["input_ids"]])
            log_probs = model(input_ids=context).logits[0, -1].log_softmax(-1)
            choices = [tokenizer(choice)["input_ids"][0] for choice in doc["choices"]]
            hits.append(int(log_probs[choices].argmax()) == doc["label"])
    stats = model.routing_stats(reset=True)
    routing = {**summarize(stats), "tokens": max(module.tokens for module in stats.values())}
    usage = torch.stack([module.usage for module in stats.values()]).mean(0).tolist()
    return sum(hits) / len(hits), {"routing": routing, "usage": usage}


def run_eval(base, mixer, *options: str) -> int:
    """`lora-mixer eval` on a saved base and mixer, with any options."""
    return main(["eval", "--base", str(base), "--mixer", str(mixer), *options])


def test_eval_command_scores_local_tasks_with_routing_per_task(saved, tmp_path, capsys):
    base, mixer, tasks = saved
    output = tmp_path / "results.json"
    assert (
        run_eval(
            base, mixer, "--tasks", *TASKS, "--include-path", str(tasks), "--device", "cpu", "--output", str(output)
        )
        == 0
    )
    printed = capsys.readouterr().out
    results = {result["task"]: result for result in json.loads(output.read_text())}
    assert list(results) == list(TASKS)
    for name, (first, count) in TASKS.items():
        accuracy, routing = expected_results(base, mixer, first, count)
        assert results[name]["scores"][name]["acc,none"] == pytest.approx(accuracy)
        assert results[name]["routing"]["tokens"] == 3 * count  # the contexts, once each (lm-eval caches them)
        assert results[name]["routing"] == pytest.approx(routing["routing"], rel=1e-5)
        assert results[name]["usage"] == pytest.approx(routing["usage"], abs=1e-6)
        assert any(line.startswith(name) and "acc,none" in line for line in printed.splitlines())
    assert results["low_words"]["usage"] != results["high_words"]["usage"]  # the statistics are each task's own


def test_eval_command_refuses_a_missing_task_folder(saved, tmp_path, capsys):
    base, mixer, _ = saved
    assert run_eval(base, mixer, "--tasks", "low_words", "--include-path", str(tmp_path / "missing")) == 2
    assert "missing' does not exist" in capsys.readouterr().err


@pytest.mark.slow  # looking a name up among lm-eval's built-in tasks indexes all of their ~15,000 files (~20 s)
def test_eval_command_names_unknown_tasks(saved, capsys):
    base, mixer, tasks = saved
    assert run_eval(base, mixer, "--tasks", "low_words", "no_such_task", "--include-path", str(tasks)) == 2
    assert "no task 'no_such_task'" in capsys.readouterr().err


def test_eval_without_lm_eval_says_how_to_install(saved, monkeypatch, capsys):
    base, mixer, tasks = saved
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what Python does when the package is not installed
    assert run_eval(base, mixer, "--tasks", "low_words") == 2
    assert "pip install 'peft-lora-mixer[eval]'" in capsys.readouterr().err
