"""Benchmark LoRA-Mixer against PEFT LoRA and X-LoRA: training step, greedy generation, peak training memory.

    PYTHONPATH=src python -m benchmarks                       # full table: the GPU workload on CUDA, else both CPU ones
    PYTHONPATH=src python -m benchmarks --quick               # a couple of minutes: key rows, fewer repeats

All rows of a workload live in one process. Each row is measured right after PEFT LoRA r=8 (the reference), round
after round; each figure is the median over repeats, and each ratio the median of the row / reference ratios of
those back-to-back pairs, so the changing load of a shared machine hits both sides of every ratio alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from datetime import datetime, timezone

import peft
import torch
import transformers

from peft_lora_mixer.routing import ROUTING_MODES

from .measure import Subject
from .tables import markdown_table
from .variants import REFERENCE, Variant, apply_variant, default_variants, parse_only, reference_of
from .workloads import WORKLOADS, Workload, default_workloads

QUICK_ROWS = [
    "base",
    "lora-r8",
    "lora-r64",
    "xlora-8x8-k2",
    "mixer-e8-k2",
    "mixer-e64-k2",
    "mixer-e64-k2-topk",
    "mixer-e8-k2-on-lora-targets",
]  # the last one only where LoRA refuses some of the mixer's targets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=sorted(WORKLOADS),
        default=None,
        help="default: llama-1b-gpu when CUDA is available, else llama-cpu and mamba-cpu",
    )
    parser.add_argument("--rows", nargs="+", default=None, help="row names to run (lora-r8 is always added)")
    parser.add_argument(
        "--routing",
        nargs="+",
        default=["hard_soft"],
        choices=ROUTING_MODES,
        help="routing modes of the LoRA-Mixer rows",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row (median reported)")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generation calls per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per row first")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"only {', '.join(QUICK_ROWS)}, 3 repeats, 1 generation call, 1 warm-up step",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: its own); 1 gives steadier ratios on a busy machine",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall-clock time, or the process's CPU time (CPU workloads; steadier on a shared machine "
        "with --threads 1)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add a compiled twin of each row (X-LoRA's aside): `torch.compile` training, static-cache compiled "
        "generation; its ratios are against PEFT LoRA r=8 compiled",
    )
    parser.add_argument("--no-generate", action="store_true", help="skip the generation measurement")
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="skip the training step and its peak memory (generation only: minutes instead of hours on mamba-cpu)",
    )
    parser.add_argument("--json", default="benchmark_results.json", help="where to write the results")
    args = parser.parse_args()
    if args.quick:
        args.routing = sorted(set(args.routing) | {"topk"})
        args.repeats, args.gen_repeats, args.warmup = 3, 1, 1
    return args


def run_workload(workload: Workload, rows: list[Variant], args: argparse.Namespace) -> list[dict]:
    """Build every row, then measure each right after the reference (`measure_paired`); one result dict per row."""
    if args.clock == "cpu" and workload.device != "cpu":
        raise SystemExit(
            f"--clock cpu times CPU work only; {workload.name} runs on {workload.device}: use --clock wall"
        )
    subjects = {}
    for row in rows:
        model = apply_variant(workload.build(), row, workload)
        subjects[row.name] = Subject.of(model, workload, args.clock, compiled=row.compiled)
        for _ in range(0 if args.no_train else args.warmup):
            subjects[row.name].train_step()
        print(f"  built {row.name}", flush=True)
    train, train_ratios = {name: [] for name in subjects}, {name: [] for name in subjects}
    if not args.no_train:
        train, train_ratios = measure_paired(subjects, Subject.train_step, args.repeats)
    gen, gen_ratios = {name: [] for name in subjects}, {name: [] for name in subjects}
    if not args.no_generate:
        for subject in subjects.values():
            subject.generate()  # warm-up
        gen, gen_ratios = measure_paired(subjects, Subject.generate, args.gen_repeats)
    memory = {} if args.no_train else {name: subject.peak_train_memory() for name, subject in subjects.items()}
    state = {} if args.no_train else {name: subject.train_state_memory() for name, subject in subjects.items()}
    return [
        dict(
            row=name,
            train_ms=_median(train[name], scale=1e3),
            train_ms_all=[1e3 * t for t in train[name]],
            train_ratio=_median(train_ratios[name]),
            train_ratio_all=train_ratios[name],
            gen_tok_s=_median(gen[name]),
            gen_tok_s_all=gen[name],
            gen_ratio=_median(gen_ratios[name]),
            gen_ratio_all=gen_ratios[name],
            peak_train_mib=memory[name] / 2**20 if memory else None,
            mem_ratio=memory[name] / memory[reference_of(name)] if memory else None,
            train_state_mib=state[name] / 2**20 if state else None,
            state_ratio=state[name] / state[reference_of(name)] if state else None,
            trainable_params=subjects[name].trainable_parameters(),
        )
        for name in subjects
    ]


def _median(values: list[float], scale: float = 1.0) -> float | None:
    """`scale` times the median of `values`; None for a measurement that was skipped."""
    return scale * statistics.median(values) if values else None


def measure_paired(
    subjects: dict[str, Subject], measure: Callable[[Subject], float], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """`measure` of every row, each time right after its reference row's (`reference_of`): (the values, the
    row / reference ratios).

    On a shared machine the load changes within seconds; a ratio of two measurements taken back to back sees the
    same load, so the median of such pairs is much steadier than the ratio of two medians over a whole run.
    """
    values = {name: [] for name in subjects}
    ratios = {name: [] for name in subjects}
    others = [name for name in subjects if name != REFERENCE] or [REFERENCE]
    for _ in range(repeats):
        for name in others:
            reference = reference_of(name)
            reference_value, value = measure(subjects[reference]), measure(subjects[name])
            values[reference].append(reference_value)
            if name != REFERENCE:
                values[name].append(value)
            ratios[name].append(value / reference_value)
    ratios[REFERENCE] = [1.0]
    return values, ratios


def format_table(workload: Workload, results: list[dict]) -> str:
    # "x ref": against PEFT LoRA r=8, or for a compiled row against PEFT LoRA r=8 compiled (`reference_of`)
    header = ["row", "train step ms", "x ref", "gen tok/s", "x ref", "peak train MiB", "x ref"]
    header += ["train state MiB", "x ref", "trainable params"]
    title = (
        f"{workload.name}: batch {workload.batch} x seq {workload.seq_len}; generation {workload.batch} x "
        f"({workload.prompt_len} prompt + {workload.new_tokens} new tokens)"
    )

    def pair(value: float | None, ratio: float | None, digits: int) -> list[str]:
        return [f"{value:.{digits}f}", f"{ratio:.2f}"] if value else ["-", "-"]

    rows = [
        [r["row"], *pair(r["train_ms"], r["train_ratio"], 1), *pair(r["gen_tok_s"], r["gen_ratio"], 0)]
        + [*pair(r["peak_train_mib"], r["mem_ratio"], 0), *pair(r["train_state_mib"], r["state_ratio"], 0)]
        + [f"{r['trainable_params']:,}"]
        for r in results
    ]
    return title + "\n\n" + markdown_table(header, rows)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        args=vars(args),
        workloads={},
    )
    for name in args.workloads or default_workloads():
        workload = WORKLOADS[name]
        available = default_variants(workload, tuple(args.routing), compiled=args.compile)
        quick_rows = [row.name for row in available if row.name in QUICK_ROWS]
        names = args.rows or (quick_rows if args.quick else None)
        rows = parse_only(names, available)
        print(f"{name}: {len(rows)} rows", flush=True)
        results = run_workload(workload, rows, args)
        print("\n" + format_table(workload, results) + "\n", flush=True)
        report["workloads"][name] = dict(
            workload=dict(
                batch=workload.batch,
                seq_len=workload.seq_len,
                prompt_len=workload.prompt_len,
                new_tokens=workload.new_tokens,
                config=workload.config,
            ),
            results=results,
        )
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
