"""Fault tolerance and metrics on the session Ray cluster.

One run (`fault_run`) goes through a scripted sequence while training: a failed group (bad sample), a
group held back until it is past the lag bound (dropped, re-dispensed), then worker 0 is SIGKILLed while
it holds an unfinished group (Ray restarts it; the group is dropped and counted). While the run is
still going, the node's metrics endpoint is scraped and every metric named in the shipped Grafana
dashboard must be there with sensible values. Two short runs check the fail-fast paths: every worker
dead, and no group within the timeout.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from conftest import REPO, Faults, committed_rows, make_cfg, run_job

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

DASHBOARD = REPO / "docs" / "grafana" / "budgetctl_dashboard.json"
TOTAL_UPDATES = 100
MAX_LAG = 1


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\bray_budgetctl_[a-z0-9_]+", target["expr"]))
    return names


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """Sample name -> [(labels, value)] from the node's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_budgetctl_"):
                out[s.name].append((s.labels, s.value))
    return out


def metric_problems(samples) -> list[str]:
    """What is missing or not sensible (empty = the scrape passes)."""
    problems = [f"missing {n}" for n in sorted(dashboard_metric_names()) if n not in samples]
    if problems:
        return problems

    def total(name, **match):
        return sum(v for lab, v in samples[name] if all(lab.get(k) == x for k, x in match.items()))

    def gauge(name):
        return max(v for _, v in samples[name])

    checks = {
        "rollouts > 0": total("ray_budgetctl_rollouts_total") > 0,
        "groups > 0": total("ray_budgetctl_groups_total") > 0,
        "rollouts >= 2 * groups": total("ray_budgetctl_rollouts_total") >= 2 * total("ray_budgetctl_groups_total"),
        "latency histogram has observations": total("ray_budgetctl_rollout_latency_ms_count") > 0,
        "budget violations > 0": total("ray_budgetctl_budget_violations_total") > 0,
        "policy_version >= 1": gauge("ray_budgetctl_policy_version") >= 1,
        "reward finite": math.isfinite(gauge("ray_budgetctl_reward")) and -10 < gauge("ray_budgetctl_reward") <= 2,
        "accuracy in [0, 1]": 0 <= gauge("ray_budgetctl_accuracy") <= 1,
        "attainment in [0, 1]": 0 <= gauge("ray_budgetctl_attainment") <= 1,
        "update ms > 0": gauge("ray_budgetctl_learner_update_ms") > 0,
        "broadcast ms >= 0": gauge("ray_budgetctl_broadcast_ms") >= 0,
        "idle fraction in [0, 1]": 0 <= gauge("ray_budgetctl_learner_idle_fraction") <= 1,
        "learner rollouts/s > 0": gauge("ray_budgetctl_rollouts_per_s") > 0,
        "failed rollouts >= 1": total("ray_budgetctl_failed_rollouts_total") >= 1,
        "worker restarts >= 1": total("ray_budgetctl_worker_restarts_total") >= 1,
        **{f"dropped[{r}] >= 1": total("ray_budgetctl_dropped_groups_total", reason=r) >= 1
           for r in ("failed", "lag", "worker_died")},
    }
    problems = [name for name, ok in checks.items() if not ok]
    # Histogram buckets: cumulative per series, +Inf equals the count.
    series = defaultdict(dict)
    for lab, v in samples["ray_budgetctl_rollout_latency_ms_bucket"]:
        key = tuple(sorted((k, x) for k, x in lab.items() if k != "le"))
        series[key][float(lab["le"])] = v
    counts = {tuple(sorted(lab.items())): v for lab, v in samples["ray_budgetctl_rollout_latency_ms_count"]}
    for key, buckets in series.items():
        vals = [buckets[le] for le in sorted(buckets)]
        if vals != sorted(vals):
            problems.append(f"latency buckets not cumulative for {dict(key)}")
        if key in counts and buckets.get(math.inf) != counts[key]:
            problems.append(f"+Inf bucket != count for {dict(key)}")
    if not any(lab.get("worker") in ("0", "1") for lab, _ in samples["ray_budgetctl_rollouts_total"]):
        problems.append("rollouts lack the worker tag")
    return problems


