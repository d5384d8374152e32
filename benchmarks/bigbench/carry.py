"""Rows carried from one machine to another: a run's results keep every row's per-example scores with the digests
of the experts that made them, and a later run whose experts are byte-identical restores those rows into its cache
instead of scoring them again (the cache lives on one machine; the results file can be committed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .experts import EXPERT_WEIGHTS
from .source import Splits


class RestoreError(ValueError):
    """A results file whose rows cannot enter this run's cache, and why."""


def expert_digests(expert_dirs: list[Path]) -> dict[str, str]:
    """{expert folder name: SHA-256 of its weights}."""
    return {path.name: hashlib.sha256((path / EXPERT_WEIGHTS).read_bytes()).hexdigest() for path in expert_dirs}


def heldout_ids(splits: Splits) -> dict[str, list[str]]:
    """Every task's held-out example ids, in the order the packed scores follow."""
    return {task: [example.id for example in parts["heldout"]] for task, parts in splits.items()}


def pack(rows: dict[str, dict], splits: Splits) -> dict:
    """Every row's scores as one "0"/"1" string per task, in the order of `heldout` (the held-out ids, listed once):
    about 600 characters a row instead of a JSON object per example."""
    heldout = heldout_ids(splits)
    packed = {}
    for key, row in rows.items():
        bits = {}
        for task, ids in heldout.items():
            values = [row["scores"][task][i] for i in ids]
            if not set(values) <= {0.0, 1.0}:
                raise ValueError(f"row {key}, task {task}: scores other than 0 and 1 cannot be packed")
            bits[task] = "".join(str(int(value)) for value in values)
        packed[key] = {"scores": bits, "routing": row["routing"]}
    return {"heldout": heldout, "rows": packed}


def unpack(packed: dict) -> dict[str, dict]:
    """The rows of `pack` as a run writes them to its cache."""
    return {
        key: {
            "row": key,
            "scores": {
                task: {i: float(bit) for i, bit in zip(packed["heldout"][task], bits)}
                for task, bits in row["scores"].items()
            },
            "routing": row["routing"],
        }
        for key, row in packed["rows"].items()
    }


def read_results(results_file: Path) -> dict:
    """An earlier run's results, checked to hold per-example scores (before this run trains or writes anything)."""
    try:
        earlier = json.loads(results_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RestoreError(f"cannot read the results to restore from {results_file}: {error}") from None
    if not isinstance(earlier, dict) or "per_example" not in earlier or "experts" not in earlier:
        raise RestoreError(
            f"{results_file} holds no per-example scores (a results file written before they were kept, or "
            "another file): nothing to restore."
        )
    return earlier


def restorable_rows(earlier: dict, results_file: Path, digests: dict[str, str], splits: Splits) -> dict[str, dict]:
    """The rows of `read_results`, once its experts and held-out examples are checked to be this run's; raises
    RestoreError saying what differs otherwise (its rows would not compare with this run's)."""
    if earlier["experts"] != digests:
        differ = sorted(
            name
            for name in digests.keys() | earlier["experts"].keys()
            if earlier["experts"].get(name) != digests.get(name)
        )
        raise RestoreError(
            f"the experts that scored {results_file} are not this cache's ({', '.join(differ)} differ): its rows "
            "would not compare with this run's. Copy those experts into the cache, or run without restoring."
        )
    heldout = heldout_ids(splits)
    if earlier["per_example"]["heldout"] != heldout:
        raise RestoreError(f"{results_file} was scored on other held-out examples than this run's: nothing restored.")
    return unpack(earlier["per_example"])
