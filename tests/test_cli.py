"""The `lora-mixer` command: build / train-router / inspect, bad input."""

import argparse
import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_gguf import write_tiny_gguf
from tiny_models import VOCAB, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from peft_lora_mixer.cli.commands import main, parser
from peft_lora_mixer.layer import iter_mixer_layers


def word_tokenizer(**special_tokens) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: 'w2' ... 'w127', '<unk>' = 0, '<eos>' = 1."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", **special_tokens)


def train_router(base, mixer, data, output, *options: str) -> int:
    """`lora-mixer train-router` with its four required arguments and any options."""
    return main(
        [
            "train-router",
            "--base",
            str(base),
            "--mixer",
            str(mixer),
            "--data",
            str(data),
            "--output",
            str(output),
            *options,
        ]
    )


def save_base(folder, model_type: str, **special_tokens):
    """A tiny model and its word-level tokenizer, saved like a Hub model."""
    tiny_model(model_type).save_pretrained(folder)
    word_tokenizer(**special_tokens).save_pretrained(folder)
    return folder


def save_experts(tmp_path, base_dir, targets_per_expert, auto=AutoModelForCausalLM) -> list[str]:
    """One random PEFT LoRA per entry of `targets_per_expert` (ranks 2, 3, ...), saved under `tmp_path`."""
    folders = []
    for index, targets in enumerate(targets_per_expert):
        model = get_peft_model(
            auto.from_pretrained(base_dir), LoraConfig(r=2 + index, target_modules=targets, init_lora_weights=False)
        )
        model.save_pretrained(tmp_path / f"expert{index}")
        folders.append(str(tmp_path / f"expert{index}"))
    return folders


@pytest.fixture
def base_dir(tmp_path):
    """A tiny Llama and a word-level tokenizer over its vocabulary, saved like a Hub model."""
    return save_base(tmp_path / "base", "llama")


@pytest.fixture
def expert_dirs(tmp_path, base_dir):
    return save_experts(tmp_path, base_dir, [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"]])


@pytest.fixture
def mixer_dir(tmp_path, base_dir, expert_dirs):
    assert main(["build", "--base", str(base_dir), "--experts", *expert_dirs, "--output", str(tmp_path / "mixer")]) == 0
    return tmp_path / "mixer"


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(record) for record in records))
    return str(path)


