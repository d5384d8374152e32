"""Static export: the mixture with its mean gates fixed, as one plain PEFT LoRA that loads without this package."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lora_experts import save_lora
from mixers import batch, reference_gates
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

from peft_lora_mixer import export_static_lora, export_static_lora_per_group, from_experts, mean_gates
from peft_lora_mixer.cli.commands import main
from peft_lora_mixer.layer import iter_mixer_layers

TEMPERATURE = 0.7
# experts of different ranks and alphas, one rsLoRA, each adapting different projections (so some are absent)
EXPERTS = [
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    dict(r=3, lora_alpha=3, target_modules=["v_proj", "o_proj"]),
]


@pytest.fixture(scope="module")
def expert_folders(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("experts")
    return [save_lora(root / f"expert{i}", seed=i, **kwargs) for i, kwargs in enumerate(EXPERTS)]


def make_mixer(expert_folders: list[str], routing: str = "hard_soft", top_k: int = 2) -> PeftModel:
    torch.manual_seed(0)  # the routers' initialisation
    model = from_experts(
        tiny_model("llama"), expert_folders, routing=routing, top_k=top_k, router_temperature=TEMPERATURE
    )
    return model.eval()


def calibration(seeds=(1, 2)) -> list[dict[str, torch.Tensor]]:
    """Padded batches (the first row of each left-padded by 2)."""
    return [{key: batch(seed)[key] for key in ("input_ids", "attention_mask")} for seed in seeds]


def reference_mean_gates(model: PeftModel, batches, routing: str, top_k: int) -> dict[str, torch.Tensor]:
    """The routers' gates written out from their weights and the projections' inputs, averaged over valid tokens."""
    layers = dict(iter_mixer_layers(model.get_base_model()))
    gates = {name: [] for name in layers}
    mask = None

    def keep(name, layer, args):
        router = layer.loramixer_router["default"]
        probs = torch.softmax((args[0] @ router.weight.T + router.bias) / TEMPERATURE, dim=-1)
        gates[name].append(reference_gates(probs, routing, top_k)[mask.bool()])

    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: keep(n, m, a)) for name, layer in layers.items()]
    with torch.no_grad():
        for inputs in batches:
            mask = inputs["attention_mask"]
            model(**inputs)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(values).mean(0) for name, values in gates.items()}


@pytest.mark.parametrize(("routing", "top_k"), [("hard_soft", 2), ("topk", 2), ("topk", 1), ("soft", 2)])
def test_mean_gates_are_the_applied_gates_over_valid_tokens(expert_folders, routing, top_k):
    model = make_mixer(expert_folders, routing, top_k)
    gates = mean_gates(model, calibration())
    expected = reference_mean_gates(model, calibration(), routing, top_k)
    assert gates.keys() == expected.keys() and len(gates) == 8  # q/k/v/o of two layers
    for name in gates:
        torch.testing.assert_close(gates[name], expected[name], rtol=0, atol=1e-6)
        switch = routing == "topk" and top_k == 1  # the kept expert weighs its probability: the gates sum below 1
        assert (gates[name].sum().item() < 1) if switch else gates[name].sum().item() == pytest.approx(1, abs=1e-6)
    unmasked = {key: value for key, value in calibration()[0].items() if key != "attention_mask"}
    with_padding = mean_gates(model, [unmasked])
    assert any(not torch.allclose(with_padding[name], mean_gates(model, calibration()[:1])[name]) for name in gates)


def test_export_equals_the_experts_weighted_by_the_gates(expert_folders, tmp_path):
    """Each projection's exported B A equals sum_e g_e s_e B_e A_e from the experts' own files (s_e from their
    configs: alpha / r, or alpha / sqrt(r) for rsLoRA), and PEFT's scaling of the export is 1."""
    model = make_mixer(expert_folders)
    gates = export_static_lora(model, calibration(), tmp_path / "static")
    config = json.loads((tmp_path / "static" / "adapter_config.json").read_text())
    exported = load_file(tmp_path / "static" / "adapter_model.safetensors")
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 2 + 4 + 3
    assert not config["use_rslora"] and not config["rank_pattern"] and not config["alpha_pattern"]
    sources = [load_file(Path(folder) / "adapter_model.safetensors") for folder in expert_folders]
    scalings = [e["lora_alpha"] / (math.sqrt(e["r"]) if e.get("use_rslora") else e["r"]) for e in EXPERTS]
    for name, gate in gates.items():
        prefix = f"base_model.model.{name}"
        delta = exported[f"{prefix}.lora_B.weight"] @ exported[f"{prefix}.lora_A.weight"]
        expected = sum(
            gate[e] * scalings[e] * (source[f"{prefix}.lora_B.weight"] @ source[f"{prefix}.lora_A.weight"])
            for e, source in enumerate(sources)
            if f"{prefix}.lora_A.weight" in source
        )
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
        assert exported[f"{prefix}.lora_A.weight"].shape[0] == 9  # padded with zero slots where experts are absent


