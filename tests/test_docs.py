"""The documentation stays true to the code: the config's `Args:` section and the files and modules docs name."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import runpy
from pathlib import Path

import pytest
from peft.config import PeftConfig

from peft_lora_mixer import LoraMixerConfig

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ARG_LINE = re.compile(r"^ {8}(\w+) \(`[^`]+`, defaults to `([^`]+)`\):$")


def documented_args() -> dict[str, tuple[str, str]]:
    """{field name: (documented default, documented text)} from the `Args:` section of `LoraMixerConfig`'s docstring."""
    doc = LoraMixerConfig.__doc__
    assert doc.count("\n    Args:\n") == 1, (
        "one `Args:` section, written from the fields' helps: no second, hand-written one"
    )
    args: dict[str, tuple[str, list[str]]] = {}
    for line in doc.split("\n    Args:\n", 1)[1].splitlines():
        match = ARG_LINE.match(line)
        if match:
            name, text = match[1], []
            args[name] = (match[2], text)
        elif line.strip():
            text.append(line.strip())
    return {name: (default, " ".join(text)) for name, (default, text) in args.items()}


def own_fields() -> dict[str, dataclasses.Field]:
    inherited = {field.name for field in dataclasses.fields(PeftConfig)}
    return {field.name: field for field in dataclasses.fields(LoraMixerConfig) if field.name not in inherited}


def test_each_config_field_is_documented_once_in_its_help_which_the_docstring_shows():
    documented, fields = documented_args(), own_fields()
    assert sorted(documented) == sorted(fields), "the `Args:` section and the config's fields differ"
    for name, (default, text) in documented.items():
        value = ast.literal_eval(default)
        assert value == fields[name].default and type(value) is type(fields[name].default), name
        assert text == " ".join(fields[name].metadata["help"].split()), f"{name}: the docstring is not its help"


def anchors(document: Path) -> set[str]:
    """The fragment ids GitHub gives the document's headings."""
    headings = re.findall(r"^#+ (.+)$", document.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_documents_link_only_to_files_and_headings_that_exist():
    for document in DOCUMENTS:
        for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", document.read_text()):
            if "://" in target:
                continue
            linked = (document.parent / target) if target else document
            assert linked.exists(), f"{document.name} links to missing {target}"
            if fragment and linked.suffix == ".md":
                assert fragment in anchors(linked), f"{document.name} links to missing {target}#{fragment}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_documents_name_only_paths_and_modules_that_exist(document):
    text = document.read_text()
    for path in re.findall(r"`((?:src|tests|examples|benchmarks|demo)/[\w/.-]+\.(?:py|json))`", text):
        assert (ROOT / path).exists(), f"{document.name} names missing {path}"
    for path in re.findall(r"(?<![\w/])(peft_lora_mixer/[\w/]+\.py)", text):
        assert (ROOT / "src" / path).exists(), f"{document.name} names missing src/{path}"
    for dotted in set(re.findall(r"\bpeft_lora_mixer(?:\.\w+)+", text)):
        assert resolves(dotted), f"{document.name} names missing {dotted}"


def resolves(dotted: str) -> bool:
    """Whether `a.b.c` is a module, or an attribute path inside the longest importable module prefix."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_plug_and_play_example_teaches_best_expert_labels_and_reloads_identically(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["plug_and_play.py"])
    runpy.run_path(str(ROOT / "examples" / "plug_and_play.py"), run_name="__main__")
    out = capsys.readouterr().out
    labels = re.search(r"best expert per sample: \[([\d, ]+)\]", out).group(1).split(", ")
    assert len(labels) == 20 and set(labels) <= {"0", "1", "2"}
    assert out.count("reloads identically: True") == 2


def test_quickstart_example_runs_and_reloads_identically(capsys):
    """The README's first example: it exits with an error itself if the reloaded adapter differs."""
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "identical logits = True" in out
    # what it says of stage 2's higher loss holds: forced routing beats the routers' own choice on held-out text
    forced, routed = map(float, re.search(r"held-out loss: ([\d.]+) with .*?, ([\d.]+) with", out).groups())
    assert forced < routed