def router_weights(folder, base_dir, auto=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(auto.from_pretrained(base_dir), folder)
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed_parameters(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_build_train_router_and_inspect(tmp_path, base_dir, expert_dirs, capsys):
    mixer_dir, trained_dir = tmp_path / "mixer", tmp_path / "trained"
    assert (
        main(["build", "--base", str(base_dir), "--experts", *expert_dirs, "--output", str(mixer_dir), "--top-k", "1"])
        == 0
    )
    data = write_jsonl(
        tmp_path / "data.jsonl", [{"text": " ".join(f"w{(i * 7 + j) % 120 + 2}" for j in range(12))} for i in range(16)]
    )
    before = router_weights(mixer_dir, base_dir)
    assert (
        train_router(base_dir, mixer_dir, data, trained_dir, "--steps", "3", "--batch-size", "4", "--lr", "0.05") == 0
    )
    changed = changed_parameters(before, router_weights(trained_dir, base_dir))
    assert changed and all("loramixer_router" in name for name in changed)
    assert sorted(path.name for path in trained_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    capsys.readouterr()
    assert main(["inspect", "--base", str(base_dir), "--mixer", str(trained_dir), "--text", "w5 w9 w33"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # 2 layers x 3 projections (q, k, v); columns: token, each expert (named after its folder), no change, top
    assert lines[0].startswith("expert mix over 6 projections")
    assert lines[1].split() == ["token", "expert0", "expert1", "no", "change", "top"]
    rows = [line.split(maxsplit=4) for line in lines[2:]]
    assert [row[0] for row in rows] == ["'w5'", "'w9'", "'w33'"]
    for row in rows:
        shares = [int(cell) for cell in row[1:4]]
        top = ["expert0", "expert1", "no change"][shares.index(max(shares))]
        assert 99 <= sum(shares) <= 101 and row[4] == top


def test_inspect_per_module_layers_and_heatmap(tmp_path, base_dir, mixer_dir, capsys):
    capsys.readouterr()
    heatmap = tmp_path / "mix.png"
    assert (
        main(
            [
                "inspect",
                "--base",
                str(base_dir),
                "--mixer",
                str(mixer_dir),
                "--text",
                "w5 w9",
                "--per-module",
                "--layers",
                "1",
                "--heatmap",
                str(heatmap),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    # full names past the common prefix 'model.layers.', not cut to their last 12 characters
    assert lines[1].split() == ["token", "1.self_attn.q_proj", "1.self_attn.k_proj", "1.self_attn.v_proj"]
    # the experts by name; on k_proj, where expert0 has no weights, routing to it shows as "-" (no change)
    assert all(cell in {"expert0", "expert1"} for line in lines[2:4] for cell in line.split()[1::2])
    assert all(cell in {"-", "expert1"} for line in lines[2:4] for cell in line.split()[2:3])
    assert heatmap.stat().st_size > 1000

    assert main(["inspect", "--base", str(base_dir), "--mixer", str(mixer_dir), "--text", "w5", "--layers", "7"]) == 2
    assert "No adapted projection in layers [7]; the mixer adapts layers [0, 1]" in capsys.readouterr().err


def test_inspect_shows_byte_level_tokens_as_text():
    from tokenizers import decoders
    from tokenizers.models import BPE
    from transformers import GPT2TokenizerFast

    from peft_lora_mixer.inspection import token_texts

    backend = Tokenizer(
        BPE({"a": 0, "d": 1, "Ġ": 2, "Ġa": 3, "dd": 4, "Ġadd": 5}, [("Ġ", "a"), ("d", "d"), ("Ġa", "dd")])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend)
    ids = tokenizer(" add").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["Ġadd"] and token_texts(tokenizer, ids) == ["' add'"]


def test_training_labels_keep_real_end_of_sequence_tokens(tmp_path):
    """The pad token is the EOS token (as in SmolLM2): padding is masked by position, the EOS labels stay."""
    from peft_lora_mixer.cli.data import read_records, tokenize_records, training_collator

    tokenizer = word_tokenizer(pad_token="<eos>")
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"text": "w5 w6 <eos>"}, {"text": "w7 <eos>"}])
    samples = tokenize_records(read_records(path), tokenizer, 16, encoder_decoder=False, path=path)
    batch = training_collator(tokenizer)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [7, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 1], [7, 1, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_train_router_on_an_encoder_decoder_in_bfloat16(tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    base_dir = save_base(tmp_path / "t5", "t5", pad_token="<unk>")
    experts = save_experts(tmp_path, base_dir, [["q", "v"], ["q", "k", "v"]], auto=AutoModelForSeq2SeqLM)
    mixer_dir, trained_dir = tmp_path / "mixer", tmp_path / "trained"
    assert main(["build", "--base", str(base_dir), "--experts", *experts, "--output", str(mixer_dir)]) == 0
    records = [{"text": f"w{i} w{i + 1} w{i + 2}", "target": f"w{i + 3} w{i + 4}"} for i in range(2, 30)]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    before = router_weights(mixer_dir, base_dir, AutoModelForSeq2SeqLM)
    assert (
        train_router(
            base_dir,
            mixer_dir,
            data,
            trained_dir,
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.05",
            "--dtype",
            "bfloat16",
        )
        == 0
    )
    after = router_weights(trained_dir, base_dir, AutoModelForSeq2SeqLM)
    changed = changed_parameters(before, after)
    assert any("encoder" in name for name in changed) and any("decoder" in name for name in changed)
    assert all("loramixer_router" in name for name in changed)

    data_without_targets = write_jsonl(tmp_path / "texts.jsonl", [{"text": "w3 w4"}])
    assert train_router(base_dir, mixer_dir, data_without_targets, tmp_path / "x") == 2
    assert "texts.jsonl:1 has no string field 'target'" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", "--base", str(base_dir), "--mixer", str(trained_dir), "--text", "w5 w9 w33"]) == 0
    # q, k, v of 2 encoder self-attentions, 2 decoder self-attentions and 2 cross-attentions
    assert capsys.readouterr().out.startswith("expert mix over 18 projections")


def test_bad_arguments_give_clear_errors(tmp_path, base_dir, expert_dirs, capsys):
    assert (
        main(
            [
                "build",
                "--base",
                str(base_dir),
                "--experts",
                expert_dirs[0],
                str(tmp_path / "missing"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["build", "--base", str(base_dir), "--experts", *expert_dirs, "--output", "x", "--routing", "dense"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "w3 w4"}\n{"prompt": "w5"}\n', "bad.jsonl:2 has no string field 'text'"),
        (b'{"text": "w3 w4"}\n{"text": ""}\n', "bad.jsonl:2 has an empty 'text'"),
        (b'{"text": "w3"}\n\n{"text": "w4 \xe9"}\n', "bad.jsonl:3 is not UTF-8 text (byte 0xe9 at column 14)"),
        (b'{"text": "w3"}\n{"text": \n', "bad.jsonl:2 is not valid JSON"),
        (b"\n\n", "bad.jsonl holds no samples"),
    ],
)
def test_train_router_refuses_bad_data_before_writing(tmp_path, base_dir, mixer_dir, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    output = tmp_path / "trained"
    assert train_router(base_dir, mixer_dir, bad, output) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_train_router_with_label_field_teaches_the_labelled_experts(tmp_path, base_dir, mixer_dir):
    """`--label-field`: each line's expert index reaches the routers as `router_labels` (null: no label); the
    same run without it trains other routers."""
    records = [
        {"text": " ".join(f"w{(i * 7 + j) % 120 + 2}" for j in range(12)), "task": i % 2 if i % 4 else None}
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    options = ("--steps", "3", "--batch-size", "4", "--lr", "0.05")
    assert train_router(base_dir, mixer_dir, data, tmp_path / "plain", *options, "--no-best-expert-labels") == 0
    assert train_router(base_dir, mixer_dir, data, tmp_path / "labelled", *options, "--label-field", "task") == 0
    changed = changed_parameters(
        router_weights(tmp_path / "plain", base_dir), router_weights(tmp_path / "labelled", base_dir)
    )
    assert changed and all("loramixer_router" in name for name in changed)


def test_train_router_with_best_expert_labels_labels_every_line_then_teaches_them(
    tmp_path, base_dir, mixer_dir, capsys
):
    """Best-expert labels, the default without --label-field: every line gets its lowest-loss expert, the counts are
    printed, and the routers train otherwise than with `--no-best-expert-labels`; the explicit flag trains the same
    routers as the default and cannot be combined with --label-field."""
    records = [{"text": " ".join(f"w{(i * 7 + j) % 120 + 2}" for j in range(12))} for i in range(16)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    options = ("--steps", "3", "--batch-size", "4", "--lr", "0.05")
    assert train_router(base_dir, mixer_dir, data, tmp_path / "plain", *options, "--no-best-expert-labels") == 0
    assert "best-expert labels" not in capsys.readouterr().out
    assert train_router(base_dir, mixer_dir, data, tmp_path / "default", *options) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("best-expert labels"))
    counts = dict(re.findall(r"(\d+): (\d+)", line))
    assert set(counts) <= {"0", "1"} and sum(map(int, counts.values())) == len(records)
    assert "--no-best-expert-labels trains without" in line
    default = router_weights(tmp_path / "default", base_dir)
    changed = changed_parameters(router_weights(tmp_path / "plain", base_dir), default)
    assert changed and all("loramixer_router" in name for name in changed)
    assert train_router(base_dir, mixer_dir, data, tmp_path / "explicit", *options, "--best-expert-labels") == 0
    assert not changed_parameters(default, router_weights(tmp_path / "explicit", base_dir))
    with pytest.raises(SystemExit):
        train_router(base_dir, mixer_dir, data, tmp_path / "x", "--best-expert-labels", "--label-field", "task")


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"text": "w3 w4", "task": 0}, {"text": "w5"}], "data.jsonl:2 has no 'task' field"),
        ([{"text": "w3 w4", "task": "0"}], "data.jsonl:1 has 'task' = '0'"),
        ([{"text": "w3 w4", "task": -1}], "data.jsonl:1 has 'task' = -1"),
        (
            [{"text": "w3 w4", "task": 1}, {"text": "w5", "task": 2}],
            "data.jsonl:2 labels expert 2, but the mixer has 2",
        ),
    ],
)
def test_bad_router_labels_are_refused_before_writing(tmp_path, base_dir, mixer_dir, capsys, records, message):
    data = write_jsonl(tmp_path / "data.jsonl", records)
    output = tmp_path / "trained"
    assert train_router(base_dir, mixer_dir, data, output, "--label-field", "task") == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("options", [("--label-field", "task"), ("--best-expert-labels",)])
def test_router_labels_need_a_label_weight(tmp_path, base_dir, mixer_dir, capsys, options):
    config = json.loads((mixer_dir / "adapter_config.json").read_text())
    (mixer_dir / "adapter_config.json").write_text(json.dumps({**config, "router_label_weight": 0.0}))
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "w3 w4", "task": 0}])
    assert train_router(base_dir, mixer_dir, data, tmp_path / "trained", *options) == 2
    assert f"{options[0]} was given, but the mixer's `router_label_weight` is 0" in capsys.readouterr().err
    assert not (tmp_path / "trained").exists()


def test_without_a_label_weight_the_default_trains_untaught(tmp_path, base_dir, mixer_dir, capsys):
    """A mixer saved with `router_label_weight` 0 cannot learn from labels, so the default finds none."""
    config = json.loads((mixer_dir / "adapter_config.json").read_text())
    (mixer_dir / "adapter_config.json").write_text(json.dumps({**config, "router_label_weight": 0.0}))
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "w3 w4 w5"}] * 4)
    assert train_router(base_dir, mixer_dir, data, tmp_path / "trained", "--steps", "1", "--batch-size", "2") == 0
    assert "best-expert labels" not in capsys.readouterr().out
    assert (tmp_path / "trained" / "adapter_config.json").exists()