class Script:
    """on_status callback: failed group -> lag drop -> kill -> scrape, each step waiting for the last."""

    def __init__(self, faults: Faults, port: int):
        self.f, self.port = faults, port
        self.phase = "fail"
        self.log: list[str] = []
        self.scraped = None
        self.problems = None
        self.killed_pid = None

    def __call__(self, status, job):
        c, step = status["counters"], status["step"]
        if not self.log or not self.log[-1].startswith(self.phase + " "):
            self.log.append(f"{self.phase} step={step} t={time.monotonic():.1f} {c}")
            print("[script]", self.log[-1])
        if status["done"] and self.phase != "done":
            raise AssertionError(f"the run finished during phase {self.phase}: raise TOTAL_UPDATES; {self.log[-5:]}")
        if self.phase == "fail" and step >= 1:
            self.f.fail_once(1)                         # worker 1's next train rollout raises SampleError
            self.phase = "wait_fail"
        elif self.phase == "wait_fail" and c["dropped_failed"] >= 1:
            self.f.hang(0)                              # worker 0 holds its next group ...
            self.phase = "hold"
        elif self.phase == "hold" and self.f.hanging_pid(0):
            self.hold_step = step
            self.phase = "age"
        elif self.phase == "age" and step >= self.hold_step + MAX_LAG + 1:
            self.f.release(0)                           # ... until it is past the lag bound
            self.phase = "wait_lag"
        elif self.phase == "wait_lag" and c["dropped_lag"] >= 1:
            self.f.hang(0)
            self.f.hang(1)                              # freeze progress while worker 0 restarts
            self.phase = "freeze"
        elif self.phase == "freeze" and self.f.hanging_pid(0) and self.f.hanging_pid(1):
            self.killed_pid = self.f.hanging_pid(0)
            os.kill(self.killed_pid, signal.SIGKILL)
            self.f.release(0)                           # the restarted process must not hang
            self.phase = "wait_restart"
        elif self.phase == "wait_restart" and c["worker_restarts"] >= 1:
            self.f.release(1)
            self.restart_step = step
            self.phase = "run_on"
        elif self.phase == "run_on" and step >= self.restart_step + 2:
            deadline = time.monotonic() + 30
            while True:                                 # metrics are reported every second
                self.scraped = scrape(self.port)
                self.problems = metric_problems(self.scraped)
                if not self.problems or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            self.f.fast()                               # let the run finish
            self.phase = "done"


