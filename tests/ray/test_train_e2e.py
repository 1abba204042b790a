"""End to end on the session Ray cluster: TrainingJob with the synthetic backend and 2 workers, the run
folder's content, the zero-lag importance-ratio check through Ray and Parquet, and resume."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import RAY_TIMEOUT_S, assert_state_equal, committed_rows, make_cfg, run_job

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


@pytest.fixture(scope="module")
def reference_run(ray_session, tmp_path_factory):
    """An uninterrupted run (grpo.lr=0 for the zero-lag check) shared by the tests of this module."""
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = make_cfg(run_dir, "grpo.lr=0")
    job, status, summary, out = run_job(cfg)
    return {"cfg": cfg, "run_dir": run_dir, "status": status, "summary": summary, "out": out,
            "info": job.backend_info}


def test_run_folder_progress_and_summary(reference_run):
    cfg, run_dir, status = reference_run["cfg"], reference_run["run_dir"], reference_run["status"]
    n = cfg.system.total_updates
    assert status["step"] == n and status["policy_version"] == n and status["done"]
    text = reference_run["out"].text
    assert "2 rollout worker(s) on CPU; backend synthetic" in text
    progress = [ln for ln in reference_run["out"].lines if ln.startswith("[train] step")]
    assert progress and f"step {n:5d}" in progress[-1]
    for field in ("rollouts/s", "reward", "acc", "attain", f"v{n}", "drops 0", "restarts 0"):
        assert field in progress[-1]
    assert f"[train] done: {n} updates, {n * 16} rollouts recorded" in text
    assert "first tenth" in text

    rows = committed_rows(run_dir, cfg, n)
    assert {r["worker_id"] for r in rows} == {0, 1}                     # both workers contributed
    assert len({r["sample_id"] for r in rows}) == len(rows) // cfg.grpo.group_size   # no sample twice

    # Zero-lag check through worker -> Ray -> learner -> Parquet.
    assert max(abs(r["ratio_first"] - 1.0) for r in rows) <= 1e-5
    assert len({r["policy_version"] for r in rows}) > 1                # weights were broadcast and pulled

    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, n + 1))
    for m in metrics:
        assert m["update_ms"] > 0 and m["broadcast_ms"] >= 0 and m["rollouts_per_s"] > 0
        assert 0 <= m["learner_idle_fraction"] <= 1 and m["ratio_first_max_abs_dev"] <= 1e-5

    vals = [json.loads(ln) for ln in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert len(vals) == n // cfg.system.validate_every
    assert all(v["rollouts"] == 3 * cfg.data.val_samples for v in vals)
    assert (run_dir / "best" / "controller.safetensors").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{n:06d}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == json.loads(json.dumps(reference_run["summary"]))
    assert summary["steps"] == n and summary["rollouts"] == len(rows)
    assert summary["counters"]["groups"] >= n * cfg.grpo.groups_per_update
    for k in ("reward", "accuracy", "attainment"):
        assert set(summary[k]) >= {"first_tenth", "last_tenth", "diff", "se", "z"}

    from shared.config import load_config, to_dict
    assert to_dict(load_config(run_dir / "config.yaml")) == to_dict(cfg)   # the resolved config


def test_bundle_matches_run_and_refuses_other_settings(reference_run):
    from jobs.train import bundle_metadata
    from learner.checkpoint import CheckpointError, latest_checkpoint, load_bundle, load_checkpoint
    cfg, run_dir = reference_run["cfg"], reference_run["run_dir"]
    expected = bundle_metadata(cfg, reference_run["info"], cfg.system.total_updates)
    state, meta = load_bundle(run_dir / "bundle", expected=expected)
    assert meta["policy_version"] == cfg.system.total_updates
    assert meta["model_id"] == reference_run["info"]["model_id"] and meta["backend"] == "synthetic"
    ckpt_state, _ = load_checkpoint(latest_checkpoint(run_dir))
    ctrl = ckpt_state["controller"]
    for k, v in state.items():
        assert torch.equal(v, ctrl[k].to(v.dtype)), k
    with pytest.raises(CheckpointError, match="engine"):
        load_bundle(run_dir / "bundle", expected={**expected, "engine": "fast"})
    with pytest.raises(CheckpointError, match="budget_norm"):
        load_bundle(run_dir / "bundle", expected={**expected, "budget_norm": [100.0, 500.0]})


def test_resume_after_stop(reference_run, ray_cluster, tmp_path, faults, monkeypatch):
    """Stop after k updates (the SIGTERM path), resume with --resume: same final step count as the
    uninterrupted run, every committed group exactly once, no sample skipped or repeated, and the
    resumed optimizer state equals the saved one."""
    import jobs.actors
    from jobs.train import load_run_config, parse_args
    from learner.checkpoint import latest_checkpoint, load_checkpoint
    from learner.dispenser import SampleDispenser
    from shared.datasets import load_samples

    n = reference_run["cfg"].system.total_updates
    cfg = make_cfg(tmp_path, "grpo.lr=1e-2", f"system.total_updates={n}", "system.checkpoint_every=4")
    faults.slow(20)                     # pace the workers so the stop lands mid-run

    def stop_early(status, job):
        if status["step"] >= 2:
            job.stop_requested = True

    _, st1, _, out1 = run_job(cfg, on_status=stop_early)
    k = st1["step"]
    assert 2 <= k < n, f"the stop landed at step {k}"
    assert "stop requested" in out1.text
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == f"step-{k:06d}"                      # the stop wrote a final checkpoint
    saved, saved_meta = load_checkpoint(ckpt)
    assert saved["step"] == k

    # Resume through the command-line path; capture the learner's state before any worker runs.
    faults.fast()
    captured = {}
    real_make_learner = jobs.actors.make_learner

    def make_learner(*args, **kw):
        handle = real_make_learner(*args, **kw)
        captured.update(jobs.actors.ray.get(handle.__ray_call__.remote(
            lambda self: {"optimizer": self.trainer.optimizer.state_dict(),
                          "controller": self.trainer.controller.state_dict(),
                          "step": self.trainer.step, "dispenser": self.dispenser.state_dict()}),
            timeout=RAY_TIMEOUT_S))
        return handle

    monkeypatch.setattr(jobs.actors, "make_learner", make_learner)
    cfg2 = load_run_config(parse_args(["--resume", str(tmp_path)]))
    assert cfg2.system.total_updates == n and cfg2.system.run_dir == str(tmp_path)
    _, st2, summary, out2 = run_job(cfg2, resume=True)

    assert captured["step"] == k
    assert_state_equal(captured["optimizer"], saved["optimizer"], "optimizer")
    assert_state_equal(captured["controller"], saved["controller"], "controller")
    assert captured["dispenser"] == saved_meta["dispenser"]
    assert any(v["exp_avg"].abs().sum() > 0 for v in captured["optimizer"]["state"].values())

    assert st2["step"] == reference_run["status"]["step"] == n          # same as uninterrupted
    assert summary["steps"] == n
    rows = committed_rows(tmp_path, cfg2, n)
    assert len(rows) == len(committed_rows(reference_run["run_dir"], reference_run["cfg"], n))
    per_sample = Counter(r["sample_id"] for r in rows)
    assert set(per_sample.values()) == {cfg2.grpo.group_size}            # no sample repeated
    # No sample skipped: the committed ids are exactly the epoch order up to the dispenser's cursor,
    # minus the ids it still has to hand out again.
    _, final_meta = load_checkpoint(latest_checkpoint(tmp_path))
    d = final_meta["dispenser"]
    assert d["epoch"] == 0
    train_ids = [s.sample_id for s in load_samples(cfg2, "train")]
    order = SampleDispenser(train_ids, seed=d["seed"])._order(0)
    assert set(per_sample) == set(order[:d["cursor"]]) - set(d["released"])
    assert d["committed_total"] == len(per_sample)
