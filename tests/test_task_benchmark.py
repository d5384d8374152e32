"""The benchmark on generated tasks and task files (`python -m benchmarks.tasks`): the data against independent
computations, the committed manifest, task files' errors, and the pipeline at the smoke size (nothing downloaded)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
from collections import Counter
from dataclasses import replace
from decimal import Decimal

import pytest
from safetensors.torch import load_file, save_file

from benchmarks.bigbench import run
from benchmarks.bigbench.data import task_examples
from benchmarks.bigbench.methods import Context
from benchmarks.bigbench.models import load_tokenizer, prepare_base
from benchmarks.bigbench.plan import plan
from benchmarks.bigbench.splits import SPLITS
from benchmarks.tasks.__main__ import main
from benchmarks.tasks.generators import METRIC, MONTHS, TASKS, clock_words, generate, number_words, roman_numeral
from benchmarks.tasks.sizes import SIZES
from benchmarks.tasks.source import DATA_SEED, MANIFEST, POOL, load_splits, task_source
from benchmarks.tasks.task_file import TaskFileError, parse_task_file_option, read_task_file

ROMAN_VALUES = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


def roman_value(numeral: str) -> int:
    """Read a Roman numeral back: a letter before a larger one is subtracted."""
    values = [ROMAN_VALUES[letter] for letter in numeral]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def test_known_answers():
    assert [number_words(n) for n in (0, 13, 40, 342, 1000, 20020, 99999)] == [
        "zero",
        "thirteen",
        "forty",
        "three hundred forty-two",
        "one thousand",
        "twenty thousand twenty",
        "ninety-nine thousand nine hundred ninety-nine",
    ]
    assert [roman_numeral(n) for n in (4, 9, 14, 1994, 3999)] == ["IV", "IX", "XIV", "MCMXCIV", "MMMCMXCIX"]
    assert clock_words(0, 0) == "twelve o'clock at night"
    assert clock_words(14, 35) == "twenty-five to three in the afternoon"
    assert clock_words(11, 59) == "one minute to twelve in the morning"
    assert clock_words(9, 15) == "quarter past nine in the morning"
    assert clock_words(20, 30) == "half past eight in the evening"
    assert clock_words(5, 7) == "seven minutes past five at night"


def test_generated_answers_agree_with_independent_readings():
    for record in generate("roman_numerals", DATA_SEED, 300)["examples"]:
        assert roman_value(record["target"]) == int(record["input"])
    for record in generate("long_date", DATA_SEED, 300)["examples"]:
        day, month, year = record["target"].split()
        assert datetime.date(int(year), MONTHS.index(month) + 1, int(day)).isoformat() == record["input"]
    factors = {(unit, smaller): factor for unit, smaller, factor in METRIC}
    for record in generate("metric_conversion", DATA_SEED, 300)["examples"]:
        amount, unit, _, smaller = record["input"].split()
        assert Decimal(record["target"]) == Decimal(amount) * factors[unit, smaller]
        assert "E" not in record["target"] and not record["target"].endswith(".0")


def test_every_task_is_deterministic_distinct_and_has_its_format():
    for name in TASKS:
        first, second = generate(name, DATA_SEED, POOL), generate(name, DATA_SEED, POOL)
        assert first == second
        inputs = [record["input"] for record in first["examples"]]
        assert len(inputs) == len(set(inputs)) == POOL
        examples, duplicates = task_examples(first, seed=0)
        assert duplicates == 0
        multiple_choice = TASKS[name].format.startswith("multiple choice")
        assert all((example.choices is not None) == multiple_choice for example in examples)
        # a classifier's fixed labels are learned, not listed: the prompt is the name alone
        assert all("choice:" not in example.prompt and example.prompt.endswith("\nA:") for example in examples)
    assert generate("roman_numerals", 1, 50) != generate("roman_numerals", 0, 50)
    with pytest.raises(ValueError, match="choose from"):
        generate("no_such_task", 0, 10)


def test_committed_manifest_matches_the_generated_data():
    manifest = json.loads(MANIFEST.read_text())
    assert sorted(manifest["tasks"]) == sorted(TASKS)
    splits = load_splits({}, list(TASKS), "full", seed=0)
    for task, parts in splits.items():
        ids = {split: [example.id for example in parts[split]] for split in SPLITS}
        assert ids == {split: manifest["tasks"][task][split] for split in SPLITS}
        assert len(set().union(*map(set, ids.values()))) == sum(map(len, ids.values()))  # disjoint
        assert [len(ids[s]) for s in ("heldout", "router", "expert")] == [100, 100, 400]


def write_lines(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_a_task_file_becomes_examples(tmp_path):
    generated = write_lines(
        tmp_path / "g.jsonl", [{"prompt": "2+2=", "answer": ["4", "four"]}, "", {"prompt": "1+1=", "answer": "2"}]
    )
    examples, _ = task_examples(read_task_file(tmp_path / "g.jsonl"), seed=0)
    assert [(e.prompt, e.answers, e.choices) for e in examples] == [
        ("2+2=", ["4", "four"], None),
        ("1+1=", ["2"], None),
    ]
    choice = {"prompt": "Sky colour?", "options": ["red", "blue", "green"], "answer": "blue"}
    write_lines(tmp_path / "c.jsonl", [choice])
    (example,), _ = task_examples(read_task_file(tmp_path / "c.jsonl"), seed=0)
    assert example.prompt == "Sky colour?" and sorted(example.choices) == ["blue", "green", "red"]
    assert example.choices[example.label] == "blue"
    assert parse_task_file_option(f"mine={generated}") == ("mine", tmp_path / "g.jsonl")


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"prompt": "a", "answer": "b"}, {"prompt": "c"}], r"line 2: missing field `answer`"),
        ([{"answer": "b"}], r"line 1: missing field `prompt`"),
        (["{not json"], r"line 1: not valid JSON"),
        ([["a", "b"]], r"line 1: expected an object"),
        ([{"prompt": "a", "answer": ""}], r"line 1: `answer` must be"),
        ([{"prompt": "a", "options": ["x", "y"], "answer": "z"}], r"line 1: with `options`, `answer` must be exactly"),
        ([{"prompt": "a", "options": ["x"], "answer": "x"}], r"line 1: `options` must be a list of at least two"),
        ([{"prompt": "a", "answer": "b"}, {"prompt": "c", "options": ["x", "y"], "answer": "x"}], "mixes"),
        ([], "holds no examples"),
    ],
)
def test_a_malformed_task_file_says_where_and_what(tmp_path, lines, message):
    write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(TaskFileError, match=message):
        read_task_file(tmp_path / "t.jsonl")


def test_bad_task_files_stop_the_run_before_its_cache_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "BENCH_CACHE", tmp_path / "bench")
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}])
    with pytest.raises(SystemExit):
        main(["--size", "smoke", "--tasks", "roman_numerals", "--task-file", f"mine={bad}"])
    assert "bad.jsonl, line 2: missing field `answer`" in capsys.readouterr().err
    good = write_lines(tmp_path / "good.jsonl", [{"prompt": "a", "answer": "b"}])
    for argv in (
        ["--task-file", f"roman_numerals={good}"],  # a generated task's name
        ["--task-file", f"mine={good}"],  # too few examples for the splits
        ["--task-file", f"mine={tmp_path / 'missing.jsonl'}"],
        ["--task-file", "no-equals-sign"],
        ["--tasks", "no_such_task"],
    ):
        with pytest.raises(SystemExit):
            main(["--size", "smoke", "--tasks", "roman_numerals", *argv])
    (tmp_path / "corrupt.json").write_text("{")
    old_summary = write_lines(tmp_path / "old.json", [{"rows": {}}])  # written before per-example scores were kept
    capsys.readouterr()
    for results, message in (
        (tmp_path / "missing.json", "cannot read the results to restore"),
        (tmp_path / "corrupt.json", "cannot read the results to restore"),
        (old_summary, "holds no per-example scores"),
    ):
        with pytest.raises(SystemExit):
            main(["--size", "smoke", "--tasks", "roman_numerals", "clock_time", "--restore-from", str(results)])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_an_edited_task_file_gets_its_own_cache_and_big_bench_keeps_its_folders(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_lines(path, [{"prompt": "a", "answer": "b"}])
    source = task_source({"mine": path})
    before = run.run_folder("smoke", ["roman_numerals", "mine"], source)
    write_lines(path, [{"prompt": "a", "answer": "c"}])
    assert run.run_folder("smoke", ["roman_numerals", "mine"], source) != before
    edited = replace(TASKS["roman_numerals"], prefix=TASKS["roman_numerals"].prefix + " ")
    with pytest.MonkeyPatch.context() as patch:  # a generator's prompt changes: its rows are not reused either
        patch.setitem(TASKS, "roman_numerals", edited)
        assert run.run_folder("smoke", ["roman_numerals", "mine"], source) != before
    assert before.name.startswith("tasks-smoke-")
    digest = hashlib.sha256(b"hyperbaton\nnavigate").hexdigest()[:8]  # as before task sources existed
    assert run.run_folder("full", ["hyperbaton", "navigate"]) == run.BENCH_CACHE / f"full-{digest}"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    prepare_base("tiny", folder, seed=0)
    return folder


def smoke(
    tmp_path, monkeypatch, tiny_base, rows: list[str] | None, claimed_elsewhere: tuple[str, ...] = ()
) -> tuple[dict, list[str], object]:
    """Run the smoke size on two generated tasks and a multiple-choice task file; return the summary.
    `claimed_elsewhere`: rows that another live run on the cache (here: pytest's parent process) holds."""
    monkeypatch.setattr(run, "BENCH_CACHE", tmp_path / "bench")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "base-tiny").symlink_to(tiny_base)
    lines = [
        {"prompt": f"Is {n} even?", "options": ["yes", "no"], "answer": "no" if n % 2 else "yes"} for n in range(20)
    ]
    path = tmp_path / "parity.jsonl"
    write_lines(path, lines)
    tasks = ["roman_numerals", "clock_time", "parity"]
    folder = run.run_folder("smoke", tasks, task_source({"parity": path}))
    for row in claimed_elsewhere:
        (folder / "rows").mkdir(parents=True, exist_ok=True)
        (folder / "rows" / f"{row}.claim").write_text(f"{socket.gethostname()} {os.getppid()}")
    selected = ["--rows", *rows] if rows else []
    assert main(["--size", "smoke", "--tasks", *tasks[:2], "--task-file", f"parity={path}", *selected]) == 0
    return json.loads((folder / "results.json").read_text()), tasks, folder


