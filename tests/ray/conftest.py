"""Shared fixtures of the Ray tests: ONE session-scoped local cluster (2 CPUs, no dashboard, loopback)
plus helpers to build and drive a `TrainingJob` against it, and fault injection for rollout workers.

Fault injection works through files in a control folder that the test writes and the worker actors
read (they run on the same machine): `fail-<w>` makes worker w's next train rollout raise SampleError
(consumed once: one failed group), `hang-<w>` makes its next train rollout block while the file exists
(the worker then writes its pid to `hanging-<w>`, so the test knows it holds an unfinished group),
`slow_ms` adds a sleep to every train rollout of every worker.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pytest

# Before Ray is imported anywhere in this session: no usage stats, no OS-X/Windows gate, and the
# authentication mode set explicitly (a local ray.init() otherwise turns token auth on and writes
# ~/.ray/auth_token, which later `ray start` clusters would pick up).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[2]
CI_CONFIG = REPO / "jobs" / "configs" / "ci_synthetic.yaml"
RAY_TIMEOUT_S = 60.0
METRICS_REPORT_INTERVAL_MS = 1000


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray cluster of the test session (2 CPUs, no dashboard, 127.0.0.1 only).

    Metrics are reported every second (default 10 s) so the scrape test sees them during a short run.
    """
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # fault-injecting actor classes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1",
             _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_cluster(ray_session):
    """Per test: the session cluster, checked to hold no leftover actors afterwards."""
    yield ray_session
    import ray._private.state as ray_state        # the state API needs the dashboard; this does not
    deadline = time.monotonic() + 20
    while True:
        alive = [a["ActorClassName"] for a in ray_state.actors().values()
                 if a["State"] not in ("DEAD",) and not a["IsDetached"]]
        if not alive:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"actors left running after the test: {alive}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------
# Building and driving jobs
# ----------------------------------------------------------------------------------------------
def make_cfg(run_dir, *overrides: str, config=CI_CONFIG):
    from shared.config import load_config
    return load_config(config, [f"system.run_dir={run_dir}", *overrides])


class Captured:
    """print_fn that keeps the job's lines (and echoes them for -s runs)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        print(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def run_job(cfg, *, resume: bool = False, on_status: Optional[Callable] = None, finish: bool = True,
            before_start: Optional[Callable] = None, poll_s: float = 0.2):
    """start / monitor / finish a TrainingJob on the session cluster; actors are always torn down.

    Returns (job, final status, summary or None, captured output)."""
    from jobs.train import TrainingJob
    out = Captured()
    job = TrainingJob(cfg, resume=resume, print_fn=out)
    summary = None
    try:
        if before_start is not None:
            before_start(job)
        job.start()
        status = job.monitor(on_status=on_status, poll_s=poll_s)
        if finish:
            summary = job.finish()
        else:
            status = job.ray.get(job.learner.stop.remote(), timeout=RAY_TIMEOUT_S)
    finally:
        job.shutdown()
    return job, status, summary, out


def assert_state_equal(a, b, path="state"):
    """Recursive equality of state dicts (optimizer, controller), tensors compared exactly."""
    import torch
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def committed_rows(run_dir, cfg, steps):
    """Records of a finished run: steps 0..steps-1, each a full batch of complete groups, no group twice."""
    from shared.records import read_record_dir
    rows = read_record_dir(Path(run_dir) / "records").to_pylist()
    g, per_update = cfg.grpo.group_size, cfg.grpo.groups_per_update
    assert Counter(r["step"] for r in rows) == {s: g * per_update for s in range(steps)}
    per_group = Counter(r["group_id"] for r in rows)
    assert set(per_group.values()) == {g}, "a group was split, repeated or padded"
    step_of = {}
    for r in rows:
        assert step_of.setdefault(r["group_id"], r["step"]) == r["step"], "a group id in two steps"
    assert all(r["answer"] in ("yes", "no") and r["t_end"] >= r["t_start"] > 0 for r in rows)
    return rows



# ----------------------------------------------------------------------------------------------
# Fault injection
# ----------------------------------------------------------------------------------------------
def faulty_worker_class(ctl_dir: str):
    """A RolloutWorkerActor whose train rollouts obey the control files in `ctl_dir` (see module doc)."""
    from jobs.actors import RolloutWorkerActor

    class FaultyRolloutWorkerActor(RolloutWorkerActor):
        CTL = ctl_dir

        def __init__(self, cfg, worker_id):
            super().__init__(cfg, worker_id)
            real = self.backend.run
            ctl = Path(self.CTL)

            def run(sample, budget_ms, controller, **kw):
                from shared.backend import SampleError
                if not kw.get("greedy"):                 # validation rollouts are left alone
                    try:
                        (ctl / f"fail-{worker_id}").unlink()
                        failing = True
                    except FileNotFoundError:
                        failing = False
                    if failing:
                        raise SampleError(f"injected failure on worker {worker_id}")
                    hang = ctl / f"hang-{worker_id}"
                    if hang.exists():
                        tmp = ctl / f".hanging-{worker_id}"
                        tmp.write_text(str(os.getpid()))
                        os.replace(tmp, ctl / f"hanging-{worker_id}")
                        while hang.exists():
                            time.sleep(0.02)
                        (ctl / f"hanging-{worker_id}").unlink(missing_ok=True)
                    slow = ctl / "slow_ms"
                    if slow.exists():
                        time.sleep(float(slow.read_text()) / 1e3)
                return real(sample, budget_ms, controller, **kw)

            self.backend.run = run

    return FaultyRolloutWorkerActor


class Faults:
    """Test-side handle on the control folder."""

    def __init__(self, ctl_dir: Path):
        self.dir = Path(ctl_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def install(self, monkeypatch) -> None:
        """Make TrainingJob build fault-injecting workers (same options as jobs.actors.make_workers)."""
        import jobs.actors
        monkeypatch.setattr(jobs.actors, "RolloutWorkerActor", faulty_worker_class(str(self.dir)))

    def fail_once(self, w: int) -> None:
        (self.dir / f"fail-{w}").touch()

    def failed(self, w: int) -> bool:
        return not (self.dir / f"fail-{w}").exists()

    def hang(self, w: int) -> None:
        (self.dir / f"hang-{w}").touch()

    def release(self, w: int) -> None:
        (self.dir / f"hang-{w}").unlink(missing_ok=True)

    def hanging_pid(self, w: int) -> Optional[int]:
        try:
            return int((self.dir / f"hanging-{w}").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def slow(self, ms: float) -> None:
        (self.dir / "slow_ms").write_text(str(ms))

    def fast(self) -> None:
        (self.dir / "slow_ms").unlink(missing_ok=True)


@pytest.fixture
def faults(tmp_path, monkeypatch):
    f = Faults(tmp_path / "faults")
    f.install(monkeypatch)
    yield f
    for p in f.dir.glob("hang-*"):                # never leave a worker blocked
        p.unlink(missing_ok=True)
