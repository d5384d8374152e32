"""Memory over a long training run: does anything grow with the number of steps? LoRA-Mixer (routing loss on)
against PEFT LoRA and X-LoRA, each row in a fresh process so that its peak resident set is its own.

    PYTHONPATH=src python -m benchmarks.memory_growth                  # 200 steps, llama-cpu, the three key rows
    PYTHONPATH=src python -m benchmarks.memory_growth --steps 50 --rows lora-r8 mixer-e8-k2

Per row: the resident set after the first steps and at the end, the process's peak resident set, and the bytes of
live tensors (after a garbage collection) at both points. A leak shows as tensor bytes growing from the first
checkpoint to the last; the peak is reported as a ratio to PEFT LoRA r=8.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing

import torch

from .measure import Subject, _status_kib
from .tables import markdown_table
from .variants import Variant, apply_variant, default_variants, parse_only
from .workloads import WORKLOADS

DEFAULT_ROWS = ["lora-r8", "xlora-8x8-k2", "mixer-e8-k2"]
FIRST_CHECKPOINT = 10


def live_tensor_mib() -> float:
    gc.collect()
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run_row(workload_name: str, variant: Variant, steps: int, threads: int, results) -> None:
    """Train one row for `steps` steps in this (fresh) process; put its figures on `results`."""
    torch.set_num_threads(threads)
    workload = WORKLOADS[workload_name]
    model = apply_variant(workload.build(), variant, workload)
    subject = Subject.of(model, workload)
    figures = {}
    for step in range(1, steps + 1):
        subject.train_step()
        if step in (FIRST_CHECKPOINT, steps):
            figures[step] = dict(rss_mib=_status_kib("VmRSS") / 1024, tensor_mib=live_tensor_mib())
    results.put(dict(row=variant.name, peak_rss_mib=_status_kib("VmHWM") / 1024, at=figures))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_growth", description=__doc__)
    parser.add_argument("--workload", default="llama-cpu", choices=[w for w in WORKLOADS if w.endswith("-cpu")])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="memory_growth.json")
    args = parser.parse_args()
    if args.steps <= FIRST_CHECKPOINT:
        parser.error(f"--steps must exceed {FIRST_CHECKPOINT}")
    rows = parse_only(args.rows, default_variants(WORKLOADS[args.workload]))  # the reference first
    context = multiprocessing.get_context("spawn")
    results = []
    for row in rows:
        queue = context.Queue()
        process = context.Process(target=run_row, args=(args.workload, row, args.steps, args.threads, queue))
        process.start()
        results.append(queue.get())
        process.join()
        print(f"  {row.name} done", flush=True)
    reference_peak = results[0]["peak_rss_mib"]
    first, last = FIRST_CHECKPOINT, args.steps
    header = ["row", f"RSS step {first} MiB", f"RSS step {last} MiB", "peak RSS MiB", "x LoRA r=8"]
    header += [f"tensors step {first} MiB", f"tensors step {last} MiB"]
    rows = []
    for result in results:
        a, b, peak = result["at"][first], result["at"][last], result["peak_rss_mib"]
        rows.append(
            [result["row"], f"{a['rss_mib']:.0f}", f"{b['rss_mib']:.0f}", f"{peak:.0f}", f"{peak / reference_peak:.2f}"]
            + [f"{a['tensor_mib']:.1f}", f"{b['tensor_mib']:.1f}"]
        )
    print(
        f"\n{args.workload}: {args.steps} training steps, {args.threads} thread(s)\n\n" + markdown_table(header, rows)
    )
    with open(args.json, "w") as out:
        json.dump(dict(workload=args.workload, steps=args.steps, threads=args.threads, results=results), out, indent=1)


if __name__ == "__main__":
    main()