def test_bad_lengths_and_empty_text_are_refused(tmp_path, base_dir, mixer_dir, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "w3 w4"}])
    output = tmp_path / "trained"
    for option in ("--max-length", "--steps", "--batch-size"):
        with pytest.raises(SystemExit):
            train_router(base_dir, mixer_dir, data, output, option, "0")
        assert "must be a positive integer, got 0" in capsys.readouterr().err
    assert not output.exists()
    for text in ("", "  "):
        assert main(["inspect", "--base", str(base_dir), "--mixer", str(mixer_dir), "--text", text]) == 2
        assert "--text is empty" in capsys.readouterr().err


def test_demo_is_not_a_subcommand(capsys):
    """The demo lives beside the package (`python -m demo`), so the installed command has no `demo`."""
    with pytest.raises(SystemExit):
        main(["demo"])
    assert "invalid choice: 'demo'" in capsys.readouterr().err


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(action for action in parser()._actions if action.choices and action.dest == "command").choices


@pytest.mark.parametrize("command", ["build", "train-router", "inspect", "eval", "export"])
def test_help_explains_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in subcommands()[command]._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        if not action.required and action.default is not None:
            assert f"(default: {action.default})" in text, f"{command} {action.option_strings} hides its default"
    if command == "train-router":
        for default in ("--steps STEPS optimizer steps", "(default: 200)", "(default: 0.001)", "(default: 8)"):
            assert default in text


