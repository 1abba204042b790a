"""The central learner (plain class; jobs/actors.py makes it a Ray actor with max_concurrency 1, so its
torch state is never touched by two threads at once).

It is the run's single source of truth:
- hands out tasks (train groups, validation rollouts) from the `SampleDispenser`, with admission control:
  a worker holds at most `max_inflight_groups_per_worker` leased-but-unsubmitted groups, which bounds
  staleness without dropping slow (expensive-knob) groups, and no group is leased once the buffered and
  leased ones suffice for the remaining updates (workers lease one group ahead: without this rule each
  would run one group for nothing at the end);
- accepts groups, drops only those past the hard lag bound `grpo.max_policy_lag` (counted; their sample
  is handed out again, so no data is skipped);
- runs a GRPO update every `groups_per_update` groups, commits their samples, appends their rows to
  `records/part-{step}.parquet`, bumps the policy version and publishes the weights once (`publish`:
  ray.put in the actor, identity in tests);
- checkpoints (controller, optimizer, RNG, dispenser, counters) and keeps the best-by-validation copy.

On resume, record files of steps at or after the checkpoint's step are superseded (deleted): those
groups were not committed in the checkpoint's dispenser state and will be produced again.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from learner.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint,
                                save_controller_copy)
from learner.dispenser import SampleDispenser
from learner.trainer import GRPOTrainer
from shared.config import dump_config, to_dict
from shared.controller import TwoStageController
from shared.knobs import KnobSpace
from shared.metrics import MetricsSink
from shared.records import rows_to_table, write_parquet_atomic

log = logging.getLogger(__name__)


def _filter_jsonl(path: Path, keep: Callable[[int, dict], bool]) -> None:
    """Rewrite a JSON-lines file keeping the lines for which keep(index, record) holds; unparseable
    lines (a write torn by a crash) are dropped."""
    if not path.exists():
        return
    out = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and keep(len(out), rec):
            out.append(ln)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in out))
    tmp.replace(path)


class LearnerError(RuntimeError):
    """The run cannot continue (no workers, no progress); the message says why."""


class Learner:
    """GRPO learner, task dispenser and record writer.

    Args:
        cfg: the RunConfig.
        run_dir: run folder (config, records, checkpoints, bundle).
        train_ids: sample ids of the training split.
        val_ids: sample ids of the held-out split (greedy validation).
        backend_info: `BackendInfo` fields as a dict (token_rms and d_model are used here).
        resume: continue from the run folder's latest checkpoint.
        publish: called with the numpy weights once per update; its return value is what workers pull.
        metrics: metrics sink.
    """

    def __init__(self, cfg, run_dir: str, train_ids: Sequence[str], val_ids: Sequence[str], backend_info: dict,
                 *, resume: bool = False, publish: Optional[Callable[[dict], Any]] = None,
                 metrics: Optional[MetricsSink] = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.records_dir = self.run_dir / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.backend_info = dict(backend_info)
        self.metrics = metrics or MetricsSink()
        self.clock = clock
        self._publish = publish or (lambda w: w)
        torch.manual_seed(cfg.system.seed)
        space = KnobSpace.from_config(cfg.knobs, cfg.model)
        self.controller = TwoStageController.from_config(cfg, space, token_rms=float(backend_info["token_rms"]))
        self.trainer = GRPOTrainer(self.controller, cfg.grpo, seed=cfg.system.seed,
                                   total_updates=cfg.system.total_updates)
        self.dispenser = SampleDispenser(list(train_ids), seed=cfg.system.seed)
        self.val_ids = list(val_ids)
        # Bookkeeping
        self.inflight: dict[int, set[str]] = {}           # worker -> leased train sample ids not yet submitted
        self.buffer: deque[dict] = deque()                  # accepted groups awaiting an update
        self.counters = {"rollouts": 0, "groups": 0, "failed_rollouts": 0, "dropped_lag": 0, "dropped_failed": 0,
                         "dropped_worker_died": 0, "worker_restarts": 0, "violations": 0, "bad_samples": 0}
        self.registered: set[int] = set()
        self.val_pending: deque[tuple[str, float]] = deque()
        self.val_leases: dict[tuple[str, float], int] = {}
        self.val_results: dict[tuple[str, float], dict] = {}
        self.val_round = -1
        self.val_ref: Any = None
        self.best_val_reward = -math.inf
        self.val_history: list[dict] = []
        self.history: list[dict] = []
        self.started = self.clock()
        self.last_group_at = self.clock()
        self.update_time_s = 0.0
        self.done = False
        self.last_progress: dict = {}
        if resume:
            self._resume()
        else:
            dump_config(cfg, self.run_dir / "config.yaml")
        self._weights_ref = None
        self._publish_weights()

    # ------------------------------------------------------------------------------------------
    # Worker protocol
    # ------------------------------------------------------------------------------------------
    def register_worker(self, worker_id: int) -> dict:
        """A worker (re)starts. A restart drops its unfinished groups (counted) and re-dispenses them."""
        if worker_id in self.registered:
            self.counters["worker_restarts"] += 1
            self.metrics.inc("budgetctl_worker_restarts")
            lost = self.inflight.pop(worker_id, set())
            for sid in lost:
                self.dispenser.release(sid)
            if lost:
                self.counters["dropped_worker_died"] += len(lost)
                self.metrics.inc("budgetctl_dropped_groups", len(lost), {"reason": "worker_died"})
            for key, w in list(self.val_leases.items()):
                if w == worker_id:
                    del self.val_leases[key]
                    self.val_pending.appendleft(key)
        self.registered.add(worker_id)
        self.inflight.setdefault(worker_id, set())
        return {"policy_version": self.trainer.policy_version}

    def next_task(self, worker_id: int) -> dict:
        """The worker's next task: {"kind": "train"|"val"|"wait"|"stop", ...}."""
        if self.val_pending:
            key = self.val_pending.popleft()
            self.val_leases[key] = worker_id
            return {"kind": "val", "sample_id": key[0], "budget_ms": key[1], "round": self.val_round,
                    "weights": self.val_ref}
        if self.done or self.trainer.step >= self.cfg.system.total_updates:
            return {"kind": "wait"} if self.val_leases else {"kind": "stop"}
        if len(self.inflight.setdefault(worker_id, set())) >= self.cfg.system.max_inflight_groups_per_worker:
            return {"kind": "wait"}
        if self.groups_still_needed() <= 0:
            # enough groups are buffered or in flight to finish training: a new one would be run for nothing
            # (a submitted group that fails or is dropped is leased again)
            return {"kind": "wait"}
        sid = self.dispenser.lease(worker_id)
        if sid is None:
            return {"kind": "wait"}
        self.inflight[worker_id].add(sid)
        return {"kind": "train", "sample_id": sid, "policy_version": self.trainer.policy_version}

    def groups_still_needed(self) -> int:
        """Train groups that no worker holds yet and the remaining updates need."""
        remaining = (self.cfg.system.total_updates - self.trainer.step) * self.cfg.grpo.groups_per_update
        return remaining - len(self.buffer) - sum(len(v) for v in self.inflight.values())

    def weights(self, known_version: int) -> Optional[tuple[int, Any]]:
        """(version, published weights) when newer than `known_version`, else None."""
        if known_version >= self.trainer.policy_version:
            return None
        return self.trainer.policy_version, self._weights_ref

    def submit_group(self, worker_id: int, sample_id: str, rows: list[dict], failures: Sequence[str] = ()) -> dict:
        """A worker's finished group. Empty `rows` means the group was dropped (failed rollouts)."""
        self.last_group_at = self.clock()
        self.inflight.setdefault(worker_id, set()).discard(sample_id)
        if self.done or self.trainer.step >= self.cfg.system.total_updates:
            # Training is over (or stopping): a late group is not trained on, so its sample stays
            # uncommitted and a resume hands it out again. Not a drop: nothing was lost.
            self.dispenser.release(sample_id)
            return {"accepted": False, "reason": "stopped"}
        # The worker already emitted budgetctl_failed_rollouts for these (like rollouts and groups);
        # emitting it here too would double the exported count.
        self.counters["failed_rollouts"] += len(failures)
        if not rows:
            self.counters["dropped_failed"] += 1
            self.counters["bad_samples"] += 1
            self.metrics.inc("budgetctl_dropped_groups", 1, {"reason": "failed"})
            # A sample whose every rollout fails is bad input: commit it as skipped so the run moves on.
            self.dispenser.commit(sample_id)
            self._append_bad_sample(sample_id, failures)
            return {"accepted": False, "reason": "failed"}
        lag = self.trainer.policy_version - min(int(r["policy_version"]) for r in rows)
        if lag > self.cfg.grpo.max_policy_lag:
            self.counters["dropped_lag"] += 1
            self.metrics.inc("budgetctl_dropped_groups", 1, {"reason": "lag"})
            self.dispenser.release(sample_id)
            return {"accepted": False, "reason": f"lag {lag} > {self.cfg.grpo.max_policy_lag}"}
        self.buffer.append({"sample_id": sample_id, "rows": rows})
        self.counters["groups"] += 1
        self.counters["rollouts"] += len(rows)
        self.counters["violations"] += sum(not r["within_budget"] for r in rows)
        if len(self.buffer) >= self.cfg.grpo.groups_per_update:
            self._update()
        return {"accepted": True, "policy_version": self.trainer.policy_version}

    def submit_validation(self, worker_id: int, round_id: int, sample_id: str, budget_ms: float,
                          result: Optional[dict]) -> None:
        """One greedy validation rollout (None = it failed: counted, excluded from the mean)."""
        self.last_group_at = self.clock()    # progress: a long validation round is not a stall
        key = (sample_id, float(budget_ms))
        self.val_leases.pop(key, None)
        if round_id != self.val_round:
            return
        self.val_results[key] = result or {"failed": True}
        if not self.val_pending and not self.val_leases:
            self._finish_validation()

    # ------------------------------------------------------------------------------------------
    # Updates, records, validation, checkpoints
    # ------------------------------------------------------------------------------------------
    def _update(self) -> None:
        t0 = self.clock()
        groups = [self.buffer.popleft() for _ in range(self.cfg.grpo.groups_per_update)]
        rows = [r for g in groups for r in g["rows"]]
        stats = self.trainer.update(rows)
        step = self.trainer.step - 1                    # rows carry the step that consumed them
        write_parquet_atomic(rows_to_table(rows), self.records_dir / f"part-{step:06d}.parquet")
        for g in groups:
            self.dispenser.commit(g["sample_id"])
        update_s = self.clock() - t0
        self.update_time_s += update_s
        t1 = self.clock()
        self._publish_weights()
        broadcast_ms = (self.clock() - t1) * 1e3
        elapsed = max(self.clock() - self.started, 1e-9)
        stats.update({"update_ms": update_s * 1e3, "broadcast_ms": broadcast_ms, "elapsed_s": elapsed,
                      "learner_idle_fraction": 1.0 - self.update_time_s / elapsed,
                      **{f"count_{k}": float(v) for k, v in self.counters.items()},
                      "committed_samples": float(self.dispenser.committed_total),
                      "epoch": float(self.dispenser.epoch)})
        prev = self.history[-1] if self.history else None
        dt = elapsed - (prev["elapsed_s"] if prev else 0.0)
        stats["rollouts_per_s"] = len(rows) / max(dt, 1e-9)
        self.history.append(stats)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(stats) + "\n")
        m = self.metrics
        m.set("budgetctl_reward", stats["reward_mean"])
        m.set("budgetctl_accuracy", stats["accuracy_mean"])
        m.set("budgetctl_attainment", stats["attainment"])
        m.set("budgetctl_policy_version", self.trainer.policy_version)
        m.set("budgetctl_learner_update_ms", stats["update_ms"])
        m.set("budgetctl_broadcast_ms", broadcast_ms)
        m.set("budgetctl_learner_idle_fraction", stats["learner_idle_fraction"])
        m.set("budgetctl_rollouts_per_s", stats["rollouts_per_s"])
        self.last_progress = stats
        sysc = self.cfg.system
        if self.trainer.step % sysc.checkpoint_every == 0 or self.trainer.step >= sysc.total_updates:
            self.checkpoint()
        if sysc.validate_every and self.val_ids and self.trainer.step % sysc.validate_every == 0:
            self._start_validation()
        if self.trainer.step >= sysc.total_updates and not self.val_pending and not self.val_leases:
            self.done = True

    def _publish_weights(self) -> None:
        self._weights_ref = self._publish(self.controller.get_weights())

    def _val_budgets(self) -> list[float]:
        b = self.cfg.budget
        return [float(x) for x in np.linspace(b.min_ms, b.max_ms, 3)]

    def _start_validation(self) -> None:
        self.val_round += 1
        self.val_ref = self._weights_ref
        self.val_version = self.trainer.policy_version
        self.val_state = {k: v.detach().clone() for k, v in self.controller.state_dict().items()}
        self.val_results = {}
        self.val_leases = {}
        self.val_pending = deque((sid, b) for sid in self.val_ids for b in self._val_budgets())

    def _finish_validation(self) -> None:
        ok = [r for r in self.val_results.values() if not r.get("failed")]
        summary = {"round": self.val_round, "policy_version": self.val_version, "rollouts": len(ok),
                   "failed": len(self.val_results) - len(ok),
                   "reward_mean": float(np.mean([r["reward"] for r in ok])) if ok else math.nan,
                   "accuracy_mean": float(np.mean([r["accuracy"] for r in ok])) if ok else math.nan,
                   "attainment": float(np.mean([r["within_budget"] for r in ok])) if ok else math.nan}
        self.val_history.append(summary)
        with open(self.run_dir / "validation.jsonl", "a") as fh:
            fh.write(json.dumps(summary) + "\n")
        if ok and summary["reward_mean"] > self.best_val_reward:
            self.best_val_reward = summary["reward_mean"]
            save_controller_copy(self.run_dir / "best" / "controller.safetensors", self.val_state)
            (self.run_dir / "best" / "validation.json").write_text(json.dumps(summary, indent=1))
        if self.trainer.step >= self.cfg.system.total_updates:
            self.done = True

    def _append_bad_sample(self, sample_id: str, failures: Sequence[str]) -> None:
        with open(self.run_dir / "bad_samples.jsonl", "a") as fh:
            fh.write(json.dumps({"sample_id": sample_id, "step": self.trainer.step, "errors": list(failures)}) + "\n")

    def checkpoint(self) -> Path:
        state_json = {"step": self.trainer.step, "policy_version": self.trainer.policy_version,
                      "dispenser": self.dispenser.state_dict(), "counters": self.counters,
                      "best_val_reward": self.best_val_reward, "val_round": self.val_round,
                      "config": to_dict(self.cfg), "backend_info": self.backend_info}
        return save_checkpoint(self.run_dir, self.trainer.step, self.trainer.state_dict(), state_json)

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise CheckpointError(f"--resume: {self.run_dir} has no checkpoint")
        state, meta = load_checkpoint(path)
        if meta["backend_info"].get("model_id") != self.backend_info.get("model_id") or \
                meta["backend_info"].get("engine") != self.backend_info.get("engine"):
            raise CheckpointError(f"checkpoint {path} was made with {meta['backend_info']}, this run has "
                                  f"{self.backend_info}")
        self.trainer.load_state_dict(state)
        self.dispenser.load_state_dict(meta["dispenser"])
        self.counters.update(meta["counters"])
        self.best_val_reward = meta.get("best_val_reward", -math.inf)
        self.val_round = meta.get("val_round", -1)
        step = self.trainer.step
        for part in self.records_dir.glob("part-*.parquet"):
            if int(part.stem.split("-")[1]) >= step:
                part.unlink()           # superseded: produced after the checkpoint, will be redone
        # Leftovers of writes a crash interrupted (temp names start with '.', nothing reads them).
        for tmp in [*self.records_dir.glob(".part-*.tmp-*"), *(self.run_dir / "checkpoints").glob(".tmp-step-*")]:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        # Side logs are cut back to what the checkpoint knows (a torn last line is dropped too):
        # metrics of updates up to its step, the bad samples it counted (they were appended in
        # counter order), validation rounds up to its round (later ones are numbered again).
        _filter_jsonl(self.run_dir / "metrics.jsonl", lambda i, d: d["step"] <= step)
        _filter_jsonl(self.run_dir / "bad_samples.jsonl", lambda i, d: i < self.counters["bad_samples"])
        _filter_jsonl(self.run_dir / "validation.jsonl", lambda i, d: d["round"] <= self.val_round)
        log.info("resumed from %s at step %d", path, step)

    # ------------------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"step": self.trainer.step, "policy_version": self.trainer.policy_version, "done": self.done,
                "since_last_group_s": self.clock() - self.last_group_at, "counters": dict(self.counters),
                "last": dict(self.last_progress), "buffered_groups": len(self.buffer),
                "best_val_reward": self.best_val_reward,
                "validation": self.val_history[-1] if self.val_history else None}

    def history_rows(self) -> list[dict]:
        return list(self.history)

    def controller_state(self) -> dict[str, np.ndarray]:
        return self.controller.get_weights()

    def stop(self) -> dict:
        """Stop handing out work, checkpoint, and return the status (SIGTERM path and normal end)."""
        self.done = True
        self.checkpoint()
        return self.status()
