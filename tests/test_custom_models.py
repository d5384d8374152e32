"""A model that is not a transformers model goes through train, save, load and push; other PEFT methods are untouched."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load as load_safetensors
from tiny_models import TINY_CONFIGS, VOCAB, tiny_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import PushToHubMixin

from peft_lora_mixer import LoraMixerConfig
from peft_lora_mixer.model_card import SECTION_START, section_markers

SRC = str(Path(__file__).parents[1] / "src")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def mixer(**config_kwargs) -> PeftModel:
    config = LoraMixerConfig(target_modules=["lin0", "lin1"], num_experts=3, r=2, top_k=2, **config_kwargs)
    return get_peft_model(MLP(), config)


def train(model: PeftModel, steps: int = 5) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs, targets = torch.randn(16, 8), torch.randn(16, 4)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_custom_model_trains_saves_loads(tmp_path):
    model = mixer()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".loramixer_router." in name for name in trainable) and any(
        ".loramixer_B." in name for name in trainable
    )
    losses = train(model)
    assert losses[-1] < losses[0]
    model.eval()
    inputs = torch.randn(5, 8)
    expected = model(inputs)

    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert SECTION_START in card.text and "the base model" in card.text and "base_model" not in card.data.to_dict()

    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path / "adapter"))
    torch.testing.assert_close(loaded(inputs), expected, rtol=0, atol=0)


def test_custom_model_pushes_a_loadable_adapter(server, tmp_path, monkeypatch):
    model = mixer(init_weights=False)
    inputs = torch.randn(5, 8)
    expected = model(inputs)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the in-memory server answers
    model.push_to_hub("me/custom", token="hf_test")
    assert server.unexpected == []
    (uploaded,) = server.commits["me/custom"]
    assert set(uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "peft" and "lora-mixer" in card.data.tags and '"me/custom"' in card.text

    assert len(load_safetensors(uploaded["adapter_model.safetensors"])) == 2 * 4  # A, B, router weight and bias
    (tmp_path / "pulled").mkdir()
    for name, content in uploaded.items():
        (tmp_path / "pulled" / name).write_bytes(content)
    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path / "pulled"))
    torch.testing.assert_close(loaded(inputs), expected, rtol=0, atol=0)


def test_saved_model_still_pickles_and_copies(tmp_path):
    model = mixer(init_weights=False)
    model.save_pretrained(tmp_path)  # gives the model its upload step
    inputs = torch.randn(3, 8)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(clone(inputs), model(inputs), rtol=0, atol=0)
        assert clone._upload_modified_files.args == (clone,)  # pushes the clone, not the original


def test_each_named_adapter_gets_its_own_card_section(tmp_path):
    model = mixer()
    model.add_adapter("second", LoraMixerConfig(target_modules=["lin1"], num_experts=2, r=4))
    model.save_pretrained(tmp_path / "both")
    text = (tmp_path / "both" / "README.md").read_text()
    for name in ("default", "second"):
        start, end = section_markers(name)
        assert text.count(start) == text.count(end) == 1
    assert "## LoRA-Mixer (adapter `second`)" in text and "mixture of 2 LoRA experts" in text
    assert json.loads((tmp_path / "both" / "second" / "adapter_config.json").read_text())["num_experts"] == 2


def test_config_saved_alone_writes_no_card(tmp_path):
    LoraMixerConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_other_peft_methods_are_left_alone(tmp_path):
    lora = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    lora.save_pretrained(tmp_path / "lora")
    assert "_upload_modified_files" not in vars(lora)  # only a PeftModel holding our adapter gets our upload step
    assert PeftModel._upload_modified_files is PushToHubMixin._upload_modified_files
    assert "create_or_update_model_card" in vars(PeftModel)  # PEFT's own, not a wrapper of ours
    assert not hasattr(PeftModel.create_or_update_model_card, "__wrapped__")


_SAVE_PLAIN_LORA = """
import sys
{import_line}
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

