"""The plain Learner and RolloutWorker wired together in-process (DirectClient), without Ray.

Covers: admission control, lag drops (counted, re-dispensed), failed groups (bad samples, never
zero-reward rows), worker restarts, the zero-lag importance-ratio check through Parquet, checkpoint /
resume state equality with superseded records, and the exported bundle with metadata checks.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from learner.checkpoint import (CheckpointError, check_bundle_meta, export_bundle, latest_checkpoint,
                                load_bundle, load_checkpoint)
from learner.learner import Learner
from rollout_workers.worker import DirectClient, RolloutWorker
from shared.backend import SampleError, run_group
from shared.config import load_config
from shared.metrics import RecordingSink
from shared.records import read_record_dir

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "jobs" / "configs" / "ci_synthetic.yaml"


def make_cfg(tmp_path, *overrides):
    return load_config(CI_CONFIG, [f"system.run_dir={tmp_path}", *overrides])


def make_pair(cfg, *, resume=False, workers=1, metrics=None):
    ws = [RolloutWorker(cfg, i) for i in range(workers)]
    train, val = ws[0].sample_ids()
    learner = Learner(cfg, cfg.system.run_dir, train, val, ws[0].info(), resume=resume, metrics=metrics)
    return learner, ws


def group_rows(worker: RolloutWorker, sample_id: str, version: int, budget_ms: float = 250.0) -> list[dict]:
    """The rows a worker would send for `sample_id`, stamped with policy `version`."""
    res = run_group(worker.backend, worker.samples[sample_id], budget_ms, worker.controller, worker.reward_fn,
                    group_size=worker.cfg.grpo.group_size, group_id=f"{sample_id}@{budget_ms:.3f}",
                    worker_id=worker.worker_id, policy_version=version, generator=worker.generator)
    return [r.to_row() for r in res.records]


def assert_state_equal(a, b, path="state"):
    """Recursive equality of (optimizer / controller) state dicts, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def check_records(run_dir, cfg, steps: int) -> "pyarrow.Table":  # noqa: F821
    """Committed records: steps 0..steps-1, each a full batch of complete groups; no group twice."""
    table = read_record_dir(Path(run_dir) / "records")
    rows = table.to_pylist()
    g, per_update = cfg.grpo.group_size, cfg.grpo.groups_per_update
    assert sorted(Counter(r["step"] for r in rows)) == list(range(steps))
    assert Counter(r["step"] for r in rows) == {s: g * per_update for s in range(steps)}
    per_group = Counter(r["group_id"] for r in rows)
    assert set(per_group.values()) == {g}, "a group split, repeated or padded"
    assert len({r["group_id"]: r["step"] for r in rows}) == len(per_group)
    # Each group id sits in exactly one step.
    assert all(len({r["step"] for r in rows if r["group_id"] == gid}) == 1 for gid in per_group)
    # No placeholder rows: every row is a real, scored rollout.
    assert all(r["answer"] in ("yes", "no") and r["t_end"] >= r["t_start"] > 0 for r in rows)
    return table


# ----------------------------------------------------------------------------------------------
def test_admission_control(tmp_path):
    cfg = make_cfg(tmp_path, "system.max_inflight_groups_per_worker=2")
    learner, (w,) = make_pair(cfg)
    learner.register_worker(0)
    learner.register_worker(1)
    t1, t2 = learner.next_task(0), learner.next_task(0)
    assert t1["kind"] == t2["kind"] == "train" and t1["sample_id"] != t2["sample_id"]
    for _ in range(3):
        assert learner.next_task(0) == {"kind": "wait"}          # held at 2 in flight
    assert learner.next_task(1)["kind"] == "train"               # another worker is not blocked
    learner.submit_group(0, t1["sample_id"], group_rows(w, t1["sample_id"], 0), [])
    t3 = learner.next_task(0)                                    # a slot freed
    assert t3["kind"] == "train" and t3["sample_id"] not in (t1["sample_id"], t2["sample_id"])
    assert learner.next_task(0) == {"kind": "wait"}


