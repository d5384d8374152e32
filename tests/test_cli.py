"""The `lora-mixer` command: the demo end to end (reduced size), build / train-router / inspect, bad input."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import VOCAB, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from peft_lora_mixer.cli.commands import main
from peft_lora_mixer.cli.demo.run import format_table


@pytest.fixture
def base_dir(tmp_path):
    """A tiny Llama and a word-level tokenizer over its vocabulary, saved like a Hub model."""
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture
def expert_dirs(tmp_path, base_dir):
    folders = []
    for index, targets in enumerate([["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"]]):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=2 + index, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(tmp_path / f"expert{index}")
        folders.append(str(tmp_path / f"expert{index}"))
    return folders


def test_build_train_router_and_inspect(tmp_path, base_dir, expert_dirs, capsys):
    mixer_dir, trained_dir, data = tmp_path / "mixer", tmp_path / "trained", tmp_path / "data.jsonl"
    assert main(["build", "--base", str(base_dir), "--experts", *expert_dirs, "--output", str(mixer_dir),
                 "--top-k", "1"]) == 0
    data.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 120 + 2}" for j in range(12))})
                              for i in range(16)))
    before = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), mixer_dir)
    assert main(["train-router", "--base", str(base_dir), "--mixer", str(mixer_dir), "--data", str(data),
                 "--output", str(trained_dir), "--steps", "3", "--batch-size", "4", "--lr", "0.05"]) == 0
    after = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), trained_dir)
    changed = {name for (name, old), (_, new) in zip(before.named_parameters(), after.named_parameters())
               if not torch.equal(old, new)}
    assert changed and all("loramixer_router" in name for name in changed)

    capsys.readouterr()
    assert main(["inspect", "--base", str(base_dir), "--mixer", str(trained_dir), "--text", "w5 w9 w33"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "q_proj" in lines[0] and "'w33'" in lines[3]
    assert all(cell in {"0", "1"} for line in lines[1:] for cell in line.split()[1:])


def test_bad_arguments_give_clear_errors(tmp_path, base_dir, expert_dirs, capsys):
    assert main(["build", "--base", str(base_dir), "--experts", expert_dirs[0], str(tmp_path / "missing"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    main(["build", "--base", str(base_dir), "--experts", *expert_dirs, "--output", str(tmp_path / "mixer")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w3 w4"}\n{"prompt": "w5"}\n')
    assert main(["train-router", "--base", str(base_dir), "--mixer", str(tmp_path / "mixer"), "--data", str(bad),
                 "--output", str(tmp_path / "trained")]) == 2
    assert "bad.jsonl:2 has no string field 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--base", str(base_dir), "--experts", *expert_dirs, "--output", "x", "--routing", "dense"])


def test_demo_runs_end_to_end_with_every_row(tmp_path, capsys):
    assert main(["demo", "--size", "smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    expected_rows = {"base model", "uniform merge (add_weighted_adapter)", "multi-task LoRA (same size)",
                     "X-LoRA over the experts", "LoRA-Mixer plug-and-play, no RSL", "LoRA-Mixer plug-and-play, RSL",
                     "LoRA-Mixer joint (2 stages, RSL)"} | {f"expert {d} alone" for d in results["domains"]}
    assert set(results["accuracy"]) == expected_rows
    assert all(0.0 <= v <= 1.0 for row in results["accuracy"].values() for v in row.values())
    assert set(results["routing_accuracy"]) == {"LoRA-Mixer plug-and-play, no RSL", "LoRA-Mixer plug-and-play, RSL"}
    assert (tmp_path / "routing_heatmap.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert all(row in printed for row in expected_rows)


def test_table_reports_means_and_oracle_fraction():
    table = format_table({"a": {"x": 0.5, "y": 1.0}}, {"x": 1.0, "y": 1.0}).splitlines()
    assert table[1].split()[-2:] == ["0.750", "0.75"] and table[2].startswith("oracle")


@pytest.mark.slow
def test_full_demo_claims(tmp_path):
    """The README's claims about the full demo: plug-and-play reaches 95% of the per-domain oracle, beats the
    uniform merge, and RSL routes at least as well as no RSL."""
    from peft_lora_mixer.cli.demo.run import SIZES, run_demo

    results = run_demo(tmp_path, SIZES["full"], seed=0)
    accuracy, oracle = results["accuracy"], results["oracle"]
    plug_and_play = accuracy["LoRA-Mixer plug-and-play, RSL"]
    assert all(plug_and_play[d] >= 0.95 * oracle[d] for d in oracle), (plug_and_play, oracle)
    mean = sum(plug_and_play.values()) / len(oracle)
    merge = accuracy["uniform merge (add_weighted_adapter)"]
    assert mean > sum(merge.values()) / len(merge)
    routing = {name: sum(row.values()) / len(row) for name, row in results["routing_accuracy"].items()}
    assert routing["LoRA-Mixer plug-and-play, RSL"] >= routing["LoRA-Mixer plug-and-play, no RSL"]