assert ("peft_lora_mixer" in sys.modules) == {imported}
config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1)
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(init_lora_weights=False, r=2))
model.save_pretrained(sys.argv[1])
"""


def _save_plain_lora(folder: Path, with_package: bool) -> dict[str, bytes]:
    script = _SAVE_PLAIN_LORA.format(
        import_line="import peft_lora_mixer" if with_package else "", imported=with_package
    )
    # PEFT writes the target-module set in hash order, so both processes get the same hash seed
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "PEFT_LORA_MIXER_AUTOREGISTER": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
    }
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(folder)], env=env, check=True, capture_output=True
    )
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_plain_lora_saves_byte_identical_with_and_without_the_package(tmp_path):
    without = _save_plain_lora(tmp_path / "without", with_package=False)
    with_package = _save_plain_lora(tmp_path / "with", with_package=True)
    assert set(without) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert with_package == without


def test_loading_into_a_base_with_fewer_layers_names_the_dropped_modules(tmp_path):
    get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=2, r=2)).save_pretrained(tmp_path)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, **{**TINY_CONFIGS["llama"], "num_hidden_layers": 1})
    smaller = AutoModelForCausalLM.from_config(config)
    with pytest.warns(
        UserWarning, match=r"4 module\(s\) this model does not have.*model\.layers\.1\.self_attn\.q_proj"
    ):
        loaded = PeftModel.from_pretrained(smaller, str(tmp_path))
    assert sum(isinstance(module, BaseTunerLayer) for module in loaded.modules()) == 4  # layer 0 still loads


def test_model_card_module_imports_nothing_of_the_package():
    """The card is rendered from plain data, so the config can use it without an import cycle."""
    source = (Path(SRC) / "peft_lora_mixer" / "model_card.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports and not [line for line in imports if line.startswith("from .") or "peft_lora_mixer" in line]


# ---- several named adapters on a custom model, as PEFT's tuner tests exercise them ---------------------------------
def named_mixers(names: tuple[str, ...]) -> PeftModel:
    """An MLP with one random mixer per name (different targets, expert counts and ranks), the first one active."""
    shapes = [dict(target_modules=["lin0", "lin1"], num_experts=3, r=2), dict(target_modules=["lin1"], num_experts=2)]
    model = None
    for index, name in enumerate(names):
        torch.manual_seed(index + 1)
        config = LoraMixerConfig(init_weights=False, top_k=1, **shapes[index % 2])
        if model is None:
            model = get_peft_model(MLP(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def outputs_per_adapter(model: PeftModel, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = {}
    with torch.no_grad():
        for name in model.peft_config:
            model.set_adapter(name)
            outputs[name] = model(inputs)
    return outputs


INPUTS = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
SUBSTRING_NAMES = [("a", "a2"), ("a2", "a"), ("other", "other_x"), ("other_x", "other")]


def test_card_metadata_of_a_custom_model_names_no_base_model_as_peft_does(tmp_path):
    """PEFT names `base_model` only from a transformers config; a config's `base_model_name_or_path` is not one."""
    cards = {}
    for kind, config_class, kwargs in [("lora", LoraConfig, {}), ("mixer", LoraMixerConfig, {"num_experts": 2})]:
        model = get_peft_model(MLP(), config_class(target_modules=["lin0"], **kwargs))
        model.add_adapter("new_adapter", config_class(target_modules=["lin1"], base_model_name_or_path="MLP", **kwargs))
        model.save_pretrained(tmp_path / kind)
        cards[kind] = ModelCard.load(tmp_path / kind / "README.md")
    assert "base_model" not in cards["lora"].data.to_dict()
    assert "base_model" not in cards["mixer"].data.to_dict()
    assert cards["mixer"].data.library_name == "peft" and cards["mixer"].data.tags == ["lora-mixer"]
    assert "on the base model" in cards["mixer"].text and "`MLP`" not in cards["mixer"].text
    saved = json.loads((tmp_path / "mixer" / "new_adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "MLP"  # the config keeps it; only the card's metadata leaves it out


def test_selected_adapters_save_and_load_alone(tmp_path):
    model = named_mixers(("default", "new_adapter"))
    expected = outputs_per_adapter(model, INPUTS)
    model.save_pretrained(tmp_path, selected_adapters=["new_adapter"])
    assert sorted(os.listdir(tmp_path)) == ["README.md", "new_adapter"]  # nothing of "default"
    text = (tmp_path / "README.md").read_text()
    assert text.count(section_markers("new_adapter")[0]) == 1 and SECTION_START not in text

    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path / "new_adapter"), adapter_name="new_adapter")
    assert list(loaded.peft_config) == ["new_adapter"]
    torch.testing.assert_close(loaded(INPUTS), expected["new_adapter"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="invalid `selected_adapters`"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["missing"])


@pytest.mark.parametrize("names", SUBSTRING_NAMES)
def test_adapter_names_that_contain_each_other_save_and_load_apart(tmp_path, names):
    model = named_mixers(("default", *names))
    expected = outputs_per_adapter(model, INPUTS)
    assert not torch.equal(expected[names[0]], expected[names[1]])
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    for name in names:
        start, end = section_markers(name)
        assert text.count(start) == text.count(end) == 1
        saved = load_safetensors((tmp_path / name / "adapter_model.safetensors").read_bytes())
        assert saved and all(key.startswith("base_model.model.lin") for key in saved)

    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path))
    for name in names:
        loaded.load_adapter(str(tmp_path / name), adapter_name=name)
    assert outputs_per_adapter(loaded.eval(), INPUTS).keys() == expected.keys()
    for name, output in outputs_per_adapter(loaded, INPUTS).items():
        torch.testing.assert_close(output, expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("names", SUBSTRING_NAMES)
def test_deleting_an_adapter_leaves_one_whose_name_contains_it(names):
    kept, deleted = names
    model = named_mixers(("default", kept, deleted))
    expected = outputs_per_adapter(model, INPUTS)
    model.delete_adapter(deleted)
    assert set(model.peft_config) == {"default", kept}
    suffix = f".{deleted}"
    assert not [key for key in model.state_dict() if key.endswith(suffix) or f"{suffix}." in key]
    for name, output in outputs_per_adapter(model, INPUTS).items():
        torch.testing.assert_close(output, expected[name], rtol=0, atol=0)


def test_unload_returns_the_custom_model_unchanged():
    base_outputs = MLP()(INPUTS)
    model = named_mixers(("default", "other"))
    assert not torch.equal(model(INPUTS), base_outputs)
    unloaded = model.unload()
    assert isinstance(unloaded, MLP)
    assert [type(module) for module in unloaded.children()] == [nn.Linear, nn.Linear]
    assert not [name for name, _ in unloaded.named_parameters() if "loramixer" in name]
    torch.testing.assert_close(unloaded(INPUTS), base_outputs, rtol=0, atol=0)
