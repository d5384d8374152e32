"""Budgets of the generated-task benchmark: `full` fits one core in about 8 hours (see docs/task_benchmark.md),
`smoke` runs every row on a tiny model in seconds to minutes."""

from __future__ import annotations

from dataclasses import replace

from benchmarks.bigbench.sizes import SIZES as BIGBENCH_SIZES
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
        router_examples=(5, 20, None),  # per task: LoRAHub's 5, then 20, then all 100
        router_examples_per_task=True,
        ablation_router_examples=(None,),
    ),
    # BIG-bench's smoke size on the generated tasks, every example a router example
    "smoke": replace(BIGBENCH_SIZES["smoke"], data="generated", router_examples=(None,)),
}
