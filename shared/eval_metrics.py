"""Evaluation metrics (pure numpy): per-policy summaries, bootstrap intervals and the lookup table.

Used by `jobs/evaluate.py`. Every function takes plain arrays, one entry per evaluated sample:

- accuracy [N]: the scorer's value of each answer (0..1);
- latency_ms [N]: end-to-end latency of each request.

Definitions (DESIGN.md section 6, issue 7):
- attainment = share of requests with latency <= budget;
- mean overrun = mean of (latency - budget) over the violations only (None when there are none);
- a static combination "meets" a budget when its p95 latency on the PROFILING split is <= the budget;
- lookup table = per budget, the combination with the best profiling accuracy among those that meet it
  (none meets: the one with the lowest profiling p95, flagged `fits = False`).

Pure module: numpy only.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def bootstrap_ci(values: np.ndarray, *, num_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` [N] (resampling the N samples).

    Returns (low, high); (nan, nan) for an empty array. Deterministic for a given seed.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(num_resamples, v.size))
    means = v[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha)))


def paired_diff_ci(a: np.ndarray, b: np.ndarray, **kw) -> dict:
    """Mean of a - b over the same samples [N], with its paired bootstrap interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, **kw)
    return {"diff": float(d.mean()) if d.size else math.nan, "ci": [lo, hi]}


def p95(latency_ms: np.ndarray) -> float:
    """95th percentile (linear interpolation), nan for an empty array."""
    v = np.asarray(latency_ms, dtype=np.float64)
    return float(np.quantile(v, 0.95)) if v.size else math.nan


def policy_metrics(accuracy: np.ndarray, latency_ms: np.ndarray, budget_ms: float, *,
                   num_resamples: int = 1000, seed: int = 0) -> dict:
    """Summary of one policy at one budget.

    Args:
        accuracy: [N] per-request accuracy.
        latency_ms: [N] per-request latency.
        budget_ms: the budget the requests were served under.
    Returns:
        dict with n, accuracy, accuracy_ci [low, high], attainment, violations, mean_latency_ms,
        p95_latency_ms, mean_overrun_ms (None without violations), mean_overrun_rel (overrun / budget).
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    lat = np.asarray(latency_ms, dtype=np.float64)
    if acc.shape != lat.shape:
        raise ValueError(f"accuracy {acc.shape} and latency {lat.shape} must have the same shape")
    n = int(acc.size)
    over = lat > budget_ms
    viol = int(over.sum())
    lo, hi = bootstrap_ci(acc, num_resamples=num_resamples, seed=seed)
    return {
        "n": n,
        "accuracy": float(acc.mean()) if n else math.nan,
        "accuracy_ci": [lo, hi],
        "attainment": float(1.0 - viol / n) if n else math.nan,
        "violations": viol,
        "mean_latency_ms": float(lat.mean()) if n else math.nan,
        "p95_latency_ms": p95(lat),
        "mean_overrun_ms": float((lat[over] - budget_ms).mean()) if viol else None,
        "mean_overrun_rel": float(((lat[over] - budget_ms) / budget_ms).mean()) if viol else None,
    }


def lookup_choice(profile_accuracy: Sequence[float], profile_p95_ms: Sequence[float],
                  budget_ms: float) -> tuple[int, bool]:
    """The lookup table's entry for one budget: (combination index, fits).

    Among combinations whose profiling p95 fits the budget, the best profiling accuracy (ties: the lower
    p95, then the lower index). If none fits, the combination with the lowest profiling p95 and False.
    """
    acc = np.asarray(profile_accuracy, dtype=np.float64)
    q = np.asarray(profile_p95_ms, dtype=np.float64)
    if acc.size == 0 or acc.shape != q.shape:
        raise ValueError("lookup_choice needs equal, non-empty accuracy and p95 arrays")
    fits = np.flatnonzero(q <= budget_ms)
    if fits.size == 0:
        return int(np.argmin(q)), False
    best = min(fits, key=lambda i: (-acc[i], q[i], i))
    return int(best), True


def best_meeting(test_accuracy: Sequence[float], profile_p95_ms: Sequence[float],
                 budget_ms: float) -> Optional[int]:
    """The static combination with the best TEST accuracy among those that meet the budget (an oracle
    over the static set, the comparison target of issue 7); None when no combination meets it."""
    acc = np.asarray(test_accuracy, dtype=np.float64)
    q = np.asarray(profile_p95_ms, dtype=np.float64)
    fits = np.flatnonzero(q <= budget_ms)
    if fits.size == 0:
        return None
    return int(min(fits, key=lambda i: (-acc[i], q[i], i)))


def knob_distribution(knobs: Sequence[dict], names: Sequence[str] = ("tier", "p", "top_k", "num_blocks"),
                      top: int = 5) -> dict:
    """Marginal counts of each knob's values and the `top` most frequent joint settings.

    Args:
        knobs: one dict per request with the knob values under `names`.
    """
    out: dict = {name: {} for name in names}
    joint: dict[str, int] = {}
    for k in knobs:
        for name in names:
            key = str(k[name])
            out[name][key] = out[name].get(key, 0) + 1
        j = "/".join(f"{name}={k[name]}" for name in names)
        joint[j] = joint.get(j, 0) + 1
    for name in names:
        out[name] = dict(sorted(out[name].items(), key=lambda kv: _sort_key(kv[0])))
    out["top_joint"] = [{"knobs": j, "count": c} for j, c in
                        sorted(joint.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    return out


def _sort_key(v: str):
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)
