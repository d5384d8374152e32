"""The package, the demo and the benchmarks import each other in one direction only: no module imports one that
imports it back (directly or through others), counting imports inside functions too, and `demo/` builds on
`benchmarks/`, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "peft_lora_mixer": ROOT / "src" / "peft_lora_mixer",
    "demo": ROOT / "demo",
    "benchmarks": ROOT / "benchmarks",
}


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in the three packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that module `name` imports anywhere in its file (an imported name resolves to the longest
    known module it names: `from .x import f` to `x`, `from . import x` to `x` when `x` is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            parts = candidate.split(".")
            target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in known), None)
            if target is not None and target != name:
                targets.add(target)
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as the modules along it, or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_module_imports_one_that_imports_it_back():
    assert cycle(graph()) == []


def test_the_demo_builds_on_the_benchmarks_and_the_package_on_neither():
    packages = {(a.split(".")[0], b.split(".")[0]) for a, targets in graph().items() for b in targets}
    assert ("demo", "benchmarks") in packages  # what the check below would miss if module names were wrong
    assert ("benchmarks", "demo") not in packages
    assert not {("peft_lora_mixer", "demo"), ("peft_lora_mixer", "benchmarks")} & packages


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
