"""The entry points as a user runs them, in subprocesses:

- `python jobs/train.py --config ...` (its own local Ray), and SIGTERM mid-run (what `ray job stop`
  sends) followed by `--resume RUN_DIR`;
- `ray start --head` (dashboard on 127.0.0.1, token authentication on) + `ray job submit --working-dir .`.

The `ray start` cluster is ended by sending SIGTERM to the `ray start --block` process this test started
(it stops the processes it launched). `ray stop` is NOT used: it kills every Ray process of the user on
the machine, including the session cluster of these tests and anyone else's.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import CI_CONFIG, REPO

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

VENV_BIN = str(Path(sys.executable).parent)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")})
    env.update(extra)
    return env


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "train.py"), *args]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on TCP `port` (from /proc/net/tcp{,6})."""
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    addr = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                out.add(addr)
    return out


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in p.read_bytes() and int(p.parent.name) != os.getpid():
                pids.append(int(p.parent.name))
        except OSError:
            pass
    return pids


def test_train_py_runs_locally(tmp_path):
    t0 = time.monotonic()
    res = subprocess.run(train_cmd("--config", str(CI_CONFIG), f"system.run_dir={tmp_path}"), cwd=tmp_path,
                         env=clean_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert re.search(r"\[train\] 2 rollout worker\(s\) on CPU; backend synthetic", out)
    assert re.search(r"\[train\] step +6 \| +[\d.]+ rollouts/s \| reward [+-][\d.]+ \| acc [\d.]+ \| attain [\d.]+", out)
    assert "[train] done: 6 updates, 96 rollouts recorded" in out
    assert re.search(r"\[train\] reward +first tenth", out) and "[train] wall time" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "bundle/bundle.json",
                 "bundle/controller.safetensors", "records/part-000005.parquet", "checkpoints/latest"):
        assert (tmp_path / name).exists(), name
    print(f"train.py subprocess: {time.monotonic() - t0:.1f}s")


def test_bad_override_is_a_clean_error(tmp_path):
    res = subprocess.run(train_cmd("--config", str(CI_CONFIG), "grpo.nope=1"), cwd=tmp_path, env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown config key 'grpo.nope'" in res.stderr


def test_sigterm_checkpoints_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd("--config", str(CI_CONFIG), f"system.run_dir={run_dir}",
                                      "system.total_updates=100000", "system.checkpoint_every=100000",
                                      "system.validate_every=0"),
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"\[train\] step +(\d+)", line)
            if m and int(m.group(1)) >= 3:
                proc.send_signal(signal.SIGTERM)          # what `ray job stop` sends
                break
            assert time.monotonic() < deadline, "".join(lines[-20:])
        t_term = time.monotonic()
        rest, _ = proc.communicate(timeout=120)
        print(f"SIGTERM -> exit: {time.monotonic() - t_term:.1f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested: flushing records and checkpointing" in out
    k = int(re.search(r"\[train\] done: (\d+) updates", out).group(1))
    assert k >= 3
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{k:06d}"
    assert len(list((run_dir / "records").glob("part-*.parquet"))) == k

    res = subprocess.run(train_cmd("--resume", str(run_dir), f"system.total_updates={k + 2}"), cwd=tmp_path,
                         env=clean_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"[train] done: {k + 2} updates" in res.stdout
    assert sorted(p.name for p in (run_dir / "records").glob("part-*.parquet")) == \
        [f"part-{s:06d}.parquet" for s in range(k + 2)]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == k + 2


def test_ray_start_and_job_submit(tmp_path):
    """A `ray start --head` cluster (token auth, dashboard on 127.0.0.1) runs `ray job submit`."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")     # short: Ray puts unix sockets under it
    gcs, dash, client, agent, metrics, rte = free_ports(6)
    token = secrets.token_hex(32)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(rte), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "ray_start.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:                # up (and asking for the token)
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "ray_start.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the dashboard did not come up"
                time.sleep(1)
        assert listening_addresses(dash) == {"127.0.0.1"}       # the dashboard is not exposed

        run_dir = tmp_path / "run"
        submit = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".", "--",
                  "python", "jobs/train.py", "--config", "jobs/configs/ci_synthetic.yaml",
                  f"system.run_dir={run_dir}"]
        t0 = time.monotonic()
        res = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
        assert "Connected to Ray cluster" in out                 # the job used the cluster, not a new Ray
        assert "[train] done: 6 updates, 96 rollouts recorded" in out
        assert (run_dir / "bundle" / "bundle.json").exists()
        print(f"ray job submit: {time.monotonic() - t0:.1f}s")

        # Without the cluster's token the job API refuses.
        bad = subprocess.run(["ray", "job", "list", "--address", f"http://127.0.0.1:{dash}"], cwd=tmp_path,
                             env=dict(env, RAY_AUTH_TOKEN="0" * 64), capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "Invalid authentication token" in bad.stdout + bad.stderr
    finally:
        head.send_signal(signal.SIGTERM)                          # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        deadline = time.monotonic() + 30
        while processes_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
    left = processes_mentioning(temp_dir)
    assert not left, f"processes of the test cluster still running: {left}"
    shutil.rmtree(temp_dir, ignore_errors=True)
