"""The BIG-bench benchmark (`python -m benchmarks.bigbench`): data, splits, lm-eval tasks, scoring, statistics, and
the whole pipeline at the smoke size, all on the committed slice (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from benchmarks.bigbench import data, run
from benchmarks.bigbench.__main__ import TASKS, main
from benchmarks.bigbench.claims import claim
from benchmarks.bigbench.lm_eval_tasks import lm_eval_name, write_tasks
from benchmarks.bigbench.models import load_base, load_tokenizer, prepare_base
from benchmarks.bigbench.scoring import evaluate_mixer, score, task_manager
from benchmarks.bigbench.splits import SPLITS, SplitSizes, read_manifest, split_task
from benchmarks.bigbench.stats import interval, macro, paired_difference
from peft_lora_mixer import from_experts


def slice_task(name: str) -> dict:
    return json.loads(data.resolve(data.SLICE, name).read_text())


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="git clone --depth 1 https://github.com/google/BIG-bench"):
        data.task_files(["hyperbaton"], tmp_path / "nowhere")


def _tar(archive, files: dict[str, bytes]) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


def test_a_placeholder_sdist_without_task_data_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    _tar(tmp_path / "bigbench-0.0.1.tar.gz", {"bigbench-0.0.1/bigbench/api/task.py": b"# code, no tasks"})
    with pytest.raises(ValueError, match="holds no BIG-bench task data.*placeholder.*git clone"):
        data.task_files(["hyperbaton"], tmp_path)
    assert not any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


def test_a_checkout_and_an_sdist_give_the_slice_s_examples(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    names = ["hyperbaton", "linguistic_mappings:plural"]
    checkout = tmp_path / "BIG-bench"
    shutil.copytree(data.SLICE, checkout / "bigbench" / data.TASKS_FOLDER)
    monkeypatch.setenv(data.DATA_ENV, str(checkout))
    assert data.task_files(names) == checkout / "bigbench" / data.TASKS_FOLDER  # read in place, nothing extracted
    files = {
        f"bigbench-1.0.0/bigbench/{data.TASKS_FOLDER}/{path.relative_to(data.SLICE)}": path.read_bytes()
        for path in data.SLICE.rglob("task.json")
    }
    (tmp_path / "sdist").mkdir()
    _tar(tmp_path / "sdist" / "bigbench-1.0.0.tar.gz", files)
    extracted = data.task_files(names, tmp_path / "sdist")
    assert extracted.is_relative_to(tmp_path / "cache") and data.source_name(extracted) == "bigbench-1.0.0 sdist"
    for name in names:
        assert data.load_task(extracted, name, 0) == data.load_task(data.SLICE, name, 0)
    assert sorted(path.parent.name for path in extracted.rglob("task.json")) == ["hyperbaton", "plural_json"]
    with pytest.raises(ValueError, match="no task 'navigate'"):
        data.task_files(["navigate"], tmp_path / "sdist")


def test_examples_are_deduplicated_shuffled_with_a_seed_and_answers_are_lists(tmp_path):
    raw = slice_task("intent_recognition")
    first = raw["examples"][0]
    raw["examples"] = [first, dict(first), *raw["examples"][1:]]  # a duplicate input
    (tmp_path / "intent_recognition").mkdir()
    (tmp_path / "intent_recognition" / "task.json").write_text(json.dumps(raw))
    examples, duplicates = data.load_task(tmp_path, "intent_recognition", seed=0)
    assert duplicates == 1 and len(examples) == len(raw["examples"]) - 1
    for example, original in zip(examples, [first, *raw["examples"][2:]]):
        right = [k for k, v in original["target_scores"].items() if v == 1]
        assert example.answers == right and example.choices[example.label] == right[0]
        assert sorted(example.choices) == sorted(original["target_scores"])
        assert example.prompt.startswith("Predict the intent") and example.prompt.endswith("Intent:")
    orders = {tuple(e.choices) for e in examples}
    assert len(orders) > 1  # the options are not all in the file's order
    again, _ = data.load_task(tmp_path, "intent_recognition", seed=0)
    other, _ = data.load_task(tmp_path, "intent_recognition", seed=1)
    assert again == examples and [e.choices for e in other] != [e.choices for e in examples]
    counting = data.load_task(data.SLICE, "object_counting", 0)[0][0]
    assert counting.choices is None and len(counting.answers) == 2  # "three" and "3"


def test_subtasks_are_found_with_or_without_the_json_suffix():
    assert data.resolve(data.SLICE, "linguistic_mappings:plural") == data.resolve(
        data.SLICE, "linguistic_mappings:plural_json"
    )
    assert data.resolve(data.SLICE, "linguistic_mappings:no_such_subtask") is None


def test_committed_manifest_splits_are_disjoint_and_large_enough():
    manifest = read_manifest()
    assert list(manifest["tasks"]) == TASKS
    for task, entry in manifest["tasks"].items():
        ids = [set(entry[split]) for split in SPLITS]
        assert sum(map(len, ids)) == len(set().union(*ids)), task
        assert len(entry["heldout"]) >= 200 and len(entry["router"]) == 150 and len(entry["expert"]) >= 300
        assert entry["examples"] >= 500
        slice_ids = {e.id for e in data.load_task(data.SLICE, task, 0)[0]}
        assert slice_ids <= set(entry["heldout"]), task  # the committed slice is held-out data only


def test_splits_follow_the_manifest_and_refuse_ids_the_data_lacks():
    examples = data.load_task(data.SLICE, "hyperbaton", 0)[0]
    sizes = SplitSizes(heldout=4, router=4, expert=4)
    seeded = split_task("hyperbaton", examples, sizes, 0)
    assert seeded == split_task("hyperbaton", examples, sizes, 0) != split_task("hyperbaton", examples, sizes, 1)
    manifest = {"tasks": {"hyperbaton": {s: [e.id for e in examples[i : i + 2]] for i, s in enumerate(SPLITS)}}}
    assert split_task("hyperbaton", examples, sizes, 0, manifest)["router"] == examples[1:3]
    manifest["tasks"]["hyperbaton"]["heldout"] = ["0" * 16]
    with pytest.raises(ValueError, match="that the data lacks"):
        split_task("hyperbaton", examples, sizes, 0, manifest)


def test_paired_bootstrap():
    tasks = {t: {str(i): float(i % 2) for i in range(40)} for t in ("a", "b")}
    better = {t: {i: 1.0 for i in values} for t, values in tasks.items()}
    assert macro(tasks) == 0.5 and macro(better) == 1.0
    low, high = interval(tasks)
    assert low < 0.5 < high
    assert paired_difference(tasks, tasks) == {"difference": 0.0, "low": 0.0, "high": 0.0}
    difference = paired_difference(better, tasks)
    assert difference["difference"] == 0.5 and 0.3 < difference["low"] <= 0.5 <= difference["high"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    prepare_base("tiny", folder, seed=0)
    return folder


def test_scores_per_example_agree_with_evaluate_mixer(tiny_base, tmp_path):
    """The benchmark's scorer and the package's `evaluate_mixer` give the same accuracy on the same local tasks."""
    tasks = ["hyperbaton", "arithmetic:2_digit_addition"]
    heldout = {task: data.load_task(data.SLICE, task, 0)[0][:4] for task in tasks}
    names = write_tasks(tmp_path / "tasks", heldout)
    assert str((tmp_path / "tasks").resolve()) in (tmp_path / "tasks" / f"{names[0]}.yaml").read_text()
    tokenizer = load_tokenizer(tiny_base)
    experts = []
    for i in range(2):
        torch.manual_seed(i)
        lora = get_peft_model(load_base(tiny_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.5)
        lora.save_pretrained(tmp_path / f"e{i}")
        experts.append(str(tmp_path / f"e{i}"))
    model = from_experts(load_base(tiny_base), experts, top_k=1)
    per_example, routing = score(model, tokenizer, names, tmp_path / "tasks", batch_size=1)
    reference = evaluate_mixer(model, tokenizer, names, manager=task_manager(names, tmp_path / "tasks"))
    for name, result in zip(names, reference):
        metric = next(v for k, v in result.scores[name].items() if k.split(",")[0] in ("acc", "exact_match"))
        assert sorted(per_example[name]) == sorted(e.id for e in heldout[tasks[names.index(name)]])
        assert sum(per_example[name].values()) / len(per_example[name]) == pytest.approx(metric)
        assert routing[name]["routing/entropy"] == pytest.approx(result.routing["routing/entropy"], rel=1e-5)


@pytest.mark.slow  # every row of the benchmark, tiny budgets: about 3 minutes on 2 shared cores
def test_smoke_size_runs_every_row_and_resumes_from_its_cache(tmp_path, monkeypatch, tiny_base):
    monkeypatch.setattr(run, "BENCH_CACHE", tmp_path)
    (tmp_path / "base-tiny").symlink_to(tiny_base)
    assert main(["--size", "smoke"]) == 0
    folder = run.run_folder("smoke", TASKS)
    summary = json.loads((folder / "results.json").read_text())
    rows = summary["rows"]
    methods = {row["method"] for row in rows.values()}
    assert {"base", "expert", "uniform merge", "Arrow", "X-LoRA", "LoRAHub", "joint", "multi-task LoRA"} <= methods
    assert {"static export, one LoRA for all tasks", "static export, one LoRA per task"} <= methods
    assert {"LoRA-Mixer top-2 RSL", "LoRA-Mixer top-1 no RSL", "LoRA-Mixer 0 steps", "oracle"} <= methods
    assert len(summary["expert_matrix"]) == len(TASKS)
    heldout = {task: {e.id for e in run.load_splits(TASKS, "smoke", 0)[task]["heldout"]} for task in TASKS}
    for path in (folder / "rows").glob("*.json"):
        scores = json.loads(path.read_text())["scores"]
        assert {task: set(values) for task, values in scores.items()} == heldout, path.name
        assert all(v in (0.0, 1.0) for values in scores.values() for v in values.values())
    experts = [json.loads((folder / "rows" / f"expert-{i}.json").read_text())["scores"] for i in range(len(TASKS))]
    for task in TASKS:
        right = [max(expert[task][key] for expert in experts) for key in heldout[task]]
        assert rows["best expert per example"]["per_task"][task] == pytest.approx(sum(right) / len(right))
    assert summary["paired_vs_best_mixer"]["best"].startswith("LoRA-Mixer")
    assert (folder / "lm-eval-tasks" / f"{lm_eval_name(TASKS[0])}.jsonl").is_file()
    table = (folder / "results.md").read_text()
    assert all(f"| {group} |" in table for group in rows)
    assert f"| {summary['paired_vs_best_mixer']['best']} minus |" in table

    def no_scoring(*args, **kwargs):
        raise AssertionError("a rerun scored a row again instead of reading its cache")

    monkeypatch.setattr(run, "score", no_scoring)
    assert main(["--size", "smoke"]) == 0
    # a run of some rows summarises every row in the cache, not only those it was asked for
    assert main(["--size", "smoke", "--rows", "base", "uniform"]) == 0
    assert json.loads((folder / "results.json").read_text())["rows"].keys() == rows.keys()


def heterogeneous_experts(base_folder, folder) -> list:
    """Three LoRAs of different ranks, scalings and target sets (one rsLoRA), with random B so their deltas differ."""
    layouts = [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {"r": 2, "lora_alpha": 16, "target_modules": ["o_proj", "up_proj", "down_proj"]},
        {"r": 6, "lora_alpha": 6, "target_modules": ["k_proj", "gate_proj"], "use_rslora": True},
    ]
    folders = []
    for i, layout in enumerate(layouts):
        torch.manual_seed(i)
        lora = get_peft_model(load_base(base_folder), LoraConfig(**layout))
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.2)
        lora.save_pretrained(folder / f"e{i}")
        folders.append(folder / f"e{i}")
    return folders


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=torch.arange(3, 19).view(2, 8)).logits


def test_arrow_experts_are_padded_exactly_and_weighted_sums_equal_the_merge(tiny_base, tmp_path):
    from benchmarks.bigbench import methods
    from benchmarks.bigbench.sizes import SIZES

    experts = heterogeneous_experts(tiny_base, tmp_path)
    ctx = methods.Context(tiny_base, experts, None, SIZES["smoke"], {}, tmp_path / "cache")
    for original, padded in zip(experts, methods.padded_experts(ctx)):
        config = json.loads((padded / "adapter_config.json").read_text())
        assert config["r"] == 6 and sorted(config["target_modules"]) == ctx.union_targets()
        expected = logits(methods.PeftModel.from_pretrained(load_base(tiny_base), original))
        assert not torch.allclose(expected, logits(load_base(tiny_base)), atol=1e-3)
        assert torch.allclose(
            logits(methods.PeftModel.from_pretrained(load_base(tiny_base), padded)), expected, atol=1e-5
        )
    weights = [0.7, -0.4, 1.2]
    model, set_weights = methods.weighted_sum(ctx)
    set_weights(weights)
    assert torch.allclose(logits(model), logits(methods.weighted_merge(ctx, weights)), atol=1e-5)


def test_lorahub_fit_moves_every_weight_and_lowers_the_loss(monkeypatch):
    """LoRAHub's small budget of loss evaluations must reach every expert's weight (a coordinate search spent it on
    the first two). The router loss is replaced by a known bowl, so the check does not hang on how much a random
    tiny model's nearly flat logits react to its experts."""
    from benchmarks.bigbench import methods
    from benchmarks.bigbench.sizes import SIZES

    best = np.array([0.7, -0.4, 1.2, 0.5, -0.9, 0.3])  # 6 experts, as in the benchmark
    current = {}
    monkeypatch.setattr(methods, "weighted_sum", lambda ctx: (torch.nn.Identity(), lambda w: current.update(w=w)))
    monkeypatch.setattr(methods, "mean_loss", lambda *args: float(((np.asarray(current["w"]) - best) ** 2).sum()))
    ctx = methods.Context(None, [None] * len(best), None, SIZES["full"], {}, None)  # LoRAHub's 40 evaluations
    ctx.samples = lambda split, count, seed: []
    weights = np.array(methods.lorahub_weights(ctx, None, 0))

    def objective(point):
        return ((point - best) ** 2).sum() + methods.LORAHUB_L1 * np.abs(point).sum()

    assert len(weights) == len(best) and np.all(np.abs(weights) > 0.05)
    assert objective(weights) < 0.25 * objective(np.zeros(len(best)))


