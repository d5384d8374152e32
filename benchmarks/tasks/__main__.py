"""The plug-and-play benchmark on tasks every machine can make: generated from the Python standard library, or
given as JSONL files. The same rows, scoring and report as the BIG-bench benchmark.

    python -m benchmarks.tasks --size smoke                        # every row on a tiny model
    python -m benchmarks.tasks                                     # the full benchmark (hours; resumes from its cache)
    python -m benchmarks.tasks --tasks roman_numerals clock_time --task-file mine=my_task.jsonl
    python -m benchmarks.tasks --write-manifest                    # split the generated tasks and record the ids

A task file holds one JSON object a line: {"prompt": ..., "answer": ...} (answer: a string or a list of accepted
strings), or {"prompt": ..., "options": [...], "answer": one of the options} for multiple choice.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bigbench.carry import RestoreError
from benchmarks.bigbench.run import add_run_options, run

from .generators import TASKS
from .sizes import SIZES
from .source import task_source, write_manifest
from .task_file import TaskFileError, parse_task_file_option


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), help="generated tasks (none: only --task-file)")
    parser.add_argument(
        "--task-file", action="append", default=[], metavar="NAME=PATH", help="a task of your own, as JSONL"
    )
    add_run_options(parser, SIZES)
    parser.add_argument("--write-manifest", action="store_true", help="write the generated tasks' split manifest")
    args = parser.parse_args(argv)
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown:
        parser.error(f"no generated task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if args.write_manifest:
        write_manifest(args.tasks, args.seed)
        return 0
    try:
        files = dict(parse_task_file_option(value) for value in args.task_file)
    except TaskFileError as error:
        parser.error(str(error))
    tasks = [*args.tasks, *files]
    if len(tasks) < 2:
        parser.error("a mixture needs at least two tasks (generated or --task-file)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(tasks, args.size, args.seed, args.rows, source=task_source(files), restore_from=args.restore_from)
    except (TaskFileError, RestoreError) as error:  # a bad file or results to restore: nothing is scored
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