def test_lag_drop_is_counted_and_the_sample_re_dispensed(tmp_path):
    sink = RecordingSink()
    cfg = make_cfg(tmp_path, "grpo.groups_per_update=1", "grpo.max_policy_lag=1", "system.total_updates=10")
    learner, (w0, w1) = make_pair(cfg, workers=2, metrics=sink)
    stale = learner.next_task(0)["sample_id"]
    stale_rows = group_rows(w0, stale, version=0)                # made under version 0 ...
    at_bound = learner.next_task(0)["sample_id"]
    at_bound_rows = group_rows(w0, at_bound, version=1)          # ... and under version 1
    for _ in range(2):                                           # meanwhile worker 1 moves the policy on
        sid = learner.next_task(1)["sample_id"]
        assert learner.submit_group(1, sid, group_rows(w1, sid, learner.trainer.policy_version), [])["accepted"]
    assert learner.trainer.policy_version == 2
    res = learner.submit_group(0, stale, stale_rows, [])         # lag 2 > 1: dropped
    assert res["accepted"] is False and "lag 2" in res["reason"]
    assert learner.counters["dropped_lag"] == 1 and learner.counters["groups"] == 2
    assert sink.counters["budgetctl_dropped_groups"] == 1
    assert learner.next_task(1)["sample_id"] == stale            # handed out again, not skipped
    res = learner.submit_group(0, at_bound, at_bound_rows, [])   # lag 1 == bound: kept (slow != stale)
    assert res["accepted"] is True
    table = read_record_dir(tmp_path / "records")
    assert stale not in set(table.column("sample_id").to_pylist())
    assert at_bound in set(table.column("sample_id").to_pylist())
    # The lagged group's importance ratios moved away from 1 (the zero-lag check below has teeth).
    lagged = [r for r in table.to_pylist() if r["sample_id"] == at_bound]
    assert max(abs(r["ratio_first"] - 1) for r in lagged) > 1e-4


def test_failed_group_is_a_bad_sample_never_zero_reward_rows(tmp_path):
    cfg = make_cfg(tmp_path, "system.total_updates=3", "system.validate_every=0")
    sink = RecordingSink()                                       # one sink for both: no double counting
    learner, (w,) = make_pair(cfg, metrics=sink)
    w.metrics = sink
    bad = learner.dispenser.order[1]                             # the second sample handed out
    flaky = learner.dispenser.order[2]
    real_run = w.backend.run
    calls = Counter()

    def run(sample, budget_ms, controller, **kw):
        calls[sample.sample_id] += 1
        if sample.sample_id == bad:
            raise SampleError("corrupt image (injected)")
        if sample.sample_id == flaky and calls[flaky] == 2:
            raise RuntimeError("transient failure (injected)")
        return real_run(sample, budget_ms, controller, **kw)

    w.backend.run = run
    w.run_loop(DirectClient(learner))
    c = learner.counters
    assert c["bad_samples"] == 1 and c["dropped_failed"] == 1
    assert c["failed_rollouts"] == 2                             # the bad sample's one + the flaky one
    assert calls[bad] == 1                                       # a SampleError stops the group at once
    assert sink.counters["budgetctl_failed_rollouts"] == 2
    assert sink.counters["budgetctl_dropped_groups"] == 1
    lines = [json.loads(ln) for ln in (tmp_path / "bad_samples.jsonl").read_text().splitlines()]
    assert [ln["sample_id"] for ln in lines] == [bad] and "corrupt image" in lines[0]["errors"][0]
    rows = read_record_dir(tmp_path / "records").to_pylist()
    assert bad not in {r["sample_id"] for r in rows}             # no zero-reward stand-ins
    flaky_rows = [r for r in rows if r["sample_id"] == flaky]
    assert len(flaky_rows) == cfg.grpo.group_size - 1            # the failed rollout is missing, not zeroed
    assert sorted(r["rollout_index"] for r in flaky_rows) == [0, 2, 3]
    assert all(r["answer"] in ("yes", "no") for r in rows)
    assert learner.next_task(0)["kind"] == "stop"
    assert learner.dispenser.committed_total == 3 * cfg.grpo.groups_per_update + 1   # the bad one is done


