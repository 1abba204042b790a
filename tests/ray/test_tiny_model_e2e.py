"""End to end on the session Ray cluster with the embedded default: the tiny shapes MolmoE (real model
code, real request path, real images), 2 CPU rollout workers, a few GRPO updates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_cfg, run_job

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

DEFAULT = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "default.yaml"


def test_default_config_trains_the_tiny_model_with_two_workers(ray_cluster, tmp_path):
    from shared.calibration import apply_calibration
    cfg = apply_calibration(make_cfg(tmp_path, "system.total_updates=4", "system.validate_every=2",
                                     "data.val_samples=4", "grpo.groups_per_update=4", "grpo.group_size=4",
                                     "system.checkpoint_every=2", config=DEFAULT))
    assert cfg.budget.min_ms > 0 and cfg.budget.max_ms > cfg.budget.min_ms       # from the calibration file
    job, status, summary, out = run_job(cfg)
    assert status["step"] == 4 and status["done"]
    assert "backend molmoe (tiny_molmoe_shapes" in out.text
    from shared.records import read_record_dir
    rows = read_record_dir(tmp_path / "records").to_pylist()
    assert len(rows) == 4 * cfg.grpo.groups_per_update * cfg.grpo.group_size
    assert sorted({r["step"] for r in rows}) == [0, 1, 2, 3]
    assert {r["worker_id"] for r in rows} == {0, 1}
    for r in rows:
        assert r["num_crops"] >= 2 and r["vision_tokens"] > 0          # images went through the vision path
        assert r["tier"] in cfg.knobs.tier_names and r["p"] < r["num_blocks"]
        assert r["latency_ms"] > 0 and abs(sum(r[s] for s in ("preprocess_ms", "stage1_ms", "vision_ms",
                                                              "prefix_ms", "stage2_ms", "prefill_rest_ms",
                                                              "decode_ms", "postprocess_ms")) - r["latency_ms"]) < 1e-3
        assert len(r["latency_state"]) == cfg.model.d_model and 0 <= r["accuracy"] <= 1
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["model_id"] == "tiny_molmoe_shapes" and meta["engine"] == "eager"
    assert len(json.loads((tmp_path / "validation.jsonl").read_text().splitlines()[0])) > 0
