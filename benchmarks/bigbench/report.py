"""The summary of a run: every row's macro average with its interval, the expert x task matrix, the oracle, the
share of the oracle's gain, paired differences of the best LoRA-Mixer row against each peer, and the plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..tables import markdown_row, markdown_table
from .plan import ARROW, ARROW_INIT
from .stats import Scores, interval, macro, paired_difference, seed_mean

EXPERT_MARGIN = 0.10  # each expert must beat the base model on its own task by this much (absolute accuracy)
ORACLE = "oracle (each task's own expert)"
# right wherever any single expert is: the most that picking one expert per prompt can reach
BEST_EXPERT = "best expert per example"
FEW_SHOT_PEERS = ("LoRAHub", "X-LoRA")  # the methods the few-shot rows are paired against at their own count
DERIVED = {ORACLE: "oracle", BEST_EXPERT: "best expert per example"}  # rows computed from the experts' rows


def summarize(
    results: dict, tasks: list[str], size: str, folder: Path, router_all: int, per_task: bool = False
) -> dict:
    """Pool each row's seeds, compute the figures, print the tables, draw the plot; return the summary.
    `router_all`: how many router examples "all" is (per task when `per_task`, as the rows count them)."""
    runs: dict[str, list[Scores]] = defaultdict(list)
    meta = {}
    for row, result in results.items():
        runs[row.group].append(result["scores"])
        meta[row.group] = row
    pooled = {group: seed_mean(scores) for group, scores in runs.items()}
    experts = [group for group in pooled if meta[group].method == "expert"]
    summary: dict = {
        "size": size,
        "tasks": tasks,
        "router_examples_all": router_all,
        "router_examples_per_task": per_task,
        "rows": {},
    }
    if "base model" in pooled and len(experts) == len(tasks):
        pooled[ORACLE] = {task: pooled[experts[i]][task] for i, task in enumerate(tasks)}
        pooled[BEST_EXPERT] = {
            task: {key: max(pooled[e][task][key] for e in experts) for key in pooled[experts[0]][task]}
            for task in tasks
        }
        summary["expert_matrix"] = {group: _per_task(pooled[group]) for group in experts}
        base = _per_task(pooled["base model"])
        summary["experts_beat_base_by_margin"] = {
            task: summary["expert_matrix"][experts[i]][task] - base[task] >= EXPERT_MARGIN
            for i, task in enumerate(tasks)
        }
    base_macro = macro(pooled["base model"]) if "base model" in pooled else None
    oracle_macro = macro(pooled[ORACLE]) if "expert_matrix" in summary else None
    for group, scores in pooled.items():
        row = meta.get(group)
        macros = [macro(run) for run in runs.get(group, [scores])]
        summary["rows"][group] = {
            "method": row.method if row else DERIVED[group],
            "router_examples": row.router_examples if row else -1,
            "seeds": len(macros),
            "per_task": _per_task(scores),
            "macro": macro(scores),
            "macro_std_over_seeds": float(np.std(macros)) if len(macros) > 1 else None,
            "ci95": interval(scores),
            "oracle_gain_share": _share(macro(scores), base_macro, oracle_macro),
        }
    summary["paired_vs_best_mixer"] = _paired(pooled, meta)
    summary["few_shot"] = _few_shot(pooled, meta)
    summary["rsl_minus_no_rsl"] = _rsl_effect(pooled, meta)
    if ARROW in pooled and ARROW_INIT in pooled:  # the zero-shot bar: LoRA-Mixer's Arrow init not below Arrow
        summary["arrow_init_minus_arrow"] = paired_difference(pooled[ARROW_INIT], pooled[ARROW])
    summary["plot"] = plot(summary, folder / "macro_by_router_examples.png")
    print(markdown(summary, aligned=True))
    return summary


def _per_task(scores: Scores) -> dict[str, float]:
    return {task: float(np.mean(list(values.values()))) for task, values in scores.items()}


def _share(value: float, base: Optional[float], oracle: Optional[float]) -> Optional[float]:
    if base is None or oracle is None or abs(oracle - base) < 1e-9:
        return None
    return (value - base) / (oracle - base)


def _paired(pooled: dict[str, Scores], meta: dict) -> dict:
    """The best trained LoRA-Mixer row (by macro) against every row that is not a LoRA-Mixer or an expert."""
    mixers = [g for g in pooled if g in meta and meta[g].method.startswith("LoRA-Mixer top")]
    if not mixers:
        return {}
    best = max(mixers, key=lambda g: macro(pooled[g]))
    peers = [g for g in pooled if not g.startswith("LoRA-Mixer") and (g not in meta or meta[g].method != "expert")]
    return {"best": best, "against": {peer: paired_difference(pooled[best], pooled[peer]) for peer in peers}}


def _few_shot(pooled: dict[str, Scores], meta: dict) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """The few-shot bars: at each router-example count ("5", "20", "all"), every trained LoRA-Mixer row minus each
    peer fitted on the same examples (LoRAHub-style weights, X-LoRA) and minus Arrow (which needs none), paired."""
    result: dict = {}
    for group in pooled:
        row = meta.get(group)
        if row is None or not row.method.startswith("LoRA-Mixer top") or row.router_examples == -1:
            continue
        peers = [
            peer
            for peer in pooled
            if peer == ARROW
            or (
                peer in meta
                and meta[peer].method in FEW_SHOT_PEERS
                and meta[peer].router_examples == row.router_examples
            )
        ]
        count = "all" if row.router_examples is None else str(row.router_examples)
        result.setdefault(count, {})[group] = {peer: paired_difference(pooled[group], pooled[peer]) for peer in peers}
    return result


def _rsl_effect(pooled: dict[str, Scores], meta: dict) -> dict[str, dict[str, float]]:
    """Whether the RSL earns its default: each trained LoRA-Mixer row with it minus its twin without it (same top-k,
    routers and router examples, seeds pooled alike), paired."""
    twins = {(row.method, row.router_examples): group for group, row in meta.items()}
    effect = {}
    for group, row in meta.items():
        if not row.method.startswith("LoRA-Mixer top") or " RSL" not in row.method or " no RSL" in row.method:
            continue
        twin = twins.get((row.method.replace(" RSL", " no RSL", 1), row.router_examples))
        if twin is not None:
            effect[group] = paired_difference(pooled[group], pooled[twin])
    return effect


def markdown(summary: dict, aligned: bool = False) -> str:
    """The expert x task matrix, the rows and the paired differences as Markdown tables: `aligned` pads the columns
    for a terminal, unaligned they paste into the docs as they are."""
    return "\n\n".join(_render(header, rows, aligned) for header, rows in _tables(summary)) + "\n"


def _render(header: list[str], rows: list[list[str]], aligned: bool) -> str:
    if aligned:
        return markdown_table(header, rows)
    return "\n".join(markdown_row(line) for line in [header, ["---"] * len(header), *rows])


def _difference_cells(diff: dict[str, float]) -> list[str]:
    """A paired difference and its interval as two table cells."""
    return [f"{diff['difference']:+.3f}", f"[{diff['low']:+.3f}, {diff['high']:+.3f}]"]


def _tables(summary: dict) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of each table the summary prints."""
    tasks = summary["tasks"]
    columns = [f"`{task}`" for task in tasks]
    tables = []
    if "expert_matrix" in summary:
        matrix = [[group, *(f"{values[t]:.3f}" for t in tasks)] for group, values in summary["expert_matrix"].items()]
        tables.append((["expert \\ task", *columns], matrix))
    rows = []
    for group, row in summary["rows"].items():
        std = "" if row["macro_std_over_seeds"] is None else f" (+-{row['macro_std_over_seeds']:.3f} over seeds)"
        share = "" if row["oracle_gain_share"] is None else f"{row['oracle_gain_share']:.2f}"
        low, high = row["ci95"]
        macro_cell = f"{row['macro']:.3f} [{low:.3f}, {high:.3f}]{std}"
        rows.append([group, *(f"{row['per_task'][t]:.3f}" for t in tasks), macro_cell, share])
    tables.append((["row", *columns, "macro [95% CI]", "/oracle"], rows))
    paired = summary["paired_vs_best_mixer"]
    if paired:
        differences = [[peer, *_difference_cells(diff)] for peer, diff in paired["against"].items()]
        tables.append(([f"{paired['best']} minus", "difference in macro", "paired 95% CI"], differences))
    few_shot = [
        [group, peer, *_difference_cells(diff)]
        for rows_at_count in summary.get("few_shot", {}).values()
        for group, peers in rows_at_count.items()
        for peer, diff in peers.items()
    ]
    if few_shot:
        tables.append(
            (["LoRA-Mixer row", "minus (same router examples)", "difference in macro", "paired 95% CI"], few_shot)
        )
    rsl = [[group, *_difference_cells(diff)] for group, diff in summary.get("rsl_minus_no_rsl", {}).items()]
    if rsl:
        tables.append((["LoRA-Mixer row with the RSL", "minus the same without it", "paired 95% CI"], rsl))
    zero_shot = summary.get("arrow_init_minus_arrow")
    if zero_shot:
        cells = [ARROW, *_difference_cells(zero_shot)]
        tables.append(([f"{ARROW_INIT} minus", "difference in macro", "paired 95% CI"], [cells]))
    return tables


def plot(summary: dict, path: Path) -> Optional[str]:
    """Macro accuracy against router examples, a line per trained method and a level per untrained one; None
    without matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    levels = {}
    for group, row in summary["rows"].items():
        if row["router_examples"] == -1 and row["method"] != "expert":
            levels[group] = row["macro"]
        elif row["router_examples"] != -1:
            lines[row["method"]].append((row["router_examples"] or summary["router_examples_all"], row["macro"]))
    figure, axis = plt.subplots(figsize=(8, 5))
    for method, points in lines.items():
        axis.plot(*zip(*sorted(points)), marker="o", label=method)
    for index, (group, value) in enumerate(levels.items()):
        axis.axhline(value, linestyle=":", color=f"C{(index + len(lines)) % 10}", label=group)
    axis.set_xscale("log")
    axis.set_xlabel("router-train examples" + (" per task" if summary.get("router_examples_per_task") else ""))
    axis.set_ylabel("macro accuracy, held-out")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)
