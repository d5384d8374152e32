"""Seeded splits by example (expert-train, router-train, held-out), fixed in a committed manifest of example ids.

The manifest holds ids (a hash of each example's input), never the data. A task it lists is split as it says, so a
change in the code cannot silently move examples between splits; a task it does not list is split the same way
from the seed, so any BIG-bench task or subtask can be run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .data import Example

MANIFEST = Path(__file__).resolve().parent / "manifest.json"
SPLITS = ("expert", "router", "heldout")


@dataclass(frozen=True)
class SplitSizes:
    """Examples per task in each split; `expert` is at most that many (a task may have fewer left)."""

    heldout: int = 200
    router: int = 150
    expert: int = 650


def split_ids(ids: list[str], task: str, sizes: SplitSizes, seed: int) -> dict[str, list[str]]:
    """Shuffle the ids with a seed per task, then cut held-out, router-train and expert-train in that order."""
    if len(ids) < sizes.heldout + sizes.router + 1:
        raise ValueError(
            f"{task!r} has {len(ids)} distinct examples: too few for {sizes.heldout} held-out, {sizes.router} "
            "router-train and some expert-train examples."
        )
    order = sorted(ids)
    random.Random(f"{seed}:{task}").shuffle(order)
    cut = sizes.heldout + sizes.router
    return {
        "heldout": order[: sizes.heldout],
        "router": order[sizes.heldout : cut],
        "expert": order[cut:][: sizes.expert],
    }


def split_task(
    task: str, examples: list[Example], sizes: SplitSizes, seed: int, manifest: dict | None = None
) -> dict[str, list[Example]]:
    """The task's examples per split: as `manifest` lists them when it has the task, else from the seed."""
    by_id = {example.id: example for example in examples}
    entry = (manifest or {}).get("tasks", {}).get(task)
    ids = {split: entry[split] for split in SPLITS} if entry else split_ids(list(by_id), task, sizes, seed)
    missing = [i for split in SPLITS for i in ids[split] if i not in by_id]
    if missing:
        raise ValueError(f"The manifest lists {len(missing)} examples of {task!r} that the data lacks: {missing[:3]}")
    return {split: [by_id[i] for i in ids[split]] for split in SPLITS}


def read_manifest(path: Path = MANIFEST) -> dict:
    """The committed manifest, or an empty one."""
    return json.loads(path.read_text()) if path.is_file() else {"tasks": {}}


def manifest_entry(examples: list[Example], duplicates: int, splits: dict[str, list[Example]]) -> dict:
    """What the manifest records for one task: counts and the ids per split."""
    return {
        "examples": len(examples),
        "duplicates_removed": duplicates,
        **{split: [example.id for example in splits[split]] for split in SPLITS},
    }
