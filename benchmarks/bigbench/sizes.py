"""How big and how long each run is: `full` is the documented benchmark, `smoke` the same pipeline in minutes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .splits import SplitSizes


@dataclass(frozen=True)
class BenchSize:
    """Budgets of one run.

    `model`: `smollm2` (SmolLM2-135M-Instruct) or `tiny` (a 2-layer Llama with SmolLM2's tokenizer, for the smoke
    run). `data`: `bigbench` (BIG-bench's task files, split as the manifest says), `slice` (the committed few examples)
    or `generated` (`benchmarks.tasks`, whose source splits them).
    `router_examples`: how many router-train examples (mixed over tasks; None: all) each trained-router row sees;
    every such row trains `router_steps` steps whatever its data, so smaller sets are seen more often.
    `router_examples_per_task`: the counts are per task (the few-shot protocol: LoRAHub fits on 5 per task), not in
    all. `ablation_router_examples`: the counts at which the top-1 and no-RSL rows run (None: every count).
    `lorahub_examples` and `lorahub_evaluations`: the router examples whose loss the LoRAHub-style weights are fitted
    to, and the optimizer's budget of loss evaluations (LoRAHub's own default is 40; COBYLA needs at least the
    number of experts + 2).
    """

    model: str
    data: str
    splits: SplitSizes
    expert_steps: int
    router_steps: int
    batch_size: int
    expert_lr: float = 1e-3
    router_lr: float = 1e-2
    router_examples: tuple[Optional[int], ...] = (100, 500, None)
    router_examples_per_task: bool = False
    ablation_router_examples: Optional[tuple[Optional[int], ...]] = None
    seeds: tuple[int, ...] = (0, 1, 2)
    lorahub_examples: int = 120
    lorahub_evaluations: int = 40
    eval_batch_size: int = 8
    max_length: int = 256


SIZES = {
    "full": BenchSize(
        model="smollm2", data="bigbench", splits=SplitSizes(), expert_steps=250, router_steps=150, batch_size=8
    ),
    "smoke": BenchSize(
        model="tiny",
        data="slice",
        splits=SplitSizes(heldout=4, router=4, expert=4),
        expert_steps=2,
        router_steps=2,
        batch_size=2,
        router_examples=(4, None),
        seeds=(0,),
        lorahub_examples=6,
        lorahub_evaluations=8,
        eval_batch_size=4,
    ),
}