def test_train_router_says_what_it_will_do_before_the_first_step(tmp_path, base_dir, mixer_dir, capsys, monkeypatch):
    from transformers import Trainer

    data = write_jsonl(tmp_path / "data.jsonl", [{"text": " ".join(f"w{j + 2}" for j in range(10))}] * 6)
    printed_before_training = []
    train = Trainer.train

    def record_then_train(self, *args, **kwargs):
        printed_before_training.append(capsys.readouterr().out)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", record_then_train)
    assert train_router(base_dir, mixer_dir, data, tmp_path / "trained", "--steps", "2", "--batch-size", "4") == 0
    routers = sum(
        layer.loramixer_router["default"].weight.numel() + layer.loramixer_router["default"].bias.numel()
        for _, layer in iter_mixer_layers(PeftModel.from_pretrained(tiny_model("llama"), mixer_dir))
    )
    assert (
        f"training {routers:,} router parameters on 6 examples of 10 tokens on average (at most 256 kept); "
        "2 steps of 4 examples, about 40 tokens per step (1.3 epochs)"
    ) in printed_before_training[0]


@pytest.fixture
def routed_mixer_dir(tmp_path, base_dir, expert_dirs):
    """The mixer over expert0 (q, v) and expert1 (q, k, v), top-1, with routers that send every token to expert0 on
    k_proj (where it has no weights: no change) and to expert1 on q_proj and v_proj."""
    from peft_lora_mixer import from_experts

    model = from_experts(AutoModelForCausalLM.from_pretrained(base_dir), expert_dirs, top_k=1)
    with torch.no_grad():
        for name, layer in iter_mixer_layers(model.get_base_model()):
            router = layer.loramixer_router["default"]
            router.weight.zero_()
            router.bias.copy_(torch.tensor([10.0, -10.0] if name.endswith("k_proj") else [-10.0, 10.0]))
    model.save_pretrained(tmp_path / "routed")
    return tmp_path / "routed"