def test_few_shot_pairs_each_mixer_row_with_the_peers_of_its_own_count(tmp_path):
    """The few-shot bars: a trained LoRA-Mixer row is paired with LoRAHub and X-LoRA fitted on as many router
    examples as it saw, and with Arrow; never with a peer of another count."""
    from benchmarks.bigbench.plan import ARROW, Row
    from benchmarks.bigbench.report import markdown, summarize

    rng = np.random.default_rng(0)

    def scores(accuracy: float) -> dict:
        return {task: {f"{task}-{i}": float(rng.random() < accuracy) for i in range(40)} for task in ("a", "b")}

    rows = {
        Row("m5", "LoRA-Mixer top-2 RSL, 5", "LoRA-Mixer top-2 RSL", None, 5, 0): scores(0.7),
        Row("mall", "LoRA-Mixer top-2 RSL, all", "LoRA-Mixer top-2 RSL", None, None, 0): scores(0.8),
        Row("h5", "LoRAHub, 5", "LoRAHub", None, 5): scores(0.5),
        Row("x5", "X-LoRA, 5", "X-LoRA", None, 5, 0): scores(0.4),
        Row("xall", "X-LoRA, all", "X-LoRA", None, None, 0): scores(0.6),
        Row("arrow", ARROW, "Arrow", None): scores(0.3),
    }
    results = {row: {"scores": value} for row, value in rows.items()}
    summary = summarize(results, ["a", "b"], "test", tmp_path, 100)
    few_shot = summary["few_shot"]
    assert set(few_shot) == {"5", "all"}
    assert set(few_shot["5"]["LoRA-Mixer top-2 RSL, 5"]) == {"LoRAHub, 5", "X-LoRA, 5", ARROW}
    assert set(few_shot["all"]["LoRA-Mixer top-2 RSL, all"]) == {"X-LoRA, all", ARROW}
    by_group = {row.group: value for row, value in rows.items()}
    expected = paired_difference(by_group["LoRA-Mixer top-2 RSL, 5"], by_group["LoRAHub, 5"])
    assert few_shot["5"]["LoRA-Mixer top-2 RSL, 5"]["LoRAHub, 5"] == expected
    assert expected["difference"] == pytest.approx(
        macro(by_group["LoRA-Mixer top-2 RSL, 5"]) - macro(by_group["LoRAHub, 5"])
    )
    assert "| LoRA-Mixer top-2 RSL, 5 | LoRAHub, 5 |" in markdown(summary)


