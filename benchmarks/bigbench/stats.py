"""Macro averages with 95% bootstrap intervals, per row and for paired differences between rows.

Examples are resampled within each task (the tasks are fixed, their examples a sample), the same resample for
both rows of a pair, so the interval of a difference holds the pairing. A row run with several seeds enters as
each example's mean score over the seeds.
"""

from __future__ import annotations

import numpy as np

Scores = dict[str, dict[str, float]]  # task -> example id -> score in [0, 1]


def macro(scores: Scores) -> float:
    return float(np.mean([np.mean(list(task.values())) for task in scores.values()]))


def seed_mean(runs: list[Scores]) -> Scores:
    """Each example's mean score over the runs (seeds) of one row."""
    return {task: {i: float(np.mean([run[task][i] for run in runs])) for i in runs[0][task]} for task in runs[0]}


def _resampled_macros(rows: list[Scores], iterations: int, seed: int) -> np.ndarray:
    """Macro average of every row under the same `iterations` resamples: shape (len(rows), iterations)."""
    rng = np.random.default_rng(seed)
    totals = np.zeros((len(rows), iterations))
    for task in rows[0]:
        ids = sorted(rows[0][task])
        values = np.array([[row[task][i] for i in ids] for row in rows])
        picks = rng.integers(0, len(ids), size=(iterations, len(ids)))
        totals += values[:, picks].mean(-1)
    return totals / len(rows[0])


def interval(scores: Scores, iterations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the macro average."""
    low, high = np.percentile(_resampled_macros([scores], iterations, seed)[0], [2.5, 97.5])
    return float(low), float(high)


def paired_difference(a: Scores, b: Scores, iterations: int = 2000, seed: int = 0) -> dict[str, float]:
    """Macro(a) - macro(b) and its 95% paired bootstrap interval."""
    first, second = _resampled_macros([a, b], iterations, seed)
    low, high = np.percentile(first - second, [2.5, 97.5])
    return {"difference": macro(a) - macro(b), "low": float(low), "high": float(high)}