@pytest.fixture(scope="module")
def fault_run(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults")
    faults = Faults(run_dir / "ctl")
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    assert port == ray_session.nodes()[0]["MetricsExportPort"]
    cfg = make_cfg(run_dir / "run", f"system.total_updates={TOTAL_UPDATES}", "system.checkpoint_every=25",
                   "system.validate_every=50", "grpo.groups_per_update=2", f"grpo.max_policy_lag={MAX_LAG}",
                   "system.max_worker_restarts=1")
    script = Script(faults, port)
    with pytest.MonkeyPatch.context() as mp:
        faults.install(mp)
        faults.slow(10)                                 # ~20 updates/s: room for the script's steps
        try:
            t0 = time.monotonic()
            job, status, summary, out = run_job(cfg, on_status=script, poll_s=0.1)
            wall = time.monotonic() - t0
        finally:
            for w in (0, 1):
                faults.release(w)
    return {"cfg": cfg, "run_dir": Path(cfg.system.run_dir), "status": status, "summary": summary,
            "out": out, "script": script, "wall": wall}


def test_killed_worker_is_restarted_and_the_run_completes(fault_run):
    status, script, out = fault_run["status"], fault_run["script"], fault_run["out"]
    assert script.phase == "done", script.log[-5:]
    assert status["done"] and status["step"] == TOTAL_UPDATES
    c = status["counters"]
    assert c["worker_restarts"] == 1
    # its leases, dropped and counted: the group it was running and, if it had leased the next one, that too
    assert 1 <= c["dropped_worker_died"] <= fault_run["cfg"].system.max_inflight_groups_per_worker
    assert "rollout worker 0 died" in out.text and "Ray restarts it (restart 1/1)" in out.text
    assert "gone for good" not in out.text and "restart 2/" not in out.text
    assert "restarts 1" in [ln for ln in out.lines if ln.startswith("[train] step")][-1]
    rows = committed_rows(fault_run["run_dir"], fault_run["cfg"], TOTAL_UPDATES)   # no padded groups
    # The restarted worker contributed after its restart.
    assert any(r["worker_id"] == 0 and r["step"] > script.restart_step for r in rows)


def test_lag_and_failed_groups_over_ray(fault_run):
    c = fault_run["status"]["counters"]
    run_dir = fault_run["run_dir"]
    assert c["dropped_lag"] >= 1
    assert c["dropped_failed"] == 1 and c["bad_samples"] == 1 and c["failed_rollouts"] == 1
    bad = [json.loads(ln)["sample_id"] for ln in (run_dir / "bad_samples.jsonl").read_text().splitlines()]
    assert len(bad) == 1
    from learner.checkpoint import latest_checkpoint, load_checkpoint
    from learner.dispenser import SampleDispenser
    from shared.datasets import load_samples
    from shared.records import read_record_dir
    rows = read_record_dir(run_dir / "records").to_pylist()
    per_sample = Counter(r["sample_id"] for r in rows)
    assert bad[0] not in per_sample                       # never zero-reward rows for a failed group
    # Lag-dropped and worker-died samples were handed out again: nothing skipped, nothing repeated.
    cfg = fault_run["cfg"]
    _, meta = load_checkpoint(latest_checkpoint(run_dir))
    d = meta["dispenser"]
    assert d["epoch"] == 0 and set(per_sample.values()) == {cfg.grpo.group_size}
    order = SampleDispenser([s.sample_id for s in load_samples(cfg, "train")], seed=d["seed"])._order(0)
    assert set(per_sample) | set(bad) == set(order[:d["cursor"]]) - set(d["released"])


def test_metrics_scrape_matches_dashboard(fault_run):
    script = fault_run["script"]
    assert script.scraped is not None, script.log[-5:]
    assert script.problems == [], script.problems
    # Counter names never end in _total in our code; Prometheus adds it exactly once.
    assert not [n for n in script.scraped if n.endswith("_total_total")]


def test_all_workers_dead_is_a_clear_error(ray_cluster, tmp_path, faults):
    from jobs.train import JobError
    cfg = make_cfg(tmp_path, "system.max_worker_restarts=0", "system.total_updates=50")
    faults.hang(0)
    faults.hang(1)
    killed = []

    def kill_both(status, job):
        pids = [faults.hanging_pid(w) for w in (0, 1)]
        if not killed and all(pids):
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    t0 = time.monotonic()
    with pytest.raises(JobError, match="every rollout worker is gone") as err:
        run_job(cfg, on_status=kill_both)
    assert killed and time.monotonic() - t0 < 60
    assert "step 0/50" in str(err.value)


def test_no_group_within_the_timeout_is_a_clear_error(ray_cluster, tmp_path, faults):
    from jobs.train import JobError
    cfg = make_cfg(tmp_path, "system.total_updates=50")
    faults.hang(0)
    faults.hang(1)

    def shorten_timeout(status, job):
        job.cfg.system.worker_timeout_s = 2.0          # after start-up, which uses the same timeout

    with pytest.raises(JobError, match="no rollout group reached the learner"):
        run_job(cfg, on_status=shorten_timeout)
