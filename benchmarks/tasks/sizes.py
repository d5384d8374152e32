"""Budgets of the generated-task benchmark: `full` fits one core in about 8 hours (see docs/task_benchmark.md),
`smoke` runs every row on a tiny model in seconds to minutes."""

from __future__ import annotations

from benchmarks.bigbench.sizes import BenchSize
from benchmarks.bigbench.splits import SplitSizes

SIZES = {
    "full": BenchSize(
        model="smollm2",
        data="generated",
        splits=SplitSizes(heldout=100, router=100, expert=400),
        expert_steps=200,
        router_steps=100,
        batch_size=8,
        router_examples=(100, None),
    ),
    "smoke": BenchSize(
        model="tiny",
        data="generated",
        splits=SplitSizes(heldout=4, router=4, expert=4),
        expert_steps=2,
        router_steps=2,
        batch_size=2,
        router_examples=(None,),
        seeds=(0,),
        lorahub_examples=6,
        lorahub_evaluations=8,
        eval_batch_size=4,
    ),
}
