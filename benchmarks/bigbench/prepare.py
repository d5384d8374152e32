"""Write the committed files from BIG-bench's task files: the split manifest and the tiny slice the tests run on."""

from __future__ import annotations

import json
from pathlib import Path

from .data import SLICE, example_id, load_task, resolve, source_name, task_files
from .sizes import SIZES
from .splits import MANIFEST, manifest_entry, split_task

SLICE_EXAMPLES = 12  # per task: enough for the smoke size's splits (4 held-out, 4 router, 4 expert)


def write_manifest(tasks: list[str], seed: int, path: Path = MANIFEST) -> dict:
    """Split every task from the seed and record the ids; tasks already in the file keep their entry."""
    root = task_files(tasks)
    sizes = SIZES["full"].splits
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest = {
        "source": source_name(root) + " (benchmark_tasks/*/task.json; Apache-2.0)",
        "seed": seed,
        "sizes": vars(sizes),
        "id": "first 16 hex digits of the SHA-256 of the example's input text",
        "tasks": manifest.get("tasks", {}),
    }
    for task in tasks:
        if task not in manifest["tasks"]:
            examples, duplicates = load_task(root, task, seed)
            manifest["tasks"][task] = manifest_entry(examples, duplicates, split_task(task, examples, sizes, seed))
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_slice(tasks: list[str], seed: int, manifest: dict, folder: Path = SLICE) -> None:
    """Each task's file with its first held-out examples only, in BIG-bench's layout (so one reader serves both)."""
    root = task_files(tasks)
    for task in tasks:
        source = resolve(root, task)
        task_json = json.loads(source.read_text())
        keep = set(manifest["tasks"][task]["heldout"][:SLICE_EXAMPLES])
        task_json["examples"] = [raw for raw in task_json["examples"] if example_id(raw["input"]) in keep]
        target = folder / source.parent.relative_to(root) / "task.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(task_json, indent=1, ensure_ascii=False) + "\n")