def fix_gates(model: PeftModel, gates: dict[str, torch.Tensor]) -> None:
    """Make every router return `gates` whatever the token: soft routing over logits `T log g` (zero weight)."""
    model.set_routing(routing="soft")
    for name, layer in iter_mixer_layers(model.get_base_model()):
        router = layer.loramixer_router["default"]
        with torch.no_grad():
            router.weight.zero_()
            router.bias.copy_(TEMPERATURE * gates[name].log())


LOAD_PLAIN_PEFT = """
import sys
sys.modules["peft_lora_mixer"] = None  # any import of this package fails: plain PEFT only
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, static, inputs, expected = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), static).eval()
with torch.no_grad():
    logits = model(**torch.load(inputs)).logits
difference = (logits - torch.load(expected)).abs().max().item()
print(type(model.base_model).__name__, difference)
assert difference < 1e-5
"""


def test_export_loads_in_plain_peft_and_equals_the_mixer_with_fixed_gates(expert_folders, tmp_path):
    model = make_mixer(expert_folders)
    gates = export_static_lora(model, calibration(), tmp_path / "static")
    inputs = calibration(seeds=(5,))[0]
    with torch.no_grad():
        routed = model(**inputs).logits
        fix_gates(model, gates)
        fixed = model(**inputs).logits
    assert (routed - fixed).abs().max() > 1e-3  # the fixed gates differ from token routing
    for name, layer in iter_mixer_layers(model.get_base_model()):  # the routers now give exactly the mean gates
        tokens = torch.randn(5, layer.in_features)
        torch.testing.assert_close(layer.router_probs(tokens, "default"), gates[name].expand(5, -1), rtol=0, atol=1e-6)

    tiny_model("llama").save_pretrained(tmp_path / "base")
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(fixed, tmp_path / "expected.pt")
    env = {**os.environ, "PEFT_LORA_MIXER_AUTOREGISTER": "0", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    paths = [str(tmp_path / name) for name in ("base", "static", "inputs.pt", "expected.pt")]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_PLAIN_PEFT), *paths], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    tuner, difference = result.stdout.split()
    print(f"static export against the mixer with fixed gates: max |logit difference| {float(difference):.2e}")
    assert tuner == "LoraModel"


