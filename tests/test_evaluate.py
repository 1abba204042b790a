"""jobs/evaluate.py end to end on a tiny synthetic run folder (made by an in-process training run with the
plain Learner + RolloutWorker, so the folder has the real layout), plus the pure metric functions, the
random policy and the sample-level determinism that makes Ray sharding result-neutral."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import evaluate as ev
from learner.checkpoint import export_bundle
from rollout_workers.evaluation import EvalRunner, UniformPolicy
from shared import eval_metrics as em
from shared.config import load_config
from shared.controller import Stage1Features, Stage2Features
from shared.knobs import KnobSpace

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "jobs" / "configs" / "ci_synthetic.yaml"
FAST = ["--samples", "12", "--budgets", "3", "--bootstrap", "200", "--no-progress"]
HEAD_POLICIES = ("controller", "lookup_table", "best_static_meeting", "random")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished synthetic run: config.yaml, records/, checkpoints/, best/, bundle/."""
    from jobs.train import bundle_metadata
    from learner.learner import Learner
    from rollout_workers.worker import DirectClient, RolloutWorker
    d = tmp_path_factory.mktemp("run")
    cfg = load_config(CI_CONFIG, [f"system.run_dir={d}", "system.total_updates=4", "system.validate_every=2",
                                  "system.checkpoint_every=2"])
    worker = RolloutWorker(cfg, 0)
    train_ids, val_ids = worker.sample_ids()
    learner = Learner(cfg, str(d), train_ids, val_ids, worker.info())
    worker.run_loop(DirectClient(learner))
    status = learner.stop()
    state = {k: torch.tensor(v) for k, v in learner.controller_state().items()}
    export_bundle(d / "bundle", state, bundle_metadata(cfg, worker.info(), status["policy_version"]))
    return d


@pytest.fixture(scope="module")
def evaluated(run_dir):
    assert ev.main([str(run_dir), *FAST]) == 0
    return run_dir / "eval"


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 2000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_have_every_policy_at_every_budget(evaluated, run_dir):
    report = json.loads((evaluated / "eval.json").read_text())
    for key in ("meta", "budgets_ms", "policies", "static_profile", "rows", "per_budget", "summary",
                "num_test_samples", "num_profile_samples", "failed_samples"):
        assert key in report, key
    cfg = load_config(run_dir / "config.yaml")
    statics = KnobSpace.from_config(cfg.knobs, cfg.model).static_choices(cfg.knobs.static_p)
    assert len(report["static_profile"]) == len(statics) == 75
    budgets = report["budgets_ms"]
    lo, hi = cfg.budget.min_ms, cfg.budget.max_ms
    assert budgets == pytest.approx([lo, (lo + hi) / 2, hi])
    assert report["num_test_samples"] == 12 and report["num_profile_samples"] == 12
    assert report["meta"]["split"] == "test" and report["meta"]["profile_split"] == "train"
    rows = Counter((r["budget_ms"], r["policy"]) for r in report["rows"])
    assert set(rows.values()) == {1}
    assert len(report["policies"]) == len(HEAD_POLICIES) + 75
    for b in budgets:
        for pol in report["policies"]:
            assert (b, pol) in rows, (b, pol)
    for r in report["rows"]:
        if r["policy"] == "best_static_meeting" and r["combination"] is None:
            continue                                    # no static combination meets this budget
        assert r["n"] == 12
        assert 0.0 <= r["attainment"] <= 1.0
        lo, hi = r["accuracy_ci"]
        assert lo <= r["accuracy"] + 1e-9 and r["accuracy"] <= hi + 1e-9
        assert r["p95_latency_ms"] >= r["mean_latency_ms"] * 0.5
        assert (r["mean_overrun_ms"] is None) == (r["violations"] == 0)
        if r["kind"] == "static":
            prof = next(s for s in report["static_profile"] if s["name"] == r["policy"])
            assert r["meets"] == (prof["profile_p95_ms"] <= r["budget_ms"])
    for e in report["per_budget"]:
        k = e["controller_knobs"]
        assert sum(k["tier"].values()) == sum(k["p"].values()) == sum(k["top_k"].values()) == 12
        assert set(k) >= {"tier", "p", "top_k", "num_blocks", "top_joint"}
        assert set(e["controller_segments_ms"]) >= {"vision_ms", "decode_ms"}
        assert set(e["aim"]) >= {"met", "accuracy_ok", "attainment_ok"}
        # the per-question-type breakdown partitions the test samples and averages to the controller's row
        bt = e["controller_by_type"]
        assert sum(t["n"] for t in bt.values()) == 12
        ctl = next(r for r in report["rows"] if r["policy"] == "controller" and r["budget_ms"] == e["budget_ms"])
        assert sum(t["n"] * t["accuracy"] for t in bt.values()) / 12 == pytest.approx(ctl["accuracy"])
    # A static combination's latency does not depend on the budget: same numbers at every budget.
    name = report["policies"][-1]
    lat = {r["mean_latency_ms"] for r in report["rows"] if r["policy"] == name}
    assert len(lat) == 1


