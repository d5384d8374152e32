"""`python -m benchmarks.bigbench prepare`: the fixed splits of the chosen BIG-bench tasks, as a manifest.

    python -m benchmarks.bigbench prepare   # the default tasks: 200 held-out, 150 router-train, <= 1000 expert-train
    python -m benchmarks.bigbench prepare --tasks hyperbaton arithmetic:2_digit_subtraction --manifest my.json

The same command with other task names makes splits the same way for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .data import DEFAULT_TASKS, read_tasks, split, write_manifest

MANIFEST = Path(__file__).resolve().parent / "manifest.json"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bigbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="write the manifest of splits")
    prepare.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="BIG-bench task or task:subtask names")
    prepare.add_argument(
        "--sdist", type=Path, help="the bigbench .tar.gz (default: $LORA_MIXER_BIGBENCH_SDIST or cache)"
    )
    prepare.add_argument("--held-out", type=int, default=200)
    prepare.add_argument("--router-train", type=int, default=150)
    prepare.add_argument("--expert-train", type=int, default=1000, help="at most this many per task")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args()
    tasks = read_tasks(args.tasks, args.sdist, args.seed)
    sizes = args.held_out, args.router_train, args.expert_train
    splits = {name: split(examples, *sizes, seed=args.seed) for name, examples in tasks.items()}
    settings = dict(zip(("held_out", "router_train", "expert_train"), sizes), seed=args.seed, sdist="bigbench-1.0.0")
    write_manifest(args.manifest, splits, settings)
    for name, parts in splits.items():
        kind = "multiple choice" if tasks[name][0].choices else "generative"
        sizes = ", ".join(f"{part} {len(ids)}" for part, ids in parts.items())
        print(f"{name}: {len(tasks[name])} examples ({kind}): {sizes}")
    print(f"wrote {args.manifest}")


if __name__ == "__main__":
    main()