def test_worker_restart_drops_its_unfinished_groups(tmp_path):
    sink = RecordingSink()
    cfg = make_cfg(tmp_path)
    learner, _ = make_pair(cfg, metrics=sink)
    learner.register_worker(0)
    a = learner.next_task(0)["sample_id"]
    b = learner.next_task(1)["sample_id"]
    learner.register_worker(0)                                   # worker 0 came back after a crash
    assert learner.counters["worker_restarts"] == 1 and learner.counters["dropped_worker_died"] == 1
    assert sink.counters["budgetctl_worker_restarts"] == 1
    assert learner.next_task(0)["sample_id"] == a                # its group is produced again
    assert b in learner.dispenser.leases                         # worker 1's lease untouched


def test_zero_lag_ratio_is_one_through_parquet(tmp_path):
    """grpo.lr=0: the recorded behaviour log-prob, recomputed by the learner from recorded features,
    gives an importance ratio of 1 (within 1e-5) for every row written to Parquet."""
    cfg = make_cfg(tmp_path, "grpo.lr=0", "system.total_updates=4")
    learner, (w0, w1) = make_pair(cfg, workers=2)
    client = DirectClient(learner)
    w0.run_loop(client, max_groups=5)                            # two workers, weights pulled between groups
    w1.run_loop(client)
    assert learner.trainer.step == 4
    table = check_records(tmp_path, cfg, 4)
    ratios = table.column("ratio_first").to_pylist()
    assert len(ratios) == 4 * cfg.grpo.groups_per_update * cfg.grpo.group_size
    assert max(abs(r - 1.0) for r in ratios) <= 1e-5
    assert len(set(table.column("policy_version").to_pylist())) > 1   # weights were published and pulled
    assert set(table.column("worker_id").to_pylist()) == {0, 1}


def test_checkpoint_resume_state_equality(tmp_path):
    cfg = make_cfg(tmp_path, "system.total_updates=6", "system.checkpoint_every=2")
    learner, (w,) = make_pair(cfg)
    w.run_loop(DirectClient(learner), max_groups=5 * cfg.grpo.groups_per_update + 1)
    assert learner.trainer.step == 5 and len(learner.buffer) == 1
    # Checkpoint at step 4 (periodic); step 5 and the buffered group happen after it: a crash now loses them.
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000004"
    saved_state, saved_meta = load_checkpoint(ckpt)
    assert (tmp_path / "records" / "part-000004.parquet").exists()

    resumed, (w2,) = make_pair(cfg, resume=True)
    tr = resumed.trainer
    assert (tr.step, tr.policy_version) == (4, 4)
    assert_state_equal(tr.optimizer.state_dict(), saved_state["optimizer"], "optimizer")
    assert_state_equal(tr.controller.state_dict(), saved_state["controller"], "controller")
    assert torch.equal(tr.generator.get_state(), saved_state["rng"]["torch_generator"])
    assert resumed.dispenser.state_dict() == saved_meta["dispenser"]
    assert resumed.counters == saved_meta["counters"]
    # Records and metrics produced after the checkpoint are superseded.
    assert not (tmp_path / "records" / "part-000004.parquet").exists()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # The optimizer really carries moments (not a fresh Adam).
    assert any(s.get("exp_avg") is not None and s["exp_avg"].abs().sum() > 0
               for s in tr.optimizer.state_dict()["state"].values())

    w2.run_loop(DirectClient(resumed))
    assert resumed.trainer.step == 6
    table = check_records(tmp_path, cfg, 6)
    sids = table.column("sample_id").to_pylist()
    per_sample = Counter(sids)
    assert set(per_sample.values()) == {cfg.grpo.group_size}      # no sample twice within the epoch
    # No skip: committed ids are exactly the epoch order up to the cursor, minus those handed back.
    disp = resumed.dispenser
    expected = set(disp.order[:disp.cursor]) - set(disp.released) - set(disp.leases)
    assert set(per_sample) == expected