def test_smoke_size_scores_rows_on_generated_tasks_and_a_task_file(tmp_path, monkeypatch, capsys, tiny_base):
    rows = ["base", "expert", "arrow", "mixer-arrow-init", "mixer-k2-rsl-all", "uniform-merge"]
    summary, tasks, folder = smoke(tmp_path, monkeypatch, tiny_base, rows, claimed_elsewhere=("uniform-merge",))
    assert not (folder / "rows" / "uniform-merge.json").exists()  # left to the run that holds it
    assert [path.name for path in (folder / "rows").glob("*.claim")] == ["uniform-merge.claim"]  # ours released
    splits = load_splits({"parity": tmp_path / "parity.jsonl"}, tasks, "smoke", seed=0)
    heldout = {task: {example.id for example in splits[task]["heldout"]} for task in tasks}
    for path in (folder / "rows").glob("*.json"):
        scores = json.loads(path.read_text())["scores"]
        assert {task: set(values) for task, values in scores.items()} == heldout, path.name
    assert {"base model", "oracle (each task's own expert)", "LoRA-Mixer top-2 RSL, all router examples"} <= set(
        summary["rows"]
    )
    assert summary["tasks"] == tasks and len(summary["expert_matrix"]) == 3
    zero_shot = summary["arrow_init_minus_arrow"]  # the zero-shot bar's table
    assert zero_shot["low"] <= zero_shot["difference"] <= zero_shot["high"]
    assert "| LoRA-Mixer, Arrow init, top-2, 0 steps minus |" in (folder / "results.md").read_text()
    assert "multiple_choice" in (folder / "lm-eval-tasks" / "bigbench_local_parity.yaml").read_text()

    def no_scoring(*args, **kwargs):
        raise AssertionError("a rerun scored a row again instead of reading its cache")

    monkeypatch.setattr(run, "score", no_scoring)
    parity = f"parity={tmp_path / 'parity.jsonl'}"
    assert main(["--size", "smoke", "--tasks", *tasks[:2], "--task-file", parity, "--rows", "base", "expert"]) == 0
    assert_rows_restore_elsewhere_only_with_the_same_experts(
        tmp_path, monkeypatch, capsys, folder, [*tasks[:2], parity]
    )


