"""Metric names and a sink interface (pure). The Ray implementation (`ray.util.metrics`) lives in
jobs/actors.py; plain classes emit through a `MetricsSink`, so they test without a cluster.

Ray exports application metrics with a `ray_` prefix on the node's metrics endpoint, e.g.
`ray_budgetctl_rollouts`. Counter names never end in `_total` (Prometheus would add it again).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

# name -> (kind, description, tag keys, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], Optional[list[float]]]] = {
    "budgetctl_rollouts": ("counter", "Rollouts completed and sent to the learner", ("worker",), None),
    "budgetctl_groups": ("counter", "GRPO groups completed by rollout workers", ("worker",), None),
    "budgetctl_failed_rollouts": ("counter", "Rollouts that failed and were dropped (never scored)", ("worker",), None),
    "budgetctl_budget_violations": ("counter", "Rollouts whose end-to-end latency exceeded the budget", ("worker",),
                                    None),
    "budgetctl_rollout_latency_ms": ("histogram", "End-to-end rollout latency (ms)", ("worker",),
                                     [5, 10, 20, 50, 100, 150, 200, 250, 300, 400, 500, 750, 1000, 2000, 5000]),
    "budgetctl_reward": ("gauge", "Mean reward of the last update's batch", (), None),
    "budgetctl_accuracy": ("gauge", "Mean accuracy of the last update's batch", (), None),
    "budgetctl_attainment": ("gauge", "Share of the last batch within budget", (), None),
    "budgetctl_policy_version": ("gauge", "Controller policy version published by the learner", (), None),
    "budgetctl_learner_update_ms": ("gauge", "Wall time of the last GRPO update (ms)", (), None),
    "budgetctl_broadcast_ms": ("gauge", "Time to publish the last weights (ray.put) (ms)", (), None),
    "budgetctl_learner_idle_fraction": ("gauge", "Share of learner wall time not spent updating", (), None),
    "budgetctl_rollouts_per_s": ("gauge", "Rollouts per second over the last update interval", (), None),
    "budgetctl_dropped_groups": ("counter", "Groups dropped (reason: lag, failed, worker_died)", ("reason",), None),
    "budgetctl_worker_restarts": ("counter", "Rollout worker restarts seen by the learner", (), None),
}


class MetricsSink:
    """Does nothing; subclasses forward to a backend."""

    def inc(self, name: str, value: float = 1.0, tags: Optional[dict] = None) -> None:
        pass

    def set(self, name: str, value: float, tags: Optional[dict] = None) -> None:
        pass

    def observe(self, name: str, value: float, tags: Optional[dict] = None) -> None:
        pass


class RecordingSink(MetricsSink):
    """Keeps values in memory (tests and the job's summary)."""

    def __init__(self):
        self.counters: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, float] = {}
        self.observations: dict[str, list[float]] = defaultdict(list)

    def inc(self, name, value=1.0, tags=None):
        _check(name)
        self.counters[name] += value

    def set(self, name, value, tags=None):
        _check(name)
        self.gauges[name] = float(value)

    def observe(self, name, value, tags=None):
        _check(name)
        self.observations[name].append(float(value))


def _check(name: str) -> None:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name}")
