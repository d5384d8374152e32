"""Installed, the package registers itself in programs that import only peft; never at start-up, and not when off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
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


def test_a_pth_left_behind_without_the_package_does_not_break_peft(tmp_path):
    shutil.copy(ROOT / "src" / PTH, tmp_path)
    code = f"""
    import site, sys
    sys.path.extend(site.getsitepackages())  # peft and torch, without running the .pth files there (checkouts)
    site.addsitedir({str(tmp_path)!r})  # our .pth, but no package next to it
    import peft
    print("peft_lora_mixer" in sys.modules, [type(f).__name__ for f in sys.meta_path].count("PeftLoraMixerAutoregister"))
    """
    result = run(code, env={}, python_options=["-S"])
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
    """`pip install .` and `pip install -e .` both put the .pth in site-packages (the venv sees this interpreter's
    packages, so nothing is downloaded)."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns("tests", "docs", "build", "*.egg-info", ".*"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
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