def test_one_export_per_group(expert_folders, tmp_path):
    model = make_mixer(expert_folders)
    groups = {"low": calibration(seeds=(1,)), "high": calibration(seeds=(2,))}
    gates = export_static_lora_per_group(model, groups, tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["high", "low"]
    for group, batches in groups.items():
        for name, gate in mean_gates(model, batches).items():
            torch.testing.assert_close(gates[group][name], gate, rtol=0, atol=0)
        assert (tmp_path / "out" / group / "adapter_model.safetensors").exists()
    assert any(not torch.equal(gates["low"][name], gates["high"][name]) for name in gates["low"])


def test_mean_gates_follow_the_active_adapter_only(expert_folders):
    model = make_mixer(expert_folders)
    model.add_adapter("second", model.peft_config["default"])
    with pytest.raises(ValueError, match="No adapter named 'missing'"):
        mean_gates(model, calibration(), adapter_name="missing")
    with pytest.raises(ValueError, match=r"only active adapter.*set_adapter\('second'\)"):
        mean_gates(model, calibration(), adapter_name="second")
    model.set_adapter("second")
    assert mean_gates(model, calibration()).keys() == mean_gates(model, calibration(), adapter_name="second").keys()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda model, out: export_static_lora(model, [], out), "gave no tokens"),
        (
            lambda model, out: export_static_lora(
                model, [{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.zeros(1, 3)}], out
            ),
            "gave no tokens",
        ),
        (lambda model, out: export_static_lora(model, calibration(), out, adapter_name="nope"), "No adapter named"),
        (lambda model, out: export_static_lora_per_group(model, {}, out), "No calibration groups"),
        (lambda model, out: export_static_lora_per_group(model, {"../up": calibration()}, out), "cannot name"),
        (lambda model, out: export_static_lora_per_group(model, {"a": calibration(), "b": []}, out), "gave no tokens"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(expert_folders, tmp_path, call, message):
    model = make_mixer(expert_folders)
    with pytest.raises(ValueError, match=message):
        call(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_files_is_refused(expert_folders, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_static_lora(make_mixer(expert_folders), calibration(), tmp_path / "out")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]
    export_static_lora(make_mixer(expert_folders), calibration(), tmp_path / "empty")  # a new folder is fine


@pytest.mark.parametrize(("routing", "top_k"), [("hard_soft", 2), ("topk", 1), ("soft", 2)])
def test_recorded_gates_are_what_the_layers_apply(expert_folders, routing, top_k):
    """The forward's record of each router (what `mean_gates` and `inspect` read) is what its layer applied: the
    layer's output is its base output plus the experts' deltas weighted by the recorded gates, written out."""
    model = make_mixer(expert_folders, routing, top_k)
    seen = {}

    def keep(name, args, output):
        seen[name] = (args[0], output)  # returning None leaves the output as it is

    hooks = [
        layer.register_forward_hook(lambda m, args, out, n=name: keep(n, args, out))
        for name, layer in iter_mixer_layers(model.get_base_model())
    ]
    with torch.no_grad(), model.base_model.recording_gates() as records:
        model(input_ids=calibration()[0]["input_ids"])
    for hook in hooks:
        hook.remove()
    assert records.keys() == seen.keys()
    for name, layer in iter_mixer_layers(model.get_base_model()):
        (record,) = records[name]
        x, output = seen[name]
        x = x.reshape(-1, layer.in_features)
        A, B = layer.loramixer_A["default"], layer.loramixer_B["default"]
        slot = layer.loramixer_slot_expert["default"]
        scaling = layer.loramixer_expert_scaling["default"]
        expected = layer.base_layer(x) + ((x @ A.T) * (record.gates * scaling)[:, slot]) @ B.T
        torch.testing.assert_close(output.reshape(expected.shape), expected, rtol=0, atol=1e-6)


def test_export_command_writes_what_the_function_writes(expert_folders, tmp_path):
    """`lora-mixer export --static` (one text per batch), whole and per group, against `export_static_lora`."""
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    make_mixer(expert_folders).save_pretrained(tmp_path / "mixer")
    texts = {"low": ["w1 w2 w3 w4", "w5 w6"], "high": ["w90 w91 w92", "w100 w101 w102 w103 w104"]}
    records = [{"text": text, "task": task} for task, group in texts.items() for text in group]
    (tmp_path / "calibration.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    paths = ["--base", str(tmp_path / "base"), "--mixer", str(tmp_path / "mixer"), "--data"]
    assert (
        main(["export", "--static", *paths, str(tmp_path / "calibration.jsonl"), "--output", str(tmp_path / "all")])
        == 0
    )
    assert main(["export", "--static", *paths, str(tmp_path / "calibration.jsonl"), "--group-field", "task",
                 "--output", str(tmp_path / "tasks")]) == 0  # fmt: skip

    def encoded(group):
        ids = [torch.tensor([tiny_tokenizer()(text)["input_ids"]]) for text in group]
        return [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]

    model = make_mixer(expert_folders)
    export_static_lora(model, encoded(texts["low"] + texts["high"]), tmp_path / "expected" / "all")
    groups = {task: encoded(group) for task, group in texts.items()}
    export_static_lora_per_group(model, groups, tmp_path / "expected" / "tasks")
    for written in ("all", "tasks/low", "tasks/high"):
        expected = tmp_path / "expected" / written
        actual = load_file(tmp_path / written / "adapter_model.safetensors")
        for key, value in load_file(expected / "adapter_model.safetensors").items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0)


def test_export_command_refuses_a_static_export_without_text(tmp_path, capsys):
    code = main(["export", "--static", "--base", "b", "--mixer", "m", "--output", str(tmp_path / "out")])
    assert code == 2 and "--static needs --data" in capsys.readouterr().err


def route_every_token_to(model: PeftModel, expert: int) -> PeftModel:
    """Routers that send every token to `expert` (a zero weight and a bias that only it wins)."""
    with torch.no_grad():
        for _, layer in iter_mixer_layers(model.get_base_model()):
            router = layer.loramixer_router["default"]
            router.weight.zero_()
            router.bias.copy_(torch.nn.functional.one_hot(torch.tensor(expert), router.bias.numel()) * 10.0)
    return model


def test_export_command_writes_a_card_sorted_targets_and_prints_the_gates(expert_folders, tmp_path, capsys):
    """Every token goes to expert2, which adapts v/o only: on q/k that is no change, and the card, the printed
    table and the sorted, condensed targets say so."""
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    route_every_token_to(make_mixer(expert_folders, top_k=1), 2).save_pretrained(tmp_path / "mixer")
    (tmp_path / "calibration.jsonl").write_text(json.dumps({"text": "w1 w2 w3"}))
    capsys.readouterr()
    assert main(["export", "--static", "--base", str(tmp_path / "base"), "--mixer", str(tmp_path / "mixer"),
                 "--data", str(tmp_path / "calibration.jsonl"), "--output", str(tmp_path / "static")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    config = json.loads((tmp_path / "static" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # not 8 full names, unordered
    table = [
        "| expert | all | k_proj | o_proj | q_proj | v_proj |",
        "|---|---|---|---|---|---|",
        "| expert0 | 0.000 | - | - | 0.000 | 0.000 |",
        "| expert1 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |",
        "| expert2 | 0.500 | - | 1.000 | - | 1.000 |",
        "| no change | 0.500 | 1.000 | 0.000 | 1.000 | 0.000 |",
    ]
    assert "\n".join(table) in out
    card = (tmp_path / "static" / "README.md").read_text()
    assert "\n".join(table) in card
    assert f"the LoRA-Mixer adapter `{tmp_path / 'mixer'}`" in card and "**no longer routed per token**" in card
    assert all(f"`{Path(folder).name}`: `{folder}`" in card for folder in expert_folders)
    assert card.startswith("---\n") and "library_name: peft" in card


def test_static_targets_name_only_the_adapted_modules(tmp_path):
    """Experts on q_proj of layer 1 only and on v_proj everywhere: the condensed targets pick exactly those
    modules in a plain base model (PEFT's own suffix matching), no more."""
    folders = [
        save_lora(tmp_path / "q1", seed=0, r=2, target_modules=["q_proj"], layers_to_transform=[1]),
        save_lora(tmp_path / "v", seed=1, r=2, target_modules=["v_proj"]),
    ]
    model = from_experts(tiny_model("llama"), folders).eval()
    export_static_lora(model, calibration(), tmp_path / "static")
    config = json.loads((tmp_path / "static" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["1.self_attn.q_proj", "v_proj"]
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "static")
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in loaded.named_modules()
        if hasattr(module, "lora_A") and name
    }
    assert adapted == {name for name, _ in iter_mixer_layers(model.get_base_model())}