def test_rsl_rows_are_paired_with_their_twins_without_it(tmp_path):
    """The RSL's effect: a row with the RSL minus its twin without it at the same top-k and router examples; a row
    with no twin (another count, or labels) is left out."""
    from benchmarks.bigbench.plan import Row
    from benchmarks.bigbench.report import markdown, summarize

    rng = np.random.default_rng(1)

    def scores(accuracy: float) -> dict:
        return {task: {f"{task}-{i}": float(rng.random() < accuracy) for i in range(40)} for task in ("a", "b")}

    rows = {
        Row("k2", "k2 RSL all", "LoRA-Mixer top-2 RSL", None, None, 0): scores(0.8),
        Row("k2n", "k2 no RSL all", "LoRA-Mixer top-2 no RSL", None, None, 0): scores(0.6),
        Row("k1", "k1 RSL all", "LoRA-Mixer top-1 RSL", None, None, 0): scores(0.5),
        Row("k1n", "k1 no RSL all", "LoRA-Mixer top-1 no RSL", None, None, 0): scores(0.7),
        Row("k2-5", "k2 RSL 5", "LoRA-Mixer top-2 RSL", None, 5, 0): scores(0.4),
        Row("k2l", "k2 RSL labels all", "LoRA-Mixer top-2 RSL, task labels", None, None, 0): scores(0.9),
    }
    results = {row: {"scores": value} for row, value in rows.items()}
    summary = summarize(results, ["a", "b"], "test", tmp_path, 100)
    effect = summary["rsl_minus_no_rsl"]
    assert set(effect) == {"k2 RSL all", "k1 RSL all"}
    by_group = {row.group: value for row, value in rows.items()}
    assert effect["k1 RSL all"] == paired_difference(by_group["k1 RSL all"], by_group["k1 no RSL all"])
    assert effect["k2 RSL all"]["difference"] == pytest.approx(
        macro(by_group["k2 RSL all"]) - macro(by_group["k2 no RSL all"])
    )
    assert f"| k2 RSL all | {effect['k2 RSL all']['difference']:+.3f} |" in markdown(summary)


