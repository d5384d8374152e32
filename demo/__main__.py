"""`python -m demo` (from the repository's root): the offline end-to-end comparison, on a tiny model or a real one.

An experiment harness beside `benchmarks/`, not part of the installed package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.smollm2 import smollm2_gguf

from .run import SIZES, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument(
        "--model",
        choices=tuple(SIZES),
        default="tiny",
        help="'tiny': the miniature, pretrained on the spot (minutes); 'smollm2': SmolLM2-135M-Instruct "
        "on real text (about 7 minutes on 2 lightly loaded cores, plus under a minute to convert the GGUF file on the "
        "first run; needs the 'real' extra)",
    )
    parser.add_argument("--output", type=Path, help="folder for results and plot (default: outputs/demo[-smollm2])")
    parser.add_argument("--size", choices=("full", "smoke"), default="full", help="'smoke': a quick check of the steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output = args.output or Path("outputs/demo" if args.model == "tiny" else f"outputs/demo-{args.model}")
    if args.model == "smollm2":
        try:
            smollm2_gguf()  # before anything runs: what to install, not a traceback minutes later
        except ValueError as error:
            parser.error(str(error))
    results = run_demo(output, SIZES[args.model][args.size], args.seed, args.model)
    print(f"results: {output / 'results.json'}  plot: {results['plot'] or 'skipped (pip install matplotlib)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
