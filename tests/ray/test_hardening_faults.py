"""Hardening: faults the Ray system tests (test_faults_and_metrics.py, test_cli.py, test_train_e2e.py) do not
already cover, each asserting what is kept.

- The LEARNER process is SIGKILLed mid-run (its actor's pid), the job ends with a clear JobError, and
  `--resume` continues: every committed group once in the Parquet log, records of steps before the
  checkpoint kept byte for byte, the dispenser's committed ids consistent with the rows, metrics lines
  once per step, the step count reaching total_updates.
- A crash while a checkpoint is being written (mid trainer.pt, before the folder rename, before the
  `latest` pointer) or while a record file is being written: the previous checkpoint stays loadable,
  no torn part-*.parquet, resume cleans the leftovers and finishes. A real SIGKILL of a process that
  writes checkpoints and record files in a loop leaves only loadable files.
- Local Ray (jobs/train.init_ray) binds its node and dashboard to 127.0.0.1.

All workers dead and all workers stuck are in test_faults_and_metrics.py; SIGTERM + resume in test_cli.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, RAY_TIMEOUT_S, committed_rows, make_cfg, run_job

pytestmark = [pytest.mark.ray]


def _dispenser_consistent(run_dir: Path, cfg, rows: list[dict]) -> None:
    """Committed sample ids = the epoch order up to the cursor minus the ids still to hand out again."""
    from learner.checkpoint import latest_checkpoint, load_checkpoint
    from learner.dispenser import SampleDispenser
    from shared.datasets import load_samples
    _, meta = load_checkpoint(latest_checkpoint(run_dir))
    d = meta["dispenser"]
    per_sample = Counter(r["sample_id"] for r in rows)
    assert d["epoch"] == 0 and set(per_sample.values()) == {cfg.grpo.group_size}    # no sample twice
    order = SampleDispenser([s.sample_id for s in load_samples(cfg, "train")], seed=d["seed"])._order(0)
    bad = set()
    if (run_dir / "bad_samples.jsonl").exists():
        bad = {json.loads(ln)["sample_id"] for ln in (run_dir / "bad_samples.jsonl").read_text().splitlines()}
    assert set(per_sample) | bad == set(order[:d["cursor"]]) - set(d["released"])   # none skipped
    assert d["committed_total"] == len(per_sample) + len(bad)


# ----------------------------------------------------------------------------------------------
# The learner killed mid-run, then --resume
# ----------------------------------------------------------------------------------------------
def test_learner_sigkill_then_resume(ray_cluster, tmp_path, faults):
    from jobs.train import JobError, load_run_config, parse_args
    from learner.checkpoint import latest_checkpoint
    total, every = 10, 4
    cfg = make_cfg(tmp_path, f"system.total_updates={total}", f"system.checkpoint_every={every}",
                   "system.validate_every=0", "grpo.lr=1e-2")
    faults.slow(15)
    seen = {}

    def kill_learner(status, job):
        if "pid" in seen:
            return
        if status["step"] >= every + 1 and "frozen" not in seen:
            faults.hang(0)                  # freeze both workers so the kill lands between checkpoints
            faults.hang(1)
            seen["frozen"] = True
        if seen.get("frozen") and faults.hanging_pid(0) and faults.hanging_pid(1):
            seen["step"] = job.ray.get(job.learner.status.remote(), timeout=RAY_TIMEOUT_S)["step"]
            seen["pid"] = job.ray.get(job.learner.pid.remote(), timeout=RAY_TIMEOUT_S)
            os.kill(seen["pid"], signal.SIGKILL)

    with pytest.raises(JobError, match=r"the learner actor died .*--resume") as err:
        run_job(cfg, on_status=kill_learner)
    assert str(tmp_path) in str(err.value)
    killed_at = seen["step"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == f"step-{every:06d}" and every < killed_at < 2 * every, killed_at
    parts_before = {p.name: p.read_bytes() for p in (tmp_path / "records").glob("part-*.parquet")}
    assert sorted(parts_before) == [f"part-{s:06d}.parquet" for s in range(killed_at)]   # nothing torn
    for p in (tmp_path / "records").glob("part-*.parquet"):
        pq.read_table(p)

    faults.release(0)
    faults.release(1)
    faults.fast()
    cfg2 = load_run_config(parse_args(["--resume", str(tmp_path)]))
    _, status, summary, out = run_job(cfg2, resume=True)
    assert status["step"] == summary["steps"] == total
    rows = committed_rows(tmp_path, cfg2, total)          # every step full, each group id exactly once
    _dispenser_consistent(tmp_path, cfg2, rows)
    # Records committed in the checkpoint are kept as they were; later ones were produced again.
    for s in range(every):
        name = f"part-{s:06d}.parquet"
        assert (tmp_path / "records" / name).read_bytes() == parts_before[name], name
    redone = [r for r in rows if every <= r["step"] < killed_at]
    assert redone and all(r["step"] >= every for r in redone)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))             # metrics lines of superseded updates were cut
    assert not list((tmp_path / "records").glob(".part-*")) and not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------
# Crashes while writing checkpoints and records (in-process learner; the exception is the crash)
# ----------------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


def _pair(cfg, *, resume=False):
    from learner.learner import Learner
    from rollout_workers.worker import RolloutWorker
    w = RolloutWorker(cfg, 0)
    train, val = w.sample_ids()
    return Learner(cfg, cfg.system.run_dir, train, val, w.info(), resume=resume), w


@pytest.mark.parametrize("where", ["mid-trainer.pt", "before-rename", "before-latest", "mid-record"])
def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    import learner.checkpoint as ckpt_mod
    import shared.records as records_mod
    from learner.checkpoint import latest_checkpoint, load_checkpoint
    from rollout_workers.worker import DirectClient
    from shared.records import read_record_dir
    total = 6
    cfg = make_cfg(tmp_path, f"system.total_updates={total}", "system.checkpoint_every=2",
                   "system.validate_every=0")
    learner, w = _pair(cfg)
    client = DirectClient(learner)
    w.run_loop(client, max_groups=2 * cfg.grpo.groups_per_update)     # checkpoint step-2 written normally
    assert latest_checkpoint(tmp_path).name == "step-000002"
    # A bad sample after the checkpoint: its bad_samples.jsonl line is cut on resume (it is redone).
    bad_sid = learner.next_task(0)["sample_id"]
    learner.submit_group(0, bad_sid, [], ["SampleError: injected"])

    real_save, real_replace, real_write = ckpt_mod.torch.save, ckpt_mod.os.replace, records_mod.pq.write_table
    if where == "mid-trainer.pt":
        def save(obj, f, *a, **kw):                    # half a file, then the process "dies"
            real_save(obj, f, *a, **kw)
            Path(f).write_bytes(Path(f).read_bytes()[:200])
            raise Crash(where)
        monkeypatch.setattr(ckpt_mod.torch, "save", save)
    elif where == "before-rename":
        def replace(src, dst):
            if Path(src).name.startswith(".tmp-step-"):
                raise Crash(where)
            return real_replace(src, dst)
        monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    elif where == "before-latest":
        def atomic_write_text(path, text):
            raise Crash(where)
        monkeypatch.setattr(ckpt_mod, "_atomic_write_text", atomic_write_text)
    else:
        def write_table(table, path, *a, **kw):        # a torn temp file, then the process "dies"
            real_write(table, path, *a, **kw)
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise Crash(where)
        monkeypatch.setattr(records_mod.pq, "write_table", write_table)

    with pytest.raises(Crash):
        w.run_loop(client)
    crashed_at = learner.trainer.step
    monkeypatch.undo()

    # What is kept: the previous checkpoint, loadable; only whole record files under final names.
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000002"
    state, meta = load_checkpoint(ckpt)
    assert state["step"] == 2 and meta["step"] == 2
    parts = sorted((tmp_path / "records").glob("part-*.parquet"))
    for p in parts:
        assert pq.read_table(p).num_rows == cfg.grpo.groups_per_update * cfg.grpo.group_size
    assert read_record_dir(tmp_path / "records").num_rows == len(parts) * cfg.grpo.groups_per_update * \
        cfg.grpo.group_size
    if where == "mid-record":
        assert crashed_at == 3 and len(parts) == 2 and list((tmp_path / "records").glob(".part-000002*"))
    else:
        assert crashed_at == 4 and len(parts) == 4
        leftovers = list((tmp_path / "checkpoints").glob(".tmp-step-000004-*"))
        assert bool(leftovers) == (where != "before-latest")
        assert (tmp_path / "checkpoints" / "step-000004").exists() == (where == "before-latest")

    # Resume: from step 2, leftovers removed, run completes with every group once.
    resumed, w2 = _pair(cfg, resume=True)
    assert resumed.trainer.step == 2
    assert not list((tmp_path / "records").glob(".part-*")) and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert not (tmp_path / "bad_samples.jsonl").read_text()          # the uncommitted bad sample is cut
    w2.run_loop(DirectClient(resumed))
    assert resumed.trainer.step == total
    rows = committed_rows(tmp_path, cfg, total)
    _dispenser_consistent(tmp_path, cfg, rows)
    bad_lines = (tmp_path / "bad_samples.jsonl").read_text().splitlines()
    assert len(bad_lines) == resumed.counters["bad_samples"]


SAVER = r"""
import sys, time
from pathlib import Path
import numpy as np, pyarrow as pa, torch
from learner.checkpoint import save_checkpoint
from shared.records import write_parquet_atomic
run = Path(sys.argv[1]); (run / "records").mkdir(parents=True, exist_ok=True)
big = torch.randn(3_000_000)
table = pa.table({"x": np.random.default_rng(0).random(1_000_000)})
step = 0
while True:
    step += 1
    save_checkpoint(run, step, {"controller": {"w": big}, "step": step, "rng": {}}, {"step": step})
    write_parquet_atomic(table, run / "records" / f"part-{step:06d}.parquet")
    if step == 2:
        print("ready", flush=True)