def test_inspect_counts_an_expert_only_where_it_has_weights(base_dir, routed_mixer_dir, capsys):
    """expert0 wins every k_proj router, but has no weights there: that is no change, not expert0."""
    inspect = ["inspect", "--base", str(base_dir), "--mixer", str(routed_mixer_dir), "--text", "w5 w9"]
    capsys.readouterr()
    assert main(inspect) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["token", "expert0", "expert1", "no", "change", "top"]
    assert [line.split() for line in lines[2:]] == [[token, "0", "67", "33", "expert1"] for token in ("'w5'", "'w9'")]

    assert main([*inspect, "--per-module"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[1:4] == ["0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"]
    assert lines[2].split() == ["'w5'", "expert1", "-", "expert1", "expert1", "-", "expert1"]


def test_eval_report_names_the_experts():
    from peft_lora_mixer.integrations.lm_evaluation import TaskEvaluation, format_report

    result = TaskEvaluation("t", {"t": {"acc,none": 0.5}}, {"tokens": 10}, [0.25, 0.75])
    lines = format_report([result], ["licenses", "code"]).splitlines()
    assert lines[1].split()[-2:] == ["licenses", "code"] and lines[2].split()[-2:] == ["0.25", "0.75"]
    assert lines[0].strip() == "top-1 usage per expert"


def test_a_gguf_file_is_a_base(tmp_path, capsys):
    """`--base model.gguf`: the file's weights and tokenizer, loaded without GGUF's unsaveable quantiser, so a
    serving export writes the base model; build, train-router, inspect and the static export work from it too."""
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    experts = []
    for index, targets in enumerate([["q_proj", "v_proj"], ["k_proj"]]):
        torch.manual_seed(index)
        config = LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
        get_peft_model(tiny_model("llama"), config).save_pretrained(tmp_path / f"expert{index}")
        experts.append(str(tmp_path / f"expert{index}"))
    base_option = ["--base", str(gguf_file)]
    assert main(["build", *base_option, "--experts", *experts, "--output", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["inspect", *base_option, "--mixer", str(tmp_path / "m"), "--text", "hello world"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows[:3]] == ["'h'", "'e'", "'l'"]  # the file's own byte-level tokenizer
    assert (
        main(["export", "--serving", *base_option, "--mixer", str(tmp_path / "m"), "--output", str(tmp_path / "s")])
        == 0
    )

    served = AutoModelForCausalLM.from_pretrained(tmp_path / "s")  # the base with the mixer, from a plain folder
    ids = torch.tensor([[73, 70, 77, 77, 80]])
    expected = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "m")(ids).logits
    torch.testing.assert_close(served(ids).logits, expected, rtol=0, atol=1e-5)
    assert not hasattr(served.config, "quantization_config")

    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello world"}, {"text": "a bc de"}])
    assert train_router(gguf_file, tmp_path / "m", data, tmp_path / "t", "--steps", "1", "--batch-size", "2") == 0
    static = ["export", "--static", *base_option, "--mixer", str(tmp_path / "t"), "--data", data]
    assert main([*static, "--output", str(tmp_path / "static")]) == 0
    assert (tmp_path / "static" / "adapter_model.safetensors").is_file()

    assert main(["build", "--base", str(tmp_path / "missing.gguf"), "--experts", "x", "--output", "y"]) == 2
    assert f"GGUF file '{tmp_path / 'missing.gguf'}' does not exist" in capsys.readouterr().err
