"""The issue-4 benchmarks run on the CPU with the tiny model and write the JSON their docs read (the GPU figures
come from the same scripts on the device machine; a script that no longer matches the request path fails here
first)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 300) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, check=True, timeout=timeout,
                   capture_output=True, text=True)


def test_window_cvs():
    sys.path.insert(0, str(ROOT / "bench"))
    from host_speed_probe import window_cvs

    assert window_cvs([1.0, 1.0, 1.0, 3.0], 2) == pytest.approx([0.0, 0.0, 0.5])
    assert window_cvs([2.0] * 12, 10) == [0.0, 0.0, 0.0]


def test_host_speed_probe_writes_its_table(tmp_path):
    out = tmp_path / "host.json"
    _run("host_speed_probe.py", "--repeats", "12", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {"python", "png"} <= set(rows)
    for r in rows.values():
        assert len(r["times_ms"]) == 12 and r["median_ms"] > 0
        assert 0 <= r["window_cv_median"] <= r["window_cv_max"] and 0 <= r["windows_within_3pct"] <= 1


def test_decode_overlap_ab_on_the_tiny_model(tmp_path):
    out = tmp_path / "doa.json"
    _run("decode_overlap_ab.py", "--tiny", "--pairs", "6", "--wait-ms", "1", "--out", str(out))
    d = json.loads(out.read_text())
    assert set(d["arms"]) == {"plain", "controlled", "controlled, ids on the request thread (f22a75c)",
                              "controlled, decision read after the decode"}
    assert all(len(v["wall_ms"]) == 6 for v in d["raw"].values())
    for stats in d["paired_difference"].values():
        for k in ("wall_ms", "cpu_ms", "off_cpu_ms"):
            assert stats[k]["ci95_lo"] <= stats[k]["median"] <= stats[k]["ci95_hi"]


def test_request_latency_records_each_repeat(tmp_path):
    out = tmp_path / "rl.json"
    _run("request_latency.py", "--tiny", "--repeats", "2", "--warmup", "1", "--no-ab", "--out", str(out))
    d = json.loads(out.read_text())
    assert len(d["rows"]) == 12
    for side in ("before", "after"):
        steady = d["host_steadiness"][side]
        assert steady["python_loop_ms_median"] > 0 and 0 <= steady["window_cv_median"] <= steady["window_cv_max"]
    for row in d["rows"]:
        assert len(row["per_repeat"]) == 2 and row["syncs_per_request"] == 0       # no CUDA here
        rep = row["per_repeat"][0]
        assert rep["thread_cpu_ms"] > 0 and rep["involuntary_switches"] >= 0
        assert abs(sum(rep[s] for s in ("preprocess_ms", "stage1_ms", "vision_ms", "prefix_ms", "stage2_ms",
                                        "prefill_rest_ms", "decode_ms", "postprocess_ms"))
                   - rep["latency_ms"]) < 1e-6 * rep["latency_ms"] + 1e-3


def test_handoff_probe_writes_its_table(tmp_path):
    out = tmp_path / "handoff.json"
    _run("handoff_probe.py", "--rounds", "5", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"ThreadPoolExecutor", "run_in_helper", "decode alone"}
    for name in ("ThreadPoolExecutor", "run_in_helper"):
        assert rows[name]["start_us"]["median"] > 0 and rows[name]["collect_us"]["median"] > 0