def test_a_claim_is_exclusive_released_and_taken_over_only_from_a_dead_run(tmp_path):
    path = tmp_path / "rows" / "row.claim"
    with claim(path) as mine:
        assert mine and path.read_text() == f"{socket.gethostname()} {os.getpid()}"
        with claim(path) as again:  # held by a live run (this one)
            assert not again
        assert path.exists()  # the refused claim did not release the holder's
    assert not path.exists()
    with pytest.raises(RuntimeError), claim(path):
        raise RuntimeError("the row failed")
    assert not path.exists()  # released on an error too, so a rerun retries the row

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(f"{socket.gethostname()} {finished.stdout.strip()}")  # its run died
    with claim(path) as mine:
        assert mine
    path.write_text(f"another-machine {os.getpid()}")  # cannot be checked from here: left to its run
    with claim(path) as mine:
        assert not mine and path.read_text() == f"another-machine {os.getpid()}"


def test_an_expert_does_not_depend_on_what_its_process_did_before(tiny_base, tmp_path):
    """Byte-identical experts are what lets `--restore-from` carry rows to another run: the expert's LoRA init is
    seeded, so a run that trained other experts first (or drew other random numbers) makes the same weights."""
    from benchmarks.bigbench.experts import EXPERT_WEIGHTS, train_expert
    from benchmarks.bigbench.sizes import SIZES

    examples = data.load_task(data.SLICE, "hyperbaton", 0)[0][:4]
    weights = []
    for history in (0, 1000):
        torch.rand(history)
        folder = tmp_path / f"after-{history}"
        train_expert(load_base(tiny_base), 1, examples, folder, SIZES["smoke"], load_tokenizer(tiny_base), 0, print)
        weights.append((folder / EXPERT_WEIGHTS).read_bytes())
    assert weights[0] == weights[1]


def test_runs_sharing_a_cache_train_each_expert_once_and_take_over_a_dead_run(tmp_path):
    from benchmarks.bigbench.experts import EXPERT_WEIGHTS

    dirs = [tmp_path / "experts" / f"{i}-task" for i in range(3)]
    trained = []

    def train(index: int) -> None:
        if not (dirs[index] / EXPERT_WEIGHTS).is_file():
            trained.append(index)
            write_weights(index)

    def write_weights(index: int) -> None:
        dirs[index].mkdir(parents=True)
        (dirs[index] / EXPERT_WEIGHTS).write_text("weights")

    write_weights(0)  # trained before
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "experts" / "1-task.claim").write_text(f"{socket.gethostname()} {finished.stdout.strip()}")  # died
    (tmp_path / "experts" / "2-task.claim").write_text(f"{socket.gethostname()} {os.getppid()}")  # alive, training
    other_run = threading.Timer(0.3, write_weights, [2])
    other_run.start()
    run._train_experts(train, dirs, log=print, poll_seconds=0.05)
    other_run.join()
    assert trained == [1] and all((path / EXPERT_WEIGHTS).is_file() for path in dirs)
    assert not (tmp_path / "experts" / "1-task.claim").exists()
