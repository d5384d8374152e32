"""Installed, the package registers itself in programs that import only peft; never at start-up, and not when off."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mixers import save_base_and_mixer
from peft import get_peft_model
from safetensors.torch import load_file
from test_evaluation import TASKS, expected_results, write_tasks
from tiny_models import VOCAB, tiny_model

from peft_lora_mixer import LoraMixerConfig

ROOT = Path(__file__).parents[1]
PTH = "peft_lora_mixer_autoregister.pth"

# a program that never names peft_lora_mixer, as lm-eval-harness or a TRL script would load an adapter
LOAD_WITH_PEFT_ONLY = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, adapter, expected = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
with torch.no_grad():
    logits = model(input_ids=torch.arange(8)[None] % {vocab}).logits
torch.testing.assert_close(logits, torch.load(expected), rtol=0, atol=0)
print(type(model.base_model).__name__)
""".format(vocab=VOCAB)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> list[str]:
    """A base model, a mixer adapter over it and its logits, on disk: the arguments of LOAD_WITH_PEFT_ONLY."""
    root = tmp_path_factory.mktemp("saved")
    tiny_model("llama").save_pretrained(root / "base")
    model = get_peft_model(tiny_model("llama"), LoraMixerConfig(num_experts=3, r=2, init_weights=False))
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        torch.save(model(input_ids=torch.arange(8)[None] % VOCAB).logits, root / "expected.pt")
    return [str(root / "base"), str(root / "adapter"), str(root / "expected.pt")]


def run(
    code: str, *args: str, env: dict[str, str], python: str = sys.executable, python_options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`code` in a fresh `python`; with `SITE_DIR` in `env`, that folder is first read as a site-packages folder."""
    code = textwrap.dedent(code)
    if "SITE_DIR" in env:
        code = f"import os, site; site.addsitedir(os.environ['SITE_DIR'])\n{code}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([python, *python_options, "-c", code, *args], env=env, capture_output=True, text=True)


@pytest.fixture
def site_env(tmp_path) -> dict[str, str]:
    """The environment of a Python that reads our .pth as it reads site-packages at start-up (through `site`, from a
    folder named by `SITE_DIR`, see `run`), the package itself coming from this checkout."""
    shutil.copy(ROOT / "src" / PTH, tmp_path)
    return {"SITE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}


def test_loads_in_a_program_that_imports_only_peft(site_env, saved):
    result = run(LOAD_WITH_PEFT_ONLY, *saved, env=site_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "LoraMixerModel"


def test_environment_switch_turns_it_off(site_env, saved):
    result = run(LOAD_WITH_PEFT_ONLY, *saved, env={**site_env, "PEFT_LORA_MIXER_AUTOREGISTER": "0"})
    assert result.returncode != 0 and "KeyError: 'LORAMIXER'" in result.stderr


def test_start_up_imports_nothing(site_env):
    code = """
    import sys
    heavy = [name for name in sys.modules if name.split(".")[0] in ("peft", "peft_lora_mixer", "torch", "transformers",
             "peft_lora_mixer_autoregister")]  # not even our own module
    print(heavy, [type(finder).__name__ for finder in sys.meta_path].count("PeftLoraMixerAutoregister"))
    """
    assert run(code, env=site_env).stdout.split() == ["[]", "1"]


def test_lookups_before_the_import_leave_the_registration_in_place(site_env):
    """transformers' `is_peft_available()` looks peft up (`find_spec`) long before anything imports it."""
    code = """
    import importlib.util, sys
    finders = lambda: [type(f).__name__ for f in sys.meta_path].count("PeftLoraMixerAutoregister")
    specs = [importlib.util.find_spec("peft") for _ in range(3)]
    print(all(spec is not None for spec in specs), finders(), "peft" in sys.modules, "peft_lora_mixer" in sys.modules)
    from peft import mapping
    print("LORAMIXER" in mapping.PEFT_TYPE_TO_TUNER_MAPPING, finders(), type(sys.modules["peft"].__loader__).__name__)
    """
    result = run(code, env=site_env)
    assert result.stdout.split() == ["True", "1", "False", "False", "True", "0", "SourceFileLoader"], result.stderr


def test_a_pth_left_behind_without_the_package_does_not_break_peft(tmp_path):
    shutil.copy(ROOT / "src" / PTH, tmp_path)
    # `-S` runs no .pth (this package's editable install would add it back), and also leaves a virtualenv's
    # site-packages out of `sys.path`: they are named here as the test's own interpreter sees them
    code = f"""
    import site, sys
    sys.path.extend({site.getsitepackages()!r})  # peft and torch, without running the .pth files there
    site.addsitedir({str(tmp_path)!r})  # our .pth, but no package next to it
    import peft
    print("peft_lora_mixer" in sys.modules, [type(f).__name__ for f in sys.meta_path].count("PeftLoraMixerAutoregister"))
    """
    result = run(code, env={"PYTHONPATH": ""}, python_options=["-S"])
    assert result.stdout.split() == ["False", "1"], result.stderr


def test_importing_the_package_itself_is_unchanged(site_env):
    code = """
    import peft_lora_mixer, sys
    from peft import mapping
    print(mapping.PEFT_TYPE_TO_TUNER_MAPPING["LORAMIXER"].__name__, type(sys.modules["peft"].__loader__).__name__)
    """
    result = run(code, env=site_env)
    assert result.stdout.split() == ["LoraMixerModel", "SourceFileLoader"], result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True])