def assert_rows_restore_elsewhere_only_with_the_same_experts(
    tmp_path, monkeypatch, capsys, folder, tasks: list[str]
) -> None:
    """Another machine (a fresh cache) restores the committed results' rows unscored when it holds the same
    experts, and refuses them, writing no row, when one expert differs."""
    results = tmp_path / "committed.json"
    shutil.copy(folder / "results.json", results)
    scored = {path.name: json.loads(path.read_text()) for path in (folder / "rows").glob("*.json")}
    argv = ["--size", "smoke", "--tasks", *tasks[:2], "--task-file", tasks[2], "--restore-from", str(results)]
    for name, experts_kept in (("elsewhere", True), ("other-experts", False)):
        cache = tmp_path / name
        cache.mkdir()
        (cache / "base-tiny").symlink_to(folder.parent / "base-tiny")
        shutil.copytree(folder / "experts", cache / folder.name / "experts")
        if not experts_kept:
            weights = next((cache / folder.name / "experts").glob("1-*")) / "adapter_model.safetensors"
            tensors = load_file(weights)
            save_file({key: value + 1 for key, value in tensors.items()}, weights)
        monkeypatch.setattr(run, "BENCH_CACHE", cache)
        if experts_kept:
            assert main([*argv, "--rows", "expert"]) == 0  # every row is in the file: none is scored
            restored = {path.name: json.loads(path.read_text()) for path in (cache / folder.name / "rows").glob("*")}
            assert restored == scored
        else:
            capsys.readouterr()
            with pytest.raises(SystemExit):
                main(argv)
            assert "(1-clock_time differ)" in capsys.readouterr().err
            assert not (cache / folder.name / "rows").exists()


