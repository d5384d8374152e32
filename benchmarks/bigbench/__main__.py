"""BIG-bench plug-and-play benchmark: frozen per-task LoRAs combined by every method, scored with lm-eval.

    python -m benchmarks.bigbench --size smoke                  # the whole pipeline on the committed slice, minutes
    python -m benchmarks.bigbench                               # the full benchmark (hours; resumes from its cache)
    python -m benchmarks.bigbench --tasks hyperbaton navigate   # any BIG-bench tasks or task:subtask names
    python -m benchmarks.bigbench --write-manifest              # split the tasks and record the ids (committed)

The full size reads BIG-bench's task files, fetched once outside the repository (a checkout, or the bigbench 1.0.0
sdist where a package index serves it; pypi.org's 0.0.1 holds no data):
    git clone --depth 1 https://github.com/google/BIG-bench ~/.cache/peft-lora-mixer/bigbench-data
"""

from __future__ import annotations

import argparse

import torch

from .carry import RestoreError
from .prepare import write_manifest, write_slice
from .run import add_run_options, run
from .sizes import SIZES

TASKS = [
    "hyperbaton",
    "intent_recognition",
    "object_counting",
    "arithmetic:2_digit_addition",
    "linguistic_mappings:plural",
    "linguistic_mappings:sentence_negation",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bigbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="BIG-bench task or task:subtask names")
    add_run_options(parser, SIZES)
    parser.add_argument(
        "--write-manifest", action="store_true", help="write the split manifest and the test slice, then stop"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write_manifest:
        write_slice(args.tasks, args.seed, write_manifest(args.tasks, args.seed))
        return 0
    try:
        run(args.tasks, args.size, args.seed, args.rows, restore_from=args.restore_from)
    except RestoreError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
