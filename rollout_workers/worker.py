"""RolloutWorker: a plain class (jobs/actors.py makes it a Ray actor with one GPU, or none on CPU).

It loads its backend once, warms up, then loops: take the next task; for a train task lease the one
after it (so the answer is there when this group ends), bring the controller weights up to the version
the learner had when it leased this task, draw a budget and run the group's G rollouts one at a time,
then send the group's records without waiting for the answer; for a validation task run one greedy
rollout under the weights the task names.

Why the pipelining: the learner is one actor that serves calls in order, and the worker whose group
completes a batch would otherwise wait for the GRPO update, the Parquet write and the weight publish
(~40 ms), and every other worker's next call would queue behind them. With the next task leased ahead and
the records sent asynchronously, a worker goes straight from one group to the next. A task leased ahead
names the version before an update that lands meanwhile, so its group may run one version behind (the
learner's importance ratio accounts for it; `grpo.max_policy_lag` bounds it). Admission control allows
the one group ahead (`system.max_inflight_groups_per_worker` >= 2; with 1 the lease ahead is answered
"wait" and the loop asks again after the group). `system.lease_ahead: false` restores the unpipelined order
(next task asked after the records are sent, newest weights pulled before every group): with 2 CPU workers
it runs 12% of rows one version behind instead of 37%.

It never imports Ray: the learner is reached through a client object (the Ray client calls `ray.get` with
timeouts and returns pending calls as object refs; tests pass the plain Learner, whose calls run at once
in the order the worker makes them, the order an actor serves them in).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Optional, Protocol

import torch

from rollout_workers.backends import make_backend
from shared.backend import SampleError, run_group, rollout_inputs, score_outcome
from shared.budgets import BudgetSampler
from shared.controller import TwoStageController, UniformStream
from shared.datasets import load_samples
from shared.metrics import MetricsSink
from shared.rewards import reward_fn_from_config

log = logging.getLogger(__name__)


class Pending(Protocol):
    """A learner call that was sent and may not have been answered yet."""
    def done(self) -> bool: ...
    def result(self) -> Any: ...


class Answered:
    """A call answered when it was made (the in-process client)."""

    def __init__(self, value: Any):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value


class LearnerClient(Protocol):
    def register_worker(self, worker_id: int) -> dict: ...
    def next_task_async(self, worker_id: int) -> Pending: ...
    def submit_group_async(self, worker_id: int, sample_id: str, rows: list, failures: list) -> Pending: ...
    def pull_weights(self, known_version: int) -> Optional[tuple[int, dict]]: ...
    def resolve(self, ref: Any) -> dict: ...
    def submit_validation(self, worker_id: int, round_id: int, sample_id: str, budget_ms: float,
                          result: Optional[dict]) -> None: ...


class DirectClient:
    """LearnerClient over an in-process Learner (tests, local mode)."""

    def __init__(self, learner):
        self.learner = learner

    def register_worker(self, worker_id):
        return self.learner.register_worker(worker_id)

    def next_task_async(self, worker_id):
        return Answered(self.learner.next_task(worker_id))

    def submit_group_async(self, worker_id, sample_id, rows, failures):
        return Answered(self.learner.submit_group(worker_id, sample_id, rows, failures))

    def pull_weights(self, known_version):
        return self.learner.weights(known_version)

    def resolve(self, ref):
        return ref

    def submit_validation(self, worker_id, round_id, sample_id, budget_ms, result):
        return self.learner.submit_validation(worker_id, round_id, sample_id, budget_ms, result)


class RolloutWorker:
    def __init__(self, cfg, worker_id: int, metrics: Optional[MetricsSink] = None):
        self.cfg = cfg
        self.worker_id = worker_id
        self.metrics = metrics or MetricsSink()
        torch.set_num_threads(cfg.system.torch_threads)
        self.backend = make_backend(cfg, worker_id)
        info = self.backend.info()
        self.controller = TwoStageController.from_config(cfg, self.backend.space, token_rms=info.token_rms)
        self.val_controller = TwoStageController.from_config(cfg, self.backend.space, token_rms=info.token_rms)
        self.samples = {s.sample_id: s for split in ("train", "val") for s in load_samples(cfg, split)}
        self.budgets = BudgetSampler(cfg.budget, seed=cfg.system.seed * 7919 + worker_id + 1)
        # the act path's draws, fetched in blocks (one torch call per 256 draws instead of one per stage)
        self.generator = UniformStream(torch.Generator().manual_seed(cfg.system.seed * 104729 + worker_id))
        self.reward_fn = reward_fn_from_config(cfg.reward)
        self.version = -1
        self.groups_done = 0
        t0 = time.monotonic()
        self.backend.warmup(cfg.system.warmup_rollouts, self.controller)
        self.warmup_s = time.monotonic() - t0

    def warmup_info(self) -> dict:
        """Wall time of the warm-up and the engine's report (graphs captured, compile fallbacks)."""
        return {"worker_id": self.worker_id, "warmup_s": self.warmup_s,
                "engine_report": getattr(self.backend, "warmup_report", None)}

    def info(self) -> dict:
        return vars(self.backend.info())

    def sample_ids(self) -> tuple[list[str], list[str]]:
        train = [s.sample_id for s in load_samples(self.cfg, "train")]
        val = [s.sample_id for s in load_samples(self.cfg, "val")]
        return train, val

    def _sync_weights(self, client: LearnerClient) -> None:
        got = client.pull_weights(self.version)
        if got is not None:
            version, ref = got
            self.controller.set_weights(client.resolve(ref))
            self.version = version

    def run_loop(self, client: LearnerClient, max_groups: Optional[int] = None, idle_sleep_s: float = 0.02) -> dict:
        """Serve tasks until the learner says stop (or `max_groups` train groups are done); module docstring
        for the pipelining. Returns when every sent group has been answered."""
        if max_groups is not None and max_groups <= 0:
            return {"worker_id": self.worker_id, "groups": self.groups_done, "policy_version": self.version}
        client.register_worker(self.worker_id)
        self._sync_weights(client)
        tags = {"worker": str(self.worker_id)}
        sent: deque = deque()                        # submit_group calls not yet answered
        ahead = bool(self.cfg.system.lease_ahead)
        pending = client.next_task_async(self.worker_id)
        while max_groups is None or self.groups_done < max_groups:
            task = pending.result()
            kind = task["kind"]
            if kind == "stop":
                break
            if kind == "wait":
                time.sleep(idle_sleep_s)
                pending = client.next_task_async(self.worker_id)
                continue
            if kind == "val":
                client.submit_validation(self.worker_id, task["round"], task["sample_id"], task["budget_ms"],
                                         self._validate(client, task))
                pending = client.next_task_async(self.worker_id)
                continue
            # lease the next task while this group runs (not after the last group `max_groups` allows: a
            # lease nobody runs would hold its sample until this worker registers again)
            more = max_groups is None or self.groups_done + 1 < max_groups
            pending = client.next_task_async(self.worker_id) if more and ahead else None
            if self.version < task["policy_version"] or not ahead:
                self._sync_weights(client)
            self._run_train_group(client, task, tags, sent)
            while sent and sent[0].done():           # surface the learner's errors early
                sent.popleft().result()
            if more and not ahead:                   # asked after the records: it waits for their answer
                pending = client.next_task_async(self.worker_id)
        while sent:                                  # every group answered before returning
            sent.popleft().result()
        return {"worker_id": self.worker_id, "groups": self.groups_done, "policy_version": self.version}

    def _run_train_group(self, client: LearnerClient, task: dict, tags: dict, sent: deque) -> None:
        sample = self.samples[task["sample_id"]]
        budget = self.budgets.draw()
        res = run_group(self.backend, sample, budget, self.controller, self.reward_fn,
                        group_size=self.cfg.grpo.group_size, group_id=f"{sample.sample_id}@{budget:.3f}",
                        worker_id=self.worker_id, policy_version=self.version, generator=self.generator)
        rows = [r.to_row() for r in res.records]
        self.metrics.inc("budgetctl_groups", 1, tags)
        self.metrics.inc("budgetctl_rollouts", len(rows), tags)
        if res.failures:
            self.metrics.inc("budgetctl_failed_rollouts", len(res.failures), tags)
        for r in rows:
            self.metrics.observe("budgetctl_rollout_latency_ms", r["latency_ms"], tags)
            if not r["within_budget"]:
                self.metrics.inc("budgetctl_budget_violations", 1, tags)
        sent.append(client.submit_group_async(self.worker_id, sample.sample_id, rows, res.failures))
        self.groups_done += 1

    def _validate(self, client: LearnerClient, task: dict) -> Optional[dict]:
        """One greedy rollout under the weights the validation round names; None if it fails."""
        self.val_controller.set_weights(client.resolve(task["weights"]))
        sample = self.samples[task["sample_id"]]
        try:
            out = self.backend.run(sample, task["budget_ms"], self.val_controller, greedy=True)
            acc = score_outcome(out, sample)
            reward = self.reward_fn(rollout_inputs(out, acc, self.backend.space))
        except (SampleError, ValueError, RuntimeError) as exc:
            log.warning("validation rollout failed on %s: %s", task["sample_id"], exc)
            return None
        return {"reward": reward, "accuracy": acc, "within_budget": out.latency_ms <= task["budget_ms"],
                "latency_ms": out.latency_ms}
