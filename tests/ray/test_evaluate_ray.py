"""jobs/evaluate.py with --workers 2: samples sharded over two Ray actors give exactly the in-process
result (per-sample seeding), the actors are torn down, and a mismatching bundle is refused before any
sample runs."""
from __future__ import annotations

import json

import pytest
import torch

from tests.ray.conftest import CI_CONFIG


def _bundle_run(folder):
    from jobs.train import bundle_metadata
    from learner.checkpoint import export_bundle
    from rollout_workers.backends import make_backend
    from shared.config import dump_config, load_config
    from shared.controller import TwoStageController
    cfg = load_config(CI_CONFIG, [f"system.run_dir={folder}"])
    backend = make_backend(cfg)
    info = backend.info()
    torch.manual_seed(0)
    ctl = TwoStageController.from_config(cfg, backend.space, token_rms=info.token_rms)
    export_bundle(folder / "bundle", dict(ctl.state_dict()), bundle_metadata(cfg, vars(info), 0))
    dump_config(cfg, folder / "config.yaml")
    return cfg


def test_ray_shards_equal_in_process(ray_cluster, tmp_path):
    from jobs import evaluate as ev
    cfg = _bundle_run(tmp_path)
    target = ev.resolve_target(tmp_path)
    kw = dict(budgets=3, samples=10, bootstrap=100, progress=False, print_fn=lambda s: None)
    local = ev.evaluate(target, cfg, workers=1, out_dir=tmp_path / "local", **kw)
    sharded = ev.evaluate(target, cfg, workers=2, out_dir=tmp_path / "ray", **kw)
    assert sharded["meta"]["workers"] == 2
    for key in ("rows", "per_budget", "static_profile", "summary"):
        assert sharded[key] == local[key], key
    assert json.loads((tmp_path / "ray" / "eval.json").read_text())["rows"] == \
        json.loads((tmp_path / "local" / "eval.json").read_text())["rows"]


def test_ray_mismatch_refused(ray_cluster, tmp_path):
    from jobs import evaluate as ev
    from learner.checkpoint import CheckpointError
    from shared.config import load_config
    _bundle_run(tmp_path)
    target = ev.resolve_target(tmp_path)
    cfg = load_config(tmp_path / "config.yaml", ["budget.norm_min_ms=50"])
    with pytest.raises(CheckpointError, match="budget_norm"):
        ev.evaluate(target, cfg, workers=2, samples=4, budgets=2, progress=False, out_dir=tmp_path / "x",
                    print_fn=lambda s: None)
    assert not (tmp_path / "x").exists()