@pytest.mark.slow  # every row of the plan at tiny budgets: minutes on 2 shared cores
def test_smoke_size_runs_every_row(tmp_path, monkeypatch, tiny_base):
    summary, _, _ = smoke(tmp_path, monkeypatch, tiny_base, None)
    methods = {row["method"] for row in summary["rows"].values()}
    assert {"base", "expert", "uniform merge", "Arrow", "X-LoRA", "LoRAHub", "joint", "multi-task LoRA"} <= methods
    assert {"static export, one LoRA for all tasks", "static export, one LoRA per task", "oracle"} <= methods
    assert {"LoRA-Mixer top-2 RSL", "LoRA-Mixer top-1 no RSL", "LoRA-Mixer 0 steps"} <= methods
    assert {"LoRA-Mixer top-2 RSL, task labels", "LoRA-Mixer top-2 RSL, best-expert labels"} <= methods


def test_full_size_counts_router_examples_per_task(tiny_base):
    """The few-shot rows see 5 and 20 examples of every task (LoRAHub's protocol), the ablations only all of them;
    routers taught labels (the task's, top-2 and top-1, or the best expert's) run at every count."""
    tasks = list(TASKS)
    splits = load_splits({}, tasks, "full", seed=0)
    ctx = Context(tiny_base, [tiny_base] * len(tasks), load_tokenizer(tiny_base), SIZES["full"], splits, tiny_base)
    for count in (5, 20):
        drawn = Counter(sample["expert_id"] for sample in ctx.samples("router", count, seed=1))
        assert drawn == dict.fromkeys(range(len(tasks)), count)
    assert len(ctx.samples("router", None, seed=1)) == 100 * len(tasks)
    rows = plan(ctx, tasks)
    few_shot = {row.group for row in rows if row.router_examples in (5, 20)}
    assert "LoRA-Mixer top-2 RSL, Arrow init, 5 router examples per task" in few_shot
    for count in (5, 20):
        assert {
            f"LoRA-Mixer top-{k} RSL, {labels} labels, {count} router examples per task"
            for k, labels in ((2, "task"), (1, "task"), (2, "best-expert"))
        } <= few_shot
    assert {"PEFT X-LoRA, 20 router examples per task", "LoRAHub-style weights, 5 router examples per task"} <= few_shot
    assert not any("no RSL" in group or ("top-1" in group and "labels" not in group) for group in few_shot)
    groups = {row.group for row in rows}
    assert {
        "LoRA-Mixer top-1 no RSL, all router examples",
        "LoRA-Mixer top-2 RSL, best-expert labels, all router examples",
    } <= groups


def test_routing_share_counts_the_tokens_whose_top_1_is_the_tasks_own_expert_per_depth():
    """Routers fixed to expert 0 in the first layer and expert 1 below it: task 0's tokens meet their own expert in
    the first third of the layers only, task 1's in the other two."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.tasks.routing_share import own_expert_share
    from peft_lora_mixer import LoraMixerConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraMixerConfig(num_experts=2, top_k=1, r=2, target_modules=["q_proj", "v_proj"])
    )
    for name, module in model.named_modules():
        if name.endswith("loramixer_router.default"):
            torch.nn.init.zeros_(module.weight)
            module.bias.data = torch.tensor([5.0, 0.0] if ".layers.0." in name else [0.0, 5.0])
    batch = {"input_ids": torch.randint(0, 64, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    assert own_expert_share(model, [batch, batch]) == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    assert own_expert_share(model, [batch, batch], bands=1) == [[1 / 3], [2 / 3]]


def test_routing_share_names_a_mixer_the_cache_lacks_before_loading_anything(capsys):
    from benchmarks.tasks.routing_share import main as routing_share

    with pytest.raises(SystemExit):
        routing_share(["no-such-mixer"])
    assert "no saved mixer no-such-mixer" in capsys.readouterr().err