def test_stop_checkpoints_and_keeps_buffered_groups_for_later(tmp_path):
    cfg = make_cfg(tmp_path, "system.total_updates=6", "system.checkpoint_every=10")
    learner, (w,) = make_pair(cfg)
    w.run_loop(DirectClient(learner), max_groups=2 * cfg.grpo.groups_per_update + 2)
    buffered = [g["sample_id"] for g in learner.buffer]
    assert len(buffered) == 2
    status = learner.stop()                                      # SIGTERM path
    assert status["done"] and status["step"] == 2
    state, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 2
    assert set(buffered) <= set(meta["dispenser"]["released"])   # not committed: produced again on resume


def test_bundle_export_and_mismatched_metadata_refused(tmp_path):
    from jobs.train import bundle_metadata
    cfg = make_cfg(tmp_path)
    learner, (w,) = make_pair(cfg)
    meta = bundle_metadata(cfg, w.info(), learner.trainer.policy_version)
    state = learner.controller.state_dict()
    export_bundle(tmp_path / "bundle", state, meta)
    loaded, got_meta = load_bundle(tmp_path / "bundle", expected=meta)
    assert got_meta["model_id"] == w.info()["model_id"]
    assert_state_equal({k: v for k, v in state.items()}, loaded, "bundle")

    for key, value in [("engine", "fast"), ("device", "NVIDIA H100 80GB HBM3"), ("model_id", "other"),
                       ("budget_norm", [0.0, 1.0]), ("importance_sha256", "0" * 64),
                       ("knob_space", {**meta["knob_space"], "top_ks": [1]})]:
        with pytest.raises(CheckpointError, match=key):
            load_bundle(tmp_path / "bundle", expected={**meta, key: value})
        with pytest.raises(CheckpointError, match="engine- and GPU-specific"):
            check_bundle_meta(got_meta, {**meta, key: value})
    with pytest.raises(CheckpointError, match="lacks"):
        export_bundle(tmp_path / "b2", state, {k: v for k, v in meta.items() if k != "engine"})
    with pytest.raises(CheckpointError, match="not a controller bundle"):
        load_bundle(tmp_path / "nothing-here")