"""


def test_sigkill_while_writing_leaves_only_loadable_files(tmp_path):
    """A process writing 12 MB checkpoints and 8 MB record files back to back, SIGKILLed at a random
    moment (almost always mid-write): the latest checkpoint loads and every record file reads."""
    from learner.checkpoint import latest_checkpoint, load_checkpoint
    import random
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(random.uniform(0.05, 0.6))
        finally:
            proc.kill()
            proc.wait(timeout=30)
        ckpt = latest_checkpoint(run)
        state, meta = load_checkpoint(ckpt)
        assert state["step"] == meta["step"] >= 2 and state["controller"]["w"].numel() == 3_000_000
        parts = sorted((run / "records").glob("part-*.parquet"))
        assert len(parts) >= 2
        for p in parts:
            assert pq.read_table(p).num_rows == 1_000_000


# ----------------------------------------------------------------------------------------------
# Secure defaults
# ----------------------------------------------------------------------------------------------
PROBE = r"""
import json, sys
from jobs.train import init_ray, _set_env
from shared.config import load_config
cfg = load_config(None)
_set_env(cfg)
init_ray(cfg, None)
import ray
info = ray._private.worker._global_node.address_info
print(json.dumps({"node_ip": info["node_ip_address"], "gcs": info["gcs_address"], "webui": info["webui_url"],
                  "raylet_ip": info.get("raylet_ip_address")}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def test_local_ray_and_dashboard_bound_to_loopback(tmp_path):
    """jobs/train.init_ray without an address: node, GCS and dashboard on 127.0.0.1, and the dashboard
    port listens on 127.0.0.1 only. (The `ray start` path: test_cli.py::test_ray_start_and_job_submit;
    cluster.yaml: test_static_configs.py::test_cluster_layout_and_security.)"""
    from shared.config import load_config
    from test_cli import clean_env, listening_addresses
    assert load_config(None).system.dashboard_host == "127.0.0.1"
    proc = subprocess.Popen([sys.executable, "-c", PROBE], cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:] if proc.poll() is not None else "no output"
        info = json.loads(line)
        assert info["node_ip"] == "127.0.0.1"
        assert info["gcs"].startswith("127.0.0.1:")
        host, port = info["webui"].rsplit(":", 1)
        assert host in ("127.0.0.1", "http://127.0.0.1"), info
        deadline = time.monotonic() + 30
        while not listening_addresses(int(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert listening_addresses(int(port)) == {"127.0.0.1"}
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