def test_lookup_table_follows_profiling_p95(evaluated):
    report = json.loads((evaluated / "eval.json").read_text())
    prof = {s["name"]: s for s in report["static_profile"]}
    for e in report["per_budget"]:
        b, look = e["budget_ms"], e["lookup_table"]
        fitting = [s for s in prof.values() if s["profile_p95_ms"] <= b]
        if fitting:
            assert look["fits"] and prof[look["combination"]]["profile_p95_ms"] <= b
            chosen = prof[look["combination"]]
            assert chosen["profile_accuracy"] == max(s["profile_accuracy"] for s in fitting)
            best = e["best_static_meeting"]["combination"]
            assert prof[best]["test_accuracy"] == max(s["test_accuracy"] for s in fitting)
        else:
            assert not look["fits"] and e["best_static_meeting"] is None
            fastest = min(s["profile_p95_ms"] for s in prof.values())
            assert prof[look["combination"]]["profile_p95_ms"] == fastest


def test_markdown_and_plots(evaluated):
    md = (evaluated / "eval.md").read_text()
    assert "| budget ms | controller acc [95% CI]" in md
    assert md.count("\n| 100 |") >= 3 and "## Static combinations (p = 1)" in md
    for name in ev.PLOTS:
        assert _png_ok(evaluated / name), name
        assert f"]({name})" in md


