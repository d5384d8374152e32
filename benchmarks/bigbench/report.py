"""The summary of a run: every row's macro average with its interval, the expert x task matrix, the oracle, the
share of the oracle's gain, paired differences of the best LoRA-Mixer row against each peer, and the plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from .stats import Scores, interval, macro, paired_difference, seed_mean

EXPERT_MARGIN = 0.10  # each expert must beat the base model on its own task by this much (absolute accuracy)


def summarize(results: dict, tasks: list[str], size: str, folder: Path, router_total: int) -> dict:
    """Pool each row's seeds, compute the figures, print the tables, draw the plot; return the summary."""
    runs: dict[str, list[Scores]] = defaultdict(list)
    meta = {}
    for row, result in results.items():
        runs[row.group].append(result["scores"])
        meta[row.group] = row
    pooled = {group: seed_mean(scores) for group, scores in runs.items()}
    experts = [group for group in pooled if meta[group].method == "expert"]
    summary: dict = {"size": size, "tasks": tasks, "router_examples_all": router_total, "rows": {}}
    if "base model" in pooled and len(experts) == len(tasks):
        oracle = {task: pooled[experts[i]][task] for i, task in enumerate(tasks)}
        pooled["oracle (each task's own expert)"] = oracle
        summary["expert_matrix"] = {group: _per_task(pooled[group]) for group in experts}
        base = _per_task(pooled["base model"])
        summary["experts_beat_base_by_margin"] = {
            task: summary["expert_matrix"][experts[i]][task] - base[task] >= EXPERT_MARGIN
            for i, task in enumerate(tasks)
        }
    base_macro = macro(pooled["base model"]) if "base model" in pooled else None
    oracle_macro = macro(pooled["oracle (each task's own expert)"]) if "expert_matrix" in summary else None
    for group, scores in pooled.items():
        row = meta.get(group)
        macros = [macro(run) for run in runs.get(group, [scores])]
        summary["rows"][group] = {
            "method": row.method if row else "oracle",
            "router_examples": row.router_examples if row else -1,
            "seeds": len(macros),
            "per_task": _per_task(scores),
            "macro": macro(scores),
            "macro_std_over_seeds": float(np.std(macros)) if len(macros) > 1 else None,
            "ci95": interval(scores),
            "oracle_gain_share": _share(macro(scores), base_macro, oracle_macro),
        }
    summary["paired_vs_best_mixer"] = _paired(pooled, meta)
    summary["plot"] = plot(summary, folder / "macro_by_router_examples.png")
    print(format_summary(summary))
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


def format_summary(summary: dict) -> str:
    tasks = summary["tasks"]
    short = [task.split(":")[-1][:12] for task in tasks]
    lines = []
    if "expert_matrix" in summary:
        lines.append("\nexpert x task accuracy (rows: experts, columns: held-out tasks)")
        lines.append(f"{'':<44}" + "".join(f"{s:>13}" for s in short))
        for group, values in [
            ("base model", summary["rows"]["base model"]["per_task"]),
            *summary["expert_matrix"].items(),
        ]:
            lines.append(f"{group[:43]:<44}" + "".join(f"{values[t]:>13.3f}" for t in tasks))
    lines.append("\nheld-out accuracy per task, macro average [95% bootstrap interval], share of the oracle's gain")
    lines.append(f"{'':<52}" + "".join(f"{s:>13}" for s in short) + f"{'macro':>8}{'95% CI':>16}{'/oracle':>9}")
    for group, row in summary["rows"].items():
        share = "" if row["oracle_gain_share"] is None else f"{row['oracle_gain_share']:.2f}"
        std = "" if row["macro_std_over_seeds"] is None else f" +-{row['macro_std_over_seeds']:.3f}"
        low, high = row["ci95"]
        cells = "".join(f"{row['per_task'][t]:>13.3f}" for t in tasks)
        lines.append(f"{group[:51]:<52}{cells}{row['macro']:>8.3f}{f'[{low:.3f}, {high:.3f}]':>16}{share:>9}{std}")
    paired = summary["paired_vs_best_mixer"]
    if paired:
        lines.append(f"\npaired difference in macro accuracy, {paired['best']} minus each peer [95% interval]")
        for peer, diff in paired["against"].items():
            lines.append(f"  {peer[:60]:<62}{diff['difference']:>+8.3f}  [{diff['low']:+.3f}, {diff['high']:+.3f}]")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """The expert x task matrix and the rows as Markdown tables, to paste into the docs unchanged."""
    tasks = summary["tasks"]
    header = "| " + " | ".join(f"`{t}`" for t in tasks)
    out = []
    if "expert_matrix" in summary:
        out += ["| expert \\ task " + header + " |", "|---" * (len(tasks) + 1) + "|"]
        for group, values in summary["expert_matrix"].items():
            out.append(f"| {group} | " + " | ".join(f"{values[t]:.3f}" for t in tasks) + " |")
        out.append("")
    out += ["| row " + header + " | macro [95% CI] | /oracle |", "|---" * (len(tasks) + 3) + "|"]
    for group, row in summary["rows"].items():
        std = "" if row["macro_std_over_seeds"] is None else f" (+-{row['macro_std_over_seeds']:.3f} over seeds)"
        share = "" if row["oracle_gain_share"] is None else f"{row['oracle_gain_share']:.2f}"
        low, high = row["ci95"]
        cells = " | ".join(f"{row['per_task'][t]:.3f}" for t in tasks)
        out.append(f"| {group} | {cells} | {row['macro']:.3f} [{low:.3f}, {high:.3f}]{std} | {share} |")
    paired = summary["paired_vs_best_mixer"]
    if paired:
        out += ["", f"| {paired['best']} minus | difference in macro | paired 95% CI |", "|---|---|---|"]
        for peer, diff in paired["against"].items():
            out.append(f"| {peer} | {diff['difference']:+.3f} | [{diff['low']:+.3f}, {diff['high']:+.3f}] |")
    return "\n".join(out) + "\n"


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
    axis.set_xlabel("router-train examples")
    axis.set_ylabel("macro accuracy, held-out")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)
