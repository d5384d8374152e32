"""The rows of the benchmark, in the order they run: the cheap and decisive ones first, so that a run stopped
part-way (it resumes from its cache) has already measured what matters most."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

from . import methods
from .methods import Context

ROUTER_INIT_NAMES = {"arrow": "Arrow", "experts": "experts"}
ARROW = "PEFT Arrow, top-2, zero-shot"
ARROW_INIT = "LoRA-Mixer, Arrow init, top-2, 0 steps"  # the same routing as ARROW, through LoRA-Mixer's router


@dataclass(frozen=True)
class Row:
    """One model to score. `group` names the row in the tables (its seeds are pooled), `method` the plot's line,
    `router_examples` its x (None: all router examples; -1: none used)."""

    key: str
    group: str
    method: str
    build: Callable[[], torch.nn.Module]
    router_examples: Optional[int] = -1
    seed: Optional[int] = None


def _examples(count: Optional[int]) -> str:
    return "all" if count is None else str(count)


def _examples_label(ctx: Context, count: Optional[int]) -> str:
    """How a row's group names its router examples: "all router examples", "20 router examples per task"."""
    per_task = " per task" if ctx.size.router_examples_per_task and count is not None else ""
    return f"{_examples(count)} router examples{per_task}"


def _mixer_row(
    ctx: Context,
    top_k: int,
    rsl: bool,
    count: Optional[int],
    seed: int,
    router_init: str = "random",
    labels: Optional[str] = None,
) -> Row:
    """A trained LoRA-Mixer row; `labels`: its routers are also taught (`router_label_weight`) each example's `task`
    expert or its `best-expert` (the expert that fits it best, for data without task labels)."""
    method = f"LoRA-Mixer top-{top_k} {'RSL' if rsl else 'no RSL'}"
    method += "" if router_init == "random" else f", {ROUTER_INIT_NAMES[router_init]} init"
    method += {None: "", "task": ", task labels", "best-expert": ", best-expert labels"}[labels]
    n = _examples(count)
    init = "" if router_init == "random" else f"{router_init}-"  # the random rows keep the keys of their caches
    return Row(
        f"mixer-{init}k{top_k}-{'rsl' if rsl else 'norsl'}{methods.LABEL_SUFFIXES[labels]}-{n}-s{seed}",
        f"{method}, {_examples_label(ctx, count)}",
        method,
        partial(methods.mixer, ctx, top_k, rsl, router_init, count, seed, ctx.size.router_steps, labels),
        count,
        seed,
    )


def _peer_rows(ctx: Context, count: Optional[int], seed: int, with_lorahub: bool) -> list[Row]:
    """LoRA-Mixer top-2 with the RSL, X-LoRA and (`with_lorahub`: its fit has no seed) LoRAHub on `count` examples."""
    n = _examples(count)
    rows = [
        _mixer_row(ctx, 2, True, count, seed),
        Row(
            f"xlora-{n}-s{seed}",
            f"PEFT X-LoRA, {_examples_label(ctx, count)}",
            "X-LoRA",
            partial(methods.xlora, ctx, count, seed),
            count,
            seed,
        ),
    ]
    if with_lorahub:
        rows.append(
            Row(
                f"lorahub-{n}",
                f"LoRAHub-style weights, {_examples_label(ctx, count)}",
                "LoRAHub",
                partial(methods.lorahub, ctx, count, seed),
                count,
            )
        )
    return rows


def plan(ctx: Context, tasks: list[str]) -> list[Row]:
    size = ctx.size
    rows = [Row("base", "base model", "base", ctx.base)]
    rows += [
        Row(f"expert-{i}", f"expert {i} ({task}) alone", "expert", partial(methods.expert_alone, ctx, i))
        for i, task in enumerate(tasks)
    ]
    rows.append(
        Row(
            "uniform-merge",
            "uniform merge (add_weighted_adapter)",
            "uniform merge",
            partial(methods.uniform_merge, ctx),
        )
    )
    rows.append(Row("arrow-k2", ARROW, "Arrow", partial(methods.arrow, ctx, 2)))
    rows.append(
        Row(
            "mixer-arrow-init-k2-0steps",
            ARROW_INIT,
            "LoRA-Mixer 0 steps",
            partial(methods.mixer, ctx, 2, False, "arrow", None, 0, 0),
        )
    )
    for k in (1, 2):
        build = partial(methods.mixer, ctx, k, False, "experts", None, 0, 0)
        rows.append(
            Row(
                f"mixer-experts-init-k{k}-0steps",
                f"LoRA-Mixer, experts init, top-{k}, 0 steps",
                "LoRA-Mixer 0 steps",
                build,
            )
        )
    for seed in size.seeds:
        counts = size.router_examples[::-1]  # all router examples first
        for count in counts:  # the few-shot comparison first: LoRA-Mixer against its peers on the same examples
            rows += _peer_rows(ctx, count, seed, seed == size.seeds[0])
        for count in counts:
            # the examples' tasks as router labels; top-1 then sends each token to one expert, as the oracle does
            rows += [_mixer_row(ctx, k, True, count, seed, labels="task") for k in (2, 1)]
            rows.append(_mixer_row(ctx, 2, True, count, seed, labels="best-expert"))  # labels without task labels
            rows.append(_mixer_row(ctx, 2, True, count, seed, router_init="arrow"))  # Arrow's routing, then trained
            if size.ablation_router_examples is None or count in size.ablation_router_examples:
                rows += [_mixer_row(ctx, k, rsl, count, seed) for k, rsl in ((2, False), (1, True), (1, False))]
    for per_task, scope in ((False, "one LoRA for all tasks"), (True, "one LoRA per task")):
        rows.append(
            Row(
                f"static-{'per-task' if per_task else 'all'}-k2-rsl-s{size.seeds[0]}",
                f"static export of LoRA-Mixer top-2 RSL, {scope}",
                f"static export, {scope}",
                partial(methods.static_export, ctx, per_task, 2, True, size.seeds[0]),
                None,
            )
        )
    rows.append(Row("joint", "LoRA-Mixer joint (2 stages, RSL)", "joint", partial(methods.joint, ctx, 0), None))
    rows.append(
        Row(
            "multitask",
            "multi-task LoRA, the mixer's size",
            "multi-task LoRA",
            partial(methods.multitask, ctx, 0),
            None,
        )
    )
    return rows