def test_pip_install_ships_the_pth(tmp_path, saved, editable):
    """`pip install .` and `pip install -e .` both put the .pth in site-packages (the new venv sees this
    environment's packages, pip and the build backend included, so nothing is downloaded)."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns("tests", "docs", "build", "*.egg-info", ".*"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # `--system-site-packages` would show the base interpreter's packages, not those of a virtualenv running this
    venv_site = Path(
        run("import sysconfig; print(sysconfig.get_path('purelib'))", env={}, python=python).stdout.strip()
    )
    (venv_site / "parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*install, *(["-e"] if editable else []), str(project)], check=True, capture_output=True)
    purelib = run("import sysconfig; print(sysconfig.get_path('purelib'))", env={}, python=python)
    site_packages = Path(purelib.stdout.strip())
    assert (site_packages / PTH).read_text() == (ROOT / "src" / PTH).read_text()

    env = {"PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    result = run(LOAD_WITH_PEFT_ONLY, *saved, env=env, python=python)
    assert result.returncode == 0, result.stderr
    origin = run("import peft, peft_lora_mixer; print(peft_lora_mixer.__file__)", env=env, python=python).stdout
    assert origin.startswith(str(project / "src") if editable else str(site_packages))


# transformers' own ways to load an adapter, in a program that names neither peft nor peft_lora_mixer first
LOAD_WITH_TRANSFORMERS = """
import sys
import torch
from transformers import AutoModelForCausalLM

how, base, mixer, served, expected = sys.argv[1:]
if how == "from_pretrained":  # one folder holding the base model and the adapter
    model = AutoModelForCausalLM.from_pretrained(served)
elif how == "load_adapter":
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(mixer)
else:
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(mixer)  # the base from the adapter's config
with torch.no_grad():
    logits = model(input_ids=torch.arange(8)[None] % {vocab}).logits
torch.testing.assert_close(logits, torch.load(expected), rtol=0, atol=0)
""".format(vocab=VOCAB)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, str]:
    """A base model with its tokenizer, a mixer naming it as its base, both in one folder, and the mixer's logits."""
    root = tmp_path_factory.mktemp("served")
    paths = {name: str(root / name) for name in ("base", "mixer", "served", "expected")}
    config = LoraMixerConfig(num_experts=3, r=2, init_weights=False)
    model = save_base_and_mixer(paths["base"], paths["mixer"], config)
    shutil.copytree(paths["base"], paths["served"])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(Path(paths["mixer"]) / name, paths["served"])
    with torch.no_grad():
        torch.save(model(input_ids=torch.arange(8)[None] % VOCAB).logits, paths["expected"])
    return paths


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter", "AutoPeftModelForCausalLM"])
def test_transformers_loaders_load_it_without_the_import(site_env, served, how):
    paths = [served[name] for name in ("base", "mixer", "served", "expected")]
    result = run(LOAD_WITH_TRANSFORMERS, how, *paths, env=site_env)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # lm-eval's start-up: about 35 s on a busy 2-core machine
def test_lm_eval_cli_loads_it_without_the_import(site_env, served, tmp_path):
    """`lm_eval --model hf --model_args pretrained=BASE,peft=MIXER`, on a local task, scores as the mixer does."""
    tasks = write_tasks(tmp_path / "tasks", ["low_words"])
    code = """
    import sys
    from lm_eval.__main__ import cli_evaluate  # what the `lm_eval` command runs

    sys.argv[0] = "lm_eval"
    cli_evaluate()
    """
    model_args = f"pretrained={served['base']},peft={served['mixer']}"
    options = ["--model", "hf", "--model_args", model_args, "--tasks", "low_words", "--include_path", str(tasks)]
    output = tmp_path / "results"
    result = run(code, *options, "--device", "cpu", "--output_path", str(output), env=site_env)
    assert result.returncode == 0, result.stderr
    [results] = output.rglob("results_*.json")
    accuracy, _ = expected_results(served["base"], served["mixer"], *TASKS["low_words"])
    assert json.loads(results.read_text())["results"]["low_words"]["acc,none"] == pytest.approx(accuracy)


TRL_SCRIPT = """
import sys
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

base, mixer, output = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), mixer, is_trainable=True)
data = Dataset.from_list([{"text": " ".join(f"w{i + j}" for j in range(6))} for i in range(4)])
args = SFTConfig(output, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                 save_strategy="no", disable_tqdm=True, bf16=False)
SFTTrainer(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(base)).train()
model.save_pretrained(output)
"""


def test_a_trl_script_trains_it_without_the_import(site_env, served, tmp_path):
    """A TRL script that resumes training a saved mixer: it loads, trains, and saves a LoRA-Mixer adapter."""
    result = run(TRL_SCRIPT, served["base"], served["mixer"], str(tmp_path), env=site_env)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORAMIXER"
    before = load_file(Path(served["mixer"]) / "adapter_model.safetensors")
    after = load_file(tmp_path / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert any("loramixer_router" in key for key in changed) and any("loramixer_A" in key for key in changed)