def test_resume_refuses_another_backend_and_a_missing_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "system.total_updates=2", "system.checkpoint_every=1")
    learner, (w,) = make_pair(cfg)
    w.run_loop(DirectClient(learner))
    info = dict(w.info(), model_id="allenai/MolmoE-1B-0924", engine="eager")
    train, val = w.sample_ids()
    with pytest.raises(CheckpointError, match="was made with"):
        Learner(cfg, str(tmp_path), train, val, info, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Learner(make_cfg(tmp_path / "empty"), str(tmp_path / "empty"), train, val, w.info(), resume=True)


def test_corrupt_checkpoint_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, "system.total_updates=1", "system.checkpoint_every=1")
    learner, (w,) = make_pair(cfg)
    w.run_loop(DirectClient(learner))
    ckpt = latest_checkpoint(tmp_path)
    (ckpt / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(ckpt)


def test_validation_writes_a_best_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "system.total_updates=3", "system.validate_every=1")
    learner, (w,) = make_pair(cfg)
    w.run_loop(DirectClient(learner))
    vals = [json.loads(ln) for ln in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [v["round"] for v in vals] == [0, 1, 2]
    assert all(v["rollouts"] == cfg.data.val_samples * 3 for v in vals)
    best = json.loads((tmp_path / "best" / "validation.json").read_text())
    assert best["reward_mean"] == max(v["reward_mean"] for v in vals)
    assert (tmp_path / "best" / "controller.safetensors").exists()
    # Records carry only train samples (validation rollouts are not training data).
    rows = pq.read_table(tmp_path / "records" / "part-000000.parquet").to_pylist()
    assert not {r["sample_id"] for r in rows} & set(learner.val_ids)


def test_validation_results_count_as_progress(tmp_path):
    """The driver's stall timeout reads `since_last_group_s`: validation results are progress too."""
    now = [0.0]
    cfg = make_cfg(tmp_path, "system.validate_every=1", "grpo.groups_per_update=1")
    ws = [RolloutWorker(cfg, 0)]
    train, val = ws[0].sample_ids()
    learner = Learner(cfg, str(tmp_path), train, val, ws[0].info(), clock=lambda: now[0])
    sid = learner.next_task(0)["sample_id"]
    learner.submit_group(0, sid, group_rows(ws[0], sid, 0), [])       # update 1 -> validation round 0
    assert learner.val_pending
    for _ in range(len(learner.val_pending)):
        now[0] += 100.0                                                # each greedy rollout takes long
        task = learner.next_task(0)
        assert task["kind"] == "val"
        learner.submit_validation(0, task["round"], task["sample_id"], task["budget_ms"],
                                  {"reward": 0.5, "accuracy": 1.0, "within_budget": True, "latency_ms": 1.0})
        assert learner.status()["since_last_group_s"] == 0.0
    assert learner.val_history and learner.val_history[-1]["rollouts"] == 3 * cfg.data.val_samples


def test_lr_factor_schedules():
    from learner.trainer import lr_factor
    assert [lr_factor("constant", u, 0, 0.1) for u in (0, 5, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0, 100, 0.1) == 1.0
    assert lr_factor("cosine", 50, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 100, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 250, 100, 0.1) == pytest.approx(0.1)          # held after the run's end
    assert lr_factor("linear", 25, 100, 0.2) == pytest.approx(0.8)
    cos = [lr_factor("cosine", u, 40, 0.0) for u in range(41)]
    assert all(a > b for a, b in zip(cos, cos[1:]))
    with pytest.raises(ValueError, match="total number of updates"):
        lr_factor("cosine", 0, 0, 0.1)


def test_lr_schedule_runs_over_total_updates_and_resumes(tmp_path):
    """A cosine schedule over system.total_updates: each update's lr (metrics.jsonl) follows lr_factor,
    and a resumed run continues it from the restored step."""
    from learner.trainer import lr_factor
    cfg = make_cfg(tmp_path, "system.total_updates=6", "system.checkpoint_every=2", "grpo.lr_schedule=cosine",
                   "grpo.lr_final_frac=0.2")
    learner, (w,) = make_pair(cfg)
    w.run_loop(DirectClient(learner), max_groups=5 * cfg.grpo.groups_per_update)
    resumed, (w2,) = make_pair(cfg, resume=True)
    assert resumed.trainer.step == 4
    w2.run_loop(DirectClient(resumed))
    lrs = {json.loads(ln)["step"]: json.loads(ln)["lr"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    for step, lr in lrs.items():       # "step" counts updates done: update u = step - 1
        assert lr == pytest.approx(cfg.grpo.lr * lr_factor("cosine", step - 1, 6, 0.2))
    assert lrs[1] == pytest.approx(cfg.grpo.lr) and lrs[6] < lrs[5] < lrs[1]
    assert resumed.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[6])


class RecordingClient(DirectClient):
    """DirectClient that logs the learner calls in the order the worker makes them, and their answers."""

    def __init__(self, learner):
        super().__init__(learner)
        self.calls: list[tuple[str, object]] = []

    def next_task_async(self, worker_id):
        pending = super().next_task_async(worker_id)
        self.calls.append(("next_task", pending.result()))
        return pending

    def submit_group_async(self, worker_id, sample_id, rows, failures):
        pending = super().submit_group_async(worker_id, sample_id, rows, failures)
        self.calls.append(("submit_group", {"sample_id": sample_id, **pending.result()}))
        return pending

    def submits(self) -> tuple[list[int], list[str]]:
        """Positions of the submit_group calls in `calls`, and the sample ids they sent, in order."""
        at = [i for i, (n, _) in enumerate(self.calls) if n == "submit_group"]
        return at, [self.calls[i][1]["sample_id"] for i in at]

    def train_leases(self, lo: int, hi: int) -> list[str]:
        """Sample ids of the training tasks leased by calls[lo:hi]."""
        return [a["sample_id"] for n, a in self.calls[lo:hi] if n == "next_task" and a["kind"] == "train"]

    def pull_weights(self, known_version):
        got = super().pull_weights(known_version)
        self.calls.append(("pull_weights", None if got is None else got[0]))
        return got


def test_worker_leases_the_next_task_ahead_and_runs_no_group_after_training(tmp_path):
    """The pipelined loop: each group's next task is leased before its records are sent (so the worker never
    waits for the update its records trigger), groups leased ahead of an update run at most one version behind
    it (never dropped for lag), and the learner leases no group once the buffered and leased ones finish
    training, so no group is run and answered 'stopped'. (Validation off: its tasks come between groups.)"""
    cfg = make_cfg(tmp_path, "system.total_updates=4", "system.validate_every=0")
    learner, (w,) = make_pair(cfg)
    client = RecordingClient(learner)
    w.run_loop(client)
    assert learner.trainer.step == 4
    submits, sent = client.submits()
    assert len(sent) == 4 * cfg.grpo.groups_per_update
    # group k+1's task was leased before group k's records were sent (between submits k-1 and k)
    starts = [0] + submits[:-1]
    for k in range(len(sent) - 1):
        leased = client.train_leases(starts[k], submits[k])
        assert sent[k + 1] in leased, (k, leased)
    answers = [a for n, a in client.calls if n == "submit_group"]
    assert all(a["accepted"] for a in answers), answers          # none 'stopped': no group run for nothing
    assert learner.counters["dropped_lag"] == 0
    table = check_records(tmp_path, cfg, 4)
    lag = [s - v for s, v in zip(table.column("step").to_pylist(), table.column("policy_version").to_pylist())]
    assert max(lag) <= 1 and min(lag) >= 0
    assert not learner.inflight.get(0)                           # no lease left behind


def test_worker_loop_with_one_group_in_flight(tmp_path):
    """max_inflight_groups_per_worker = 1: the lease ahead is answered 'wait' and the loop asks again after the
    group; training completes with the same records."""
    cfg = make_cfg(tmp_path, "system.total_updates=3", "system.max_inflight_groups_per_worker=1")
    learner, (w,) = make_pair(cfg)
    client = RecordingClient(learner)
    w.run_loop(client, idle_sleep_s=0.0)
    assert learner.trainer.step == 3
    check_records(tmp_path, cfg, 3)
    assert any(a == {"kind": "wait"} for n, a in client.calls if n == "next_task")
    assert learner.counters["dropped_lag"] == 0


def test_worker_loop_without_lease_ahead(tmp_path):
    """system.lease_ahead=false: every task is asked for after the previous group's records were sent, and the
    newest weights are pulled before every group, so a single worker never runs a group behind."""
    cfg = make_cfg(tmp_path, "system.total_updates=3", "system.validate_every=0", "system.lease_ahead=false")
    learner, (w,) = make_pair(cfg)
    client = RecordingClient(learner)
    w.run_loop(client)
    assert learner.trainer.step == 3
    submits, sent = client.submits()
    for k in range(1, len(sent)):               # group k's task was leased after group k-1's records were sent
        leased = client.train_leases(submits[k - 1], submits[k])
        assert leased == [sent[k]], (k, leased)
    table = check_records(tmp_path, cfg, 3)
    assert set(s - v for s, v in zip(table.column("step").to_pylist(),
                                      table.column("policy_version").to_pylist())) == {0}
