"""Where Ray is applied: the learner and rollout workers become actors here, and metrics go to
`ray.util.metrics`. Everything below these thin wrappers is plain Python, testable without a cluster."""
from __future__ import annotations

import os
from typing import Any, Optional

import ray
from ray.util import metrics as ray_metrics

from learner.learner import Learner
from rollout_workers.worker import RolloutWorker
from shared.metrics import METRICS, MetricsSink

RAY_CALL_TIMEOUT_S = float(os.environ.get("BUDGETCTL_RAY_CALL_TIMEOUT_S", "120"))


class RayMetricsSink(MetricsSink):
    """MetricsSink over ray.util.metrics (exported by each node's metrics agent as `ray_<name>`)."""

    def __init__(self):
        self._objs: dict[str, Any] = {}

    def _get(self, name: str):
        if name not in self._objs:
            kind, desc, tags, bounds = METRICS[name]
            if kind == "counter":
                self._objs[name] = ray_metrics.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                self._objs[name] = ray_metrics.Gauge(name, description=desc, tag_keys=tags)
            else:
                self._objs[name] = ray_metrics.Histogram(name, description=desc, boundaries=bounds, tag_keys=tags)
        return self._objs[name]

    def inc(self, name, value=1.0, tags=None):
        if value > 0:
            self._get(name).inc(value, tags=tags or None)

    def set(self, name, value, tags=None):
        self._get(name).set(float(value), tags=tags or None)

    def observe(self, name, value, tags=None):
        self._get(name).observe(float(value), tags=tags or None)


class LearnerActor(Learner):
    """The learner as an actor: weights are published with one ray.put of numpy arrays per update."""

    def __init__(self, cfg, run_dir, train_ids, val_ids, backend_info, resume=False):
        super().__init__(cfg, run_dir, train_ids, val_ids, backend_info, resume=resume, publish=ray.put,
                         metrics=RayMetricsSink())

    def pid(self) -> int:
        return os.getpid()


class _RayPending:
    """A learner call in flight: its object ref, read with the client's timeout."""

    def __init__(self, ref, timeout_s: float):
        self.ref = ref
        self.timeout_s = timeout_s

    def done(self) -> bool:
        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self):
        return ray.get(self.ref, timeout=self.timeout_s)


class RayLearnerClient:
    """LearnerClient over a learner actor handle; every ray.get has a timeout."""

    def __init__(self, handle, timeout_s: float = RAY_CALL_TIMEOUT_S):
        self.h = handle
        self.timeout_s = timeout_s

    def _get(self, ref):
        return ray.get(ref, timeout=self.timeout_s)

    def register_worker(self, worker_id):
        return self._get(self.h.register_worker.remote(worker_id))

    def next_task_async(self, worker_id):
        return _RayPending(self.h.next_task.remote(worker_id), self.timeout_s)

    def submit_group_async(self, worker_id, sample_id, rows, failures):
        return _RayPending(self.h.submit_group.remote(worker_id, sample_id, rows, list(failures)), self.timeout_s)

    def pull_weights(self, known_version):
        return self._get(self.h.weights.remote(known_version))

    def resolve(self, ref):
        return self._get(ref) if isinstance(ref, ray.ObjectRef) else ref

    def submit_validation(self, worker_id, round_id, sample_id, budget_ms, result):
        return self._get(self.h.submit_validation.remote(worker_id, round_id, sample_id, budget_ms, result))


class RolloutWorkerActor(RolloutWorker):
    def __init__(self, cfg, worker_id: int):
        super().__init__(cfg, worker_id, metrics=RayMetricsSink())

    def run(self, learner_handle, max_groups: Optional[int] = None) -> dict:
        return self.run_loop(RayLearnerClient(learner_handle), max_groups=max_groups)

    def pid(self) -> int:
        return os.getpid()


def make_learner(cfg, run_dir, train_ids, val_ids, backend_info, resume: bool):
    cls = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=0)(LearnerActor)
    return cls.remote(cfg, run_dir, train_ids, val_ids, backend_info, resume)


def make_workers(cfg, num_workers: int, use_gpu: bool, env_vars: Optional[dict] = None) -> list:
    cls = ray.remote(RolloutWorkerActor)
    opts = {"num_cpus": 1, "num_gpus": cfg.system.gpus_per_worker if use_gpu else 0,
            "max_restarts": cfg.system.max_worker_restarts, "max_task_retries": 0}
    if env_vars:
        opts["runtime_env"] = {"env_vars": env_vars}
    return [cls.options(**opts, name=None).remote(cfg, i) for i in range(num_workers)]