def test_mismatched_bundle_is_refused(run_dir, tmp_path, capsys):
    rc = ev.main([str(run_dir), *FAST, "--out", str(tmp_path / "x"), "budget.norm_max_ms=500"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "budget_norm" in err
    assert not (tmp_path / "x").exists()
    # A bundle whose knob space differs from the config's, via --config.
    other = tmp_path / "other.yaml"
    other.write_text((run_dir / "config.yaml").read_text())
    rc = ev.main([str(run_dir / "bundle"), "--config", str(other), *FAST, "--out", str(tmp_path / "y"),
                  "knobs.top_k_options=[4,6,8]"])
    assert rc == 2 and "knob_space" in capsys.readouterr().err


def test_checkpoint_folder_best_weights_and_bad_paths(run_dir, tmp_path, capsys):
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    with_progress = [a for a in FAST if a != "--no-progress"]
    assert ev.main([str(ckpt), *with_progress, "--out", str(tmp_path / "ck")]) == 0
    assert "24/24 samples (100%)" in capsys.readouterr().err          # the progress line
    rep = json.loads((tmp_path / "ck" / "eval.json").read_text())
    assert rep["meta"]["source"] == str(ckpt)
    assert (run_dir / "best" / "controller.safetensors").exists()
    assert ev.main([str(run_dir), "--weights", "best", *FAST, "--out", str(tmp_path / "best")]) == 0
    best = json.loads((tmp_path / "best" / "eval.json").read_text())
    assert best["meta"]["source"] == str(run_dir / "best" / "controller.safetensors")
    assert ev.main([str(tmp_path / "nope"), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ev.main([str(run_dir), *FAST, "--split", "val", "--profile-split", "val"]) == 2
    assert "must differ" in capsys.readouterr().err


def test_sample_results_do_not_depend_on_the_shard(run_dir):
    """Per-sample reseeding: a sample gives the same numbers in any runner, order or shard (so Ray
    sharding changes nothing), and the controller is run once per budget."""
    cfg = load_config(run_dir / "config.yaml")
    target = ev.resolve_target(run_dir)
    samples = ev.load_split(cfg, "test", 4)
    a = EvalRunner(cfg, target.state, worker_id=0)
    b = EvalRunner(cfg, target.state, worker_id=1)
    budgets = [150.0, 300.0]
    ra = [a.evaluate(s, "test", budgets) for s in samples]
    rb = [b.evaluate(s, "test", budgets) for s in reversed(samples)][::-1]
    assert ra == rb
    assert len(ra[0]["controller"]["accuracy"]) == 2 and len(ra[0]["static"]["latency_ms"]) == 75


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------
def test_controller_by_type_by_hand():
    def res(qt, acc, crops, blocks):
        knobs = {"tier": "x", "max_crops": crops, "p": 1, "top_k": 2, "num_blocks": blocks}
        return {"question_type": qt, "controller": {"accuracy": [0.0, acc], "latency_ms": [1.0, 10.0 * blocks],
                                                    "knobs": [dict(knobs, max_crops=1), knobs]}}
    test = [res("lookup", 1.0, 1, 6), res("lookup", 0.0, 1, 8), res("checker", 1.0, 9, 2)]
    bt = ev.controller_by_type(test, 1)
    assert list(bt) == ["checker", "lookup"]
    assert bt["lookup"] == {"n": 2, "accuracy": 0.5, "latency_ms": 70.0, "max_crops": 1.0, "top_k": 2.0,
                            "num_blocks": 7.0}
    assert bt["checker"]["max_crops"] == 9.0 and bt["checker"]["n"] == 1
    assert ev.controller_by_type(test, 0)["checker"]["max_crops"] == 1.0


def test_policy_metrics_by_hand():
    m = em.policy_metrics(np.array([1.0, 0.0, 1.0, 1.0]), np.array([90.0, 110.0, 130.0, 100.0]), 100.0,
                          num_resamples=500)
    assert m["n"] == 4 and m["accuracy"] == 0.75 and m["attainment"] == 0.5 and m["violations"] == 2
    assert m["mean_overrun_ms"] == pytest.approx(20.0) and m["mean_overrun_rel"] == pytest.approx(0.2)
    assert m["mean_latency_ms"] == pytest.approx(107.5)
    assert m["p95_latency_ms"] == pytest.approx(np.quantile([90, 110, 130, 100], 0.95))
    assert 0.0 <= m["accuracy_ci"][0] <= 0.75 <= m["accuracy_ci"][1] <= 1.0
    clean = em.policy_metrics(np.ones(3), np.full(3, 50.0), 100.0)
    assert clean["mean_overrun_ms"] is None and clean["attainment"] == 1.0
    assert clean["accuracy_ci"] == [1.0, 1.0]


def test_bootstrap_ci_covers_and_narrows():
    rng = np.random.default_rng(0)
    small, big = rng.random(30) < 0.6, rng.random(3000) < 0.6
    lo_s, hi_s = em.bootstrap_ci(small)
    lo_b, hi_b = em.bootstrap_ci(big)
    assert lo_s < small.mean() < hi_s and lo_b < big.mean() < hi_b
    assert hi_b - lo_b < (hi_s - lo_s) / 3
    assert em.bootstrap_ci(small, seed=3) == em.bootstrap_ci(small, seed=3)
    assert all(math.isnan(x) for x in em.bootstrap_ci(np.array([])))


def test_lookup_choice_and_best_meeting():
    acc = [0.3, 0.6, 0.9, 0.6]
    q = [100.0, 200.0, 300.0, 150.0]
    assert em.lookup_choice(acc, q, 99.0) == (0, False)          # none fits: the fastest
    assert em.lookup_choice(acc, q, 100.0) == (0, True)          # p95 == budget fits
    assert em.lookup_choice(acc, q, 250.0) == (3, True)          # tie on accuracy: the lower p95
    assert em.lookup_choice(acc, q, 1e9) == (2, True)
    assert em.best_meeting([0.1, 0.8, 0.2, 0.5], q, 250.0) == 1
    assert em.best_meeting(acc, q, 50.0) is None


def test_knob_distribution():
    ks = [{"tier": "low", "p": 1, "top_k": 4, "num_blocks": 12}] * 3 + \
         [{"tier": "high", "p": 2, "top_k": 8, "num_blocks": 16}]
    d = em.knob_distribution(ks)
    assert d["tier"] == {"high": 1, "low": 3} and d["p"] == {"1": 3, "2": 1}
    assert d["top_joint"][0] == {"knobs": "tier=low/p=1/top_k=4/num_blocks=12", "count": 3}


def test_uniform_policy_is_uniform_over_feasible_options():
    """With a knob space where num_blocks masking binds (p=3 leaves fewer options) and a collapsed
    tier, the joint draw is uniform over the feasible (tier, p, top_k, num_blocks) options."""
    cfg = load_config(CI_CONFIG, ["knobs.insertion_positions=[1,3]", "knobs.num_blocks_options=[2,3,4]",
                                  "model.num_layers=4", "knobs.top_k_options=[1,2]"])
    space = KnobSpace.from_config(cfg.knobs, cfg.model)
    pol = UniformPolicy.from_config(cfg, space)
    gen = torch.Generator().manual_seed(0)
    f1 = Stage1Features(lang_feat=np.zeros(cfg.model.d_model, np.float32), budget_ms=200.0,
                        tier_tokens=[100, 200, 200], tier_mask=space.tier_mask([100, 200, 200]),
                        p_mask=[True, True])
    counts: Counter = Counter()
    n = 12000
    for _ in range(n):
        t, p = pol.act_stage1(f1, generator=gen)
        f2 = Stage2Features(latency_state=np.zeros(cfg.model.d_model, np.float32), p_idx=p.index,
                            vision_tokens=1, spent_frac=0.1,
                            nb_mask=space.num_blocks_feasible(space.positions[p.index]))
        k, nb = pol.act_stage2(200.0, f2, generator=gen)
        assert f1.tier_mask[t.index] and f2.nb_mask[nb.index]
        total_logp = t.log_prob + p.log_prob + k.log_prob + nb.log_prob
        counts[(t.index, p.index, k.index, nb.index)] += 1
    # feasible: 2 tiers x 2 top_k x (p=1: nb in {2,3,4} -> 3; p=3: nb=4 -> 1) = 16 options
    assert len(counts) == 16
    assert total_logp == pytest.approx(-math.log(16))
    for c in counts.values():
        assert abs(c / n - 1 / 16) < 0.015
