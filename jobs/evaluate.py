"""Evaluate a trained controller against static knob settings, a lookup table and a random policy.

Usage:
    python jobs/evaluate.py runs/default                       # the run's bundle, config and eval/ folder
    python jobs/evaluate.py runs/default --weights best        # the best-by-validation controller
    python jobs/evaluate.py runs/default/bundle --config X.yaml --budgets 12 --split val --out /tmp/ev
    python jobs/evaluate.py runs/default/checkpoints/step-000030 --samples 400 --workers 4
    python jobs/evaluate.py runs/default system.torch_threads=1   # config overrides key.sub=value

CHECKPOINT_OR_RUN_DIR is a run folder (uses its bundle/, or its latest checkpoint when no bundle was
exported), a bundle folder (bundle.json + controller.safetensors) or a checkpoint folder
(checkpoints/step-N). The config is the run's config.yaml unless --config is given, with
`budget.calibration` applied (so the budget grid is the calibrated range). The bundle's metadata (model,
engine, device, calibration, knob spaces, importance hash, budget normalisation, controller sizes) must
match what this config and this machine's backend would produce (`jobs.train.bundle_metadata`);
otherwise the evaluation is refused: budgets in ms are engine- and GPU-specific.

What is compared, on the held-out split (--split test|val) at --budgets budgets evenly spaced over
[budget.min_ms, budget.max_ms]:
- controller: the trained controller, greedy, one request per (sample, budget);
- static:<tier>/p<p>/k<top_k>/nb<num_blocks>: every combination at p = knobs.static_p, each run ONCE
  per sample (a static setting's latency does not depend on the budget) and scored at every budget;
- lookup_table: per budget, the combination with the best accuracy whose p95 latency on a SEPARATE
  profiling split (--profile-split, default the training split; disjoint sample ids) fits the budget;
- best_static_meeting: the static combination with the best TEST accuracy among those that meet the
  budget (p95 on the profiling split fits) — an oracle over the static set, the comparison target;
- random: uniform over the feasible options (tier, p, top_k, num_blocks) of each request.

Metrics per (budget, policy): accuracy with a bootstrap 95% interval, attainment (share within budget),
mean and p95 latency, mean overrun of the violations; per budget the controller's knob distribution,
its mean knobs and accuracy per question type, and its paired accuracy difference to the lookup table and
to the best static combination.

Output (default <run>/eval/): eval.json, eval.md, accuracy_vs_budget.png, attainment_vs_budget.png,
latency_accuracy.png. A progress line goes to stderr. --workers N (> 1) shards the samples over N Ray
actors (RAY_ADDRESS or --address, else a local Ray); 1 runs in-process.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:          # `python jobs/evaluate.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from learner.checkpoint import CheckpointError, check_bundle_meta, load_checkpoint  # noqa: E402
from shared import eval_metrics as em  # noqa: E402

PLOTS = ("accuracy_vs_budget.png", "attainment_vs_budget.png", "latency_accuracy.png")
AIM_ATTAINMENT = 0.95


class EvalError(RuntimeError):
    """The evaluation cannot run as asked; the message says why."""


# ----------------------------------------------------------------------------------------------
# What to evaluate: controller weights + the metadata they were trained under
# ----------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A controller to evaluate: its tensors, its metadata and where it came from."""

    state: dict                       # controller tensors
    meta: dict                        # bundle metadata (as exported, or rebuilt from a checkpoint)
    source: Path                      # the bundle / checkpoint / weights file used
    run_dir: Optional[Path]           # the run folder it belongs to, if any
    config_path: Optional[Path]       # the run's config.yaml, if any


def _meta_from_checkpoint(ckpt: Path) -> tuple[dict, dict]:
    from jobs.train import bundle_metadata
    from shared.config import config_from_dict
    state, sj = load_checkpoint(ckpt)
    if "config" not in sj or "backend_info" not in sj:
        raise CheckpointError(f"checkpoint {ckpt} has no config/backend_info in state.json")
    ccfg = config_from_dict(sj["config"], src=str(ckpt / "state.json"))
    return state["controller"], bundle_metadata(ccfg, sj["backend_info"], int(sj.get("policy_version", 0)))


def resolve_target(path: str | Path, weights: str = "final") -> Target:
    """Find the controller in a run, bundle or checkpoint folder (see the module docstring).

    Args:
        weights: "final" (the exported bundle / the checkpoint) or "best" (the run's best-by-validation
            controller, with the run's bundle metadata).
    """
    from learner.checkpoint import latest_checkpoint, load_bundle
    from safetensors.torch import load_file
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if (p / "bundle.json").is_file():                              # a bundle folder
        run_dir = p.parent if (p.parent / "config.yaml").is_file() else None
        bundle = p
    elif (p / "trainer.pt").is_file():                             # a checkpoint folder
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
        state, meta = _meta_from_checkpoint(p)
        return Target(state, meta, p, run_dir, run_dir / "config.yaml" if run_dir else None)
    elif p.is_dir() and ((p / "bundle" / "bundle.json").is_file() or (p / "checkpoints").is_dir()):
        run_dir, bundle = p, p / "bundle"
    else:
        raise CheckpointError(f"{p} is neither a run folder, a bundle folder (bundle.json) nor a checkpoint "
                              f"folder (trainer.pt)")
    config_path = run_dir / "config.yaml" if run_dir and (run_dir / "config.yaml").is_file() else None
    if (bundle / "bundle.json").is_file():
        state, meta = load_bundle(bundle)
        source = bundle
    else:                                                          # a run that exported no bundle yet
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"run folder {run_dir} has neither bundle/ nor a checkpoint")
        state, meta = _meta_from_checkpoint(ckpt)
        source = ckpt
    if weights == "best":
        if run_dir is None or not (run_dir / "best" / "controller.safetensors").is_file():
            raise CheckpointError(f"--weights best: no best/controller.safetensors in {run_dir or p}")
        source = run_dir / "best" / "controller.safetensors"
        try:
            state = load_file(str(source))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{source} cannot be read: {exc}") from exc
    elif weights != "final":
        raise ValueError(f"weights must be 'final' or 'best', got {weights!r}")
    return Target(state, meta, source, run_dir, config_path)


def expected_meta(cfg, backend_info: dict, policy_version: int = 0) -> dict:
    """The metadata a bundle trained under this config on this backend would carry."""
    from jobs.train import bundle_metadata
    return bundle_metadata(cfg, backend_info, policy_version)


# ----------------------------------------------------------------------------------------------
# Data: held-out split and a separate profiling split
# ----------------------------------------------------------------------------------------------
def load_split(cfg, split: str, limit: int = 0, seed: int = 0) -> list:
    """Samples of `split` of the configured mixture, at most `limit` (0 = all).

    "train" and "val" are each source's `split` / `val_split`; any other name ("test", "calibration")
    is read as that split of every source. Each source is asked for at most `limit` samples (its
    `max_samples`), so a large training split is not generated whole; generated data sets size their
    held-out splits by data.val_samples, which is raised to `limit` here (neither changes any bundle
    metadata). Over `limit` in total (several sources), a seeded random subset in the original order.
    """
    from shared.datasets import load_samples
    c = copy.deepcopy(cfg)
    if limit:
        c.data.val_samples = max(c.data.val_samples, limit)
    for src in c.data.sources:
        if limit and (not src.max_samples or src.max_samples > limit):
            src.max_samples = limit
        if split not in ("train", "val"):
            src.val_split = split
    samples = load_samples(c, "train" if split == "train" else "val")
    if limit and len(samples) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
        samples = [samples[i] for i in keep]
    return samples


# ----------------------------------------------------------------------------------------------
# Progress line
# ----------------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, every ~10% otherwise)."""

    def __init__(self, total: int, label: str = "eval", stream=None, enabled: bool = True):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self._last_decile = -1

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = self.done / self.total
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = (f"[{self.label}] [{bar}] {self.done}/{self.total} samples ({100 * frac:3.0f}%) | "
                f"{rate:.1f} samples/s | eta {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or self.done >= self.total:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()


# ----------------------------------------------------------------------------------------------
# Running: in-process or over Ray actors
# ----------------------------------------------------------------------------------------------
def _numpy_state(state: dict) -> dict:
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
            for k, v in state.items()}


def run_in_process(cfg, target: Target, items: list, budgets: list[float], progress: Progress,
                   check: Callable[[dict], None]) -> tuple[list[dict], dict]:
    from rollout_workers.evaluation import EvalRunner
    runner = EvalRunner(cfg, None, worker_id=0)
    info = runner.info()
    check(info)
    runner.set_controller(target.state)
    out = []
    for item in items:
        out.append(runner.evaluate(item[0], item[1], budgets))
        progress.update(1)
    return out, info


def _init_ray(cfg, address: Optional[str], workers: int) -> dict:
    import ray

    from jobs.train import _set_env
    env = _set_env(cfg)
    if ray.is_initialized():
        return env
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers), _node_ip_address="127.0.0.1",
                 include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    return env


def run_ray(cfg, target: Target, items: list, budgets: list[float], progress: Progress,
            check: Callable[[dict], None], workers: int, address: Optional[str] = None, chunk: int = 0,
            timeout_s: float = 3600.0) -> tuple[list[dict], dict]:
    """Shard the samples over `workers` Ray actors (one backend each), handing out chunks as they finish."""
    import ray

    from rollout_workers.evaluation import EvalRunner
    env = _init_ray(cfg, address, workers)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and cfg.model.backend != "synthetic"
    cls = ray.remote(EvalRunner)
    opts = {"num_cpus": 1, "num_gpus": cfg.system.gpus_per_worker if use_gpu else 0, "max_restarts": 0,
            "runtime_env": {"env_vars": env}}
    actors = [cls.options(**opts).remote(cfg, None, i) for i in range(workers)]
    try:
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=cfg.system.worker_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise EvalError(f"evaluation workers did not start (backend load failed or no free "
                            f"resources): {type(exc).__name__}: {exc}") from exc
        for info in infos:                  # every shard's setting must match (nodes may differ)
            check(info)
        state_ref = ray.put(_numpy_state(target.state))
        ray.get([a.set_controller.remote(state_ref) for a in actors], timeout=cfg.system.worker_timeout_s)
        size = chunk or max(1, min(16, len(items) // (workers * 4) or 1))
        chunks = [(i, items[i:i + size]) for i in range(0, len(items), size)]
        results: list[Optional[dict]] = [None] * len(items)
        pending: dict = {}
        free = list(actors)
        nxt = 0
        deadline = time.monotonic() + timeout_s
        while nxt < len(chunks) or pending:
            while free and nxt < len(chunks):
                actor = free.pop()
                start, part = chunks[nxt]
                pending[actor.evaluate_many.remote(part, budgets)] = (actor, start, len(part))
                nxt += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(1.0, deadline - time.monotonic()))
            if not ready:
                raise EvalError(f"evaluation over Ray made no progress for {timeout_s:.0f}s")
            for ref in ready:
                actor, start, n = pending.pop(ref)
                try:
                    results[start:start + n] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise EvalError(f"an evaluation worker failed on samples {start}..{start + n - 1}: "
                                    f"{type(exc).__name__}: {exc}") from exc
                free.append(actor)
                progress.update(n)
        return [r for r in results if r is not None], infos[0]
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def static_name(choice) -> str:
    return f"static:{choice.tier}/p{choice.p}/k{choice.top_k}/nb{choice.num_blocks}"


def controller_by_type(test: list[dict], b_idx: int) -> dict:
    """The controller's accuracy and mean knobs per question type at budget index `b_idx`: does it spend
    crops and blocks where the question needs them? {type: {n, accuracy, max_crops, top_k, num_blocks,
    latency_ms}} (means over that type's test samples), sorted by type; "" for samples without a type."""
    groups: dict[str, list[dict]] = {}
    for r in test:
        groups.setdefault(r.get("question_type", ""), []).append(r)
    out = {}
    for qt in sorted(groups):
        rs = groups[qt]
        knobs = [r["controller"]["knobs"][b_idx] for r in rs]
        out[qt] = {"n": len(rs),
                   "accuracy": float(np.mean([r["controller"]["accuracy"][b_idx] for r in rs])),
                   "latency_ms": float(np.mean([r["controller"]["latency_ms"][b_idx] for r in rs])),
                   **{k: float(np.mean([kn[k] for kn in knobs])) for k in ("max_crops", "top_k", "num_blocks")}}
    return out


def build_report(results: list[dict], statics: list, budgets: list[float], *, num_resamples: int = 1000,
                 seed: int = 0) -> dict:
    """Per-budget, per-policy metrics from the per-sample results (see the module docstring).

    Args:
        results: EvalRunner.evaluate outputs (role "test" and "profile"; failed samples carry "error").
        statics: the static KnobChoices, in the runner's order.
        budgets: the budget grid (ms).
    """
    test = [r for r in results if r["role"] == "test" and "error" not in r]
    prof = [r for r in results if r["role"] == "profile" and "error" not in r]
    failed = [{"sample_id": r["sample_id"], "role": r["role"], "error": r["error"]}
              for r in results if "error" in r]
    first = f"; first error: {failed[0]['error']}" if failed else ""
    if not test:
        raise EvalError("no test sample could be evaluated" + first)
    if not prof:
        raise EvalError("no profiling sample could be evaluated" + first)
    names = [static_name(c) for c in statics]
    s_acc = np.array([r["static"]["accuracy"] for r in test]).T            # [C, N]
    s_lat = np.array([r["static"]["latency_ms"] for r in test]).T          # [C, N]
    p_acc = np.array([r["static"]["accuracy"] for r in prof]).T            # [C, M]
    p_lat = np.array([r["static"]["latency_ms"] for r in prof]).T          # [C, M]
    c_acc = np.array([r["controller"]["accuracy"] for r in test]).T        # [B, N]
    c_lat = np.array([r["controller"]["latency_ms"] for r in test]).T      # [B, N]
    r_acc = np.array([r["random"]["accuracy"] for r in test]).T            # [B, N]
    r_lat = np.array([r["random"]["latency_ms"] for r in test]).T          # [B, N]
    prof_p95 = np.array([em.p95(x) for x in p_lat])                        # [C]
    prof_acc = p_acc.mean(axis=1)                                          # [C]
    test_acc = s_acc.mean(axis=1)                                          # [C]
    kw = {"num_resamples": num_resamples, "seed": seed}

    static_profile = []
    for i, (name, ch) in enumerate(zip(names, statics)):
        lo, hi = em.bootstrap_ci(s_acc[i], **kw)
        static_profile.append({
            "name": name, "knobs": dataclasses.asdict(ch), "profile_accuracy": float(prof_acc[i]),
            "profile_mean_ms": float(p_lat[i].mean()), "profile_p95_ms": float(prof_p95[i]),
            "test_accuracy": float(test_acc[i]), "test_accuracy_ci": [lo, hi],
            "test_mean_ms": float(s_lat[i].mean()), "test_p95_ms": em.p95(s_lat[i])})

    rows, per_budget = [], []
    for b_idx, b in enumerate(budgets):
        def row(policy: str, kind: str, acc, lat, b=b, **extra) -> dict:
            return {"budget_ms": float(b), "policy": policy, "kind": kind, **extra,
                    **em.policy_metrics(acc, lat, b, **kw)}
        look, fits = em.lookup_choice(prof_acc, prof_p95, b)
        best = em.best_meeting(test_acc, prof_p95, b)
        ctl_row = row("controller", "controller", c_acc[b_idx], c_lat[b_idx])
        rows.append(ctl_row)
        rows.append(row("lookup_table", "lookup_table", s_acc[look], s_lat[look], combination=names[look],
                        fits=fits))
        if best is not None:
            best_row = row("best_static_meeting", "oracle", s_acc[best], s_lat[best], combination=names[best])
        else:
            best_row = {"budget_ms": float(b), "policy": "best_static_meeting", "kind": "oracle",
                        "combination": None, "n": 0, "accuracy": None, "accuracy_ci": [None, None],
                        "attainment": None, "violations": 0, "mean_latency_ms": None,
                        "p95_latency_ms": None, "mean_overrun_ms": None, "mean_overrun_rel": None}
        rows.append(best_row)
        rows.append(row("random", "random", r_acc[b_idx], r_lat[b_idx]))
        for i, name in enumerate(names):
            rows.append(row(name, "static", s_acc[i], s_lat[i], combination=name,
                            meets=bool(prof_p95[i] <= b)))
        knobs = [r["controller"]["knobs"][b_idx] for r in test]
        segs = [r["controller"]["segments_ms"][b_idx] for r in test]
        seg_mean = {k: float(np.mean([s.get(k, 0.0) for s in segs])) for k in segs[0]} if segs else {}
        entry = {"budget_ms": float(b),
                 "lookup_table": {"combination": names[look], "fits": fits,
                                  "profile_p95_ms": float(prof_p95[look]),
                                  "profile_accuracy": float(prof_acc[look])},
                 "best_static_meeting": None if best is None else {
                     "combination": names[best], "profile_p95_ms": float(prof_p95[best]),
                     "test_accuracy": float(test_acc[best])},
                 "static_meeting": int((prof_p95 <= b).sum()),
                 "controller_knobs": em.knob_distribution(knobs),
                 "controller_by_type": controller_by_type(test, b_idx),
                 "controller_segments_ms": seg_mean,
                 "controller_vs_lookup": em.paired_diff_ci(c_acc[b_idx], s_acc[look], **kw),
                 "controller_vs_best_static": (em.paired_diff_ci(c_acc[b_idx], s_acc[best], **kw)
                                               if best is not None else None)}
        target_acc = best_row["accuracy"] if best is not None else None
        entry["aim"] = {
            "accuracy_ok": target_acc is None or ctl_row["accuracy"] >= target_acc,
            "attainment_ok": ctl_row["attainment"] >= AIM_ATTAINMENT,
            "accuracy_shortfall": (None if target_acc is None
                                   else max(0.0, target_acc - ctl_row["accuracy"])),
            "attainment_shortfall": max(0.0, AIM_ATTAINMENT - ctl_row["attainment"])}
        entry["aim"]["met"] = entry["aim"]["accuracy_ok"] and entry["aim"]["attainment_ok"]
        per_budget.append(entry)

    ctl_rows = [r for r in rows if r["policy"] == "controller"]
    summary = {
        "budgets": len(budgets),
        "aim_met_budgets": int(sum(e["aim"]["met"] for e in per_budget)),
        "controller_mean_accuracy": float(np.mean([r["accuracy"] for r in ctl_rows])),
        "controller_min_attainment": float(min(r["attainment"] for r in ctl_rows)),
        "lookup_mean_accuracy": float(np.mean([r["accuracy"] for r in rows
                                                if r["policy"] == "lookup_table"])),
        "random_mean_accuracy": float(np.mean([r["accuracy"] for r in rows if r["policy"] == "random"])),
        "aim": (f"controller accuracy >= best static combination meeting the budget, "
                f"attainment >= {AIM_ATTAINMENT}"),
    }
    return {"budgets_ms": [float(b) for b in budgets],
            "policies": ["controller", "lookup_table", "best_static_meeting", "random"] + names,
            "static_profile": static_profile, "rows": rows, "per_budget": per_budget, "summary": summary,
            "num_test_samples": len(test), "num_profile_samples": len(prof), "failed_samples": failed}


# ----------------------------------------------------------------------------------------------
# Output: JSON, markdown, plots
# ----------------------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _short(name: Optional[str]) -> str:
    return "-" if not name else name.removeprefix("static:")


def markdown(report: dict) -> str:
    m = report["meta"]
    rows = report["rows"]
    by = {(r["budget_ms"], r["policy"]): r for r in rows}
    lines = [f"# Controller evaluation: {m['source']}", "",
             f"- backend `{m['backend']['backend']}`, model `{m['backend']['model_id']}`, engine "
             f"`{m['backend']['engine']}`, device `{m['backend']['device']}`",
             f"- held-out split `{m['split']}`: {report['num_test_samples']} samples; profiling split "
             f"`{m['profile_split']}`: {report['num_profile_samples']} samples (disjoint ids)",
             f"- {len(report['budgets_ms'])} budgets from {report['budgets_ms'][0]:.0f} to "
             f"{report['budgets_ms'][-1]:.0f} ms; static combinations at p = {m['static_p']} "
             f"({len(report['static_profile'])}); accuracy intervals: {m['bootstrap_resamples']}-resample "
             f"percentile bootstrap, 95%",
             f"- policy version {m['policy_version']}; {m['wall_s']:.1f}s on {m['workers']} worker(s)",
             f"- aim ({report['summary']['aim']}): met at {report['summary']['aim_met_budgets']}/"
             f"{report['summary']['budgets']} budgets", ""]
    if report["failed_samples"]:
        lines += [f"- {len(report['failed_samples'])} sample(s) dropped (bad input), e.g. "
                  f"{report['failed_samples'][0]['sample_id']}: {report['failed_samples'][0]['error']}", ""]
    lines += ["## Accuracy and attainment per budget", "",
              "| budget ms | controller acc [95% CI] | attain | lookup table | acc | attain "
              "| best static meeting | acc | attain | random acc | attain | aim |",
              "|---:|---|---:|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for e in report["per_budget"]:
        b = e["budget_ms"]
        c, lk = by[(b, "controller")], by[(b, "lookup_table")]
        bs, rd = by[(b, "best_static_meeting")], by[(b, "random")]
        look = _short(lk["combination"]) + ("" if lk["fits"] else " (none fits)")
        aim = e["aim"]
        why = []
        if not aim["accuracy_ok"]:
            why.append(f"acc -{aim['accuracy_shortfall']:.3f}")
        if not aim["attainment_ok"]:
            why.append(f"attain -{aim['attainment_shortfall']:.3f}")
        lines.append(f"| {b:.0f} | {_f(c['accuracy'])} "
                     f"[{_f(c['accuracy_ci'][0])}, {_f(c['accuracy_ci'][1])}] | "
                     f"{_f(c['attainment'])} | {look} | {_f(lk['accuracy'])} | {_f(lk['attainment'])} | "
                     f"{_short(bs.get('combination'))} | {_f(bs['accuracy'])} | {_f(bs['attainment'])} | "
                     f"{_f(rd['accuracy'])} | {_f(rd['attainment'])} | "
                     f"{'met' if aim['met'] else ', '.join(why)} |")
    lines += ["", "## Latency per budget (mean / p95 ms; mean overrun of the violations)", "",
              "| budget ms | controller | overrun ms | lookup table | overrun ms | random | overrun ms | "
              "controller - lookup acc [95% CI] |", "|---:|---|---:|---|---:|---|---:|---|"]
    for e in report["per_budget"]:
        b = e["budget_ms"]
        cells = []
        for pol in ("controller", "lookup_table", "random"):
            r = by[(b, pol)]
            cells += [f"{_f(r['mean_latency_ms'], '{:.1f}')} / {_f(r['p95_latency_ms'], '{:.1f}')}",
                      _f(r["mean_overrun_ms"], "{:.1f}")]
        d = e["controller_vs_lookup"]
        lines.append(f"| {b:.0f} | " + " | ".join(cells) +
                     f" | {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    lines += ["", "## Controller knob choices per budget (counts)", "",
              "| budget ms | tier | p | top_k | num_blocks | most frequent setting |",
              "|---:|---|---|---|---|---|"]
    for e in report["per_budget"]:
        k = e["controller_knobs"]
        cell = lambda d: ", ".join(f"{v}: {n}" for v, n in d.items())  # noqa: E731
        top = k["top_joint"][0] if k["top_joint"] else {"knobs": "-", "count": 0}
        lines.append(f"| {e['budget_ms']:.0f} | {cell(k['tier'])} | {cell(k['p'])} | {cell(k['top_k'])} | "
                     f"{cell(k['num_blocks'])} | {top['knobs']} ({top['count']}) |")
    types = sorted({qt for e in report["per_budget"] for qt in e.get("controller_by_type", {})})
    if len(types) > 1:
        lines += ["", "## Controller choices per question type (mean max_crops / blocks; accuracy)", "",
                  "| budget ms | " + " | ".join(t or "(none)" for t in types) + " |",
                  "|---:|" + "---|" * len(types)]
        for e in report["per_budget"]:
            bt = e["controller_by_type"]
            cells = [f"{bt[t]['max_crops']:.1f} / {bt[t]['num_blocks']:.1f}; {bt[t]['accuracy']:.2f}"
                     if t in bt else "-" for t in types]
            lines.append(f"| {e['budget_ms']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"## Static combinations (p = {m['static_p']})", "",
              "| combination | profiling p95 ms | profiling acc | test acc [95% CI] | test mean ms "
              "| meets budgets |",
              "|---|---:|---:|---|---:|---:|"]
    for s in sorted(report["static_profile"], key=lambda s: s["profile_p95_ms"]):
        meets = sum(1 for b in report["budgets_ms"] if s["profile_p95_ms"] <= b)
        lines.append(f"| {_short(s['name'])} | {s['profile_p95_ms']:.1f} | {s['profile_accuracy']:.3f} | "
                     f"{s['test_accuracy']:.3f} "
                     f"[{s['test_accuracy_ci'][0]:.3f}, {s['test_accuracy_ci'][1]:.3f}] | "
                     f"{s['test_mean_ms']:.1f} | {meets}/{len(report['budgets_ms'])} |")
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in PLOTS] + [""]
    return "\n".join(lines)


def plot(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = np.array(report["budgets_ms"])
    by = {(r["budget_ms"], r["policy"]): r for r in report["rows"]}

    def series(policy, key):
        return np.array([np.nan if by[(b, policy)][key] is None else by[(b, policy)][key] for b in budgets],
                        dtype=float)
    styles = {"controller": ("tab:blue", "o", "controller (greedy)"),
              "lookup_table": ("tab:orange", "s", "lookup table (profiling p95)"),
              "best_static_meeting": ("tab:green", "^", "best static meeting budget"),
              "random": ("tab:gray", "x", "random")}
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol, (col, mk, label) in styles.items():
        ax.plot(budgets, series(pol, "accuracy"), marker=mk, color=col, label=label)
    ci = np.array([by[(b, "controller")]["accuracy_ci"] for b in budgets], dtype=float)
    ax.fill_between(budgets, ci[:, 0], ci[:, 1], color="tab:blue", alpha=0.15, label="controller 95% CI")
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / PLOTS[0])
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol, (col, mk, label) in styles.items():
        ax.plot(budgets, series(pol, "attainment"), marker=mk, color=col, label=label)
    ax.axhline(AIM_ATTAINMENT, color="k", ls="--", lw=0.8, label=f"{AIM_ATTAINMENT:.0%} target")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel("attainment (share within budget)")
    ax.set_title("Budget attainment vs budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / PLOTS[1])
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sp = report["static_profile"]
    ax.scatter([s["test_mean_ms"] for s in sp], [s["test_accuracy"] for s in sp], s=14, color="tab:gray",
               alpha=0.6, label=f"static combinations (p = {report['meta']['static_p']})")
    c_lat, c_acc = series("controller", "mean_latency_ms"), series("controller", "accuracy")
    sc = ax.scatter(c_lat, c_acc, c=budgets, cmap="viridis", marker="o", s=50, edgecolor="k", zorder=3,
                    label="controller at each budget")
    for b, x, y in zip(budgets, c_lat, c_acc):
        ax.annotate(f"{b:.0f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    fig.colorbar(sc, ax=ax, label="budget (ms)")
    ax.set_xlabel("mean latency on the held-out split (ms)")
    ax.set_ylabel("accuracy")
    ax.set_title("Latency / accuracy: static combinations and the controller")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(out_dir / PLOTS[2])
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def write_outputs(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "markdown": out_dir / "eval.md"}
    paths["json"].write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False))
    paths["markdown"].write_text(markdown(report))
    for p in plot(report, out_dir):
        paths[p.stem] = p
    return paths


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def evaluate(target: Target, cfg, *, budgets: int = 8, split: str = "test", profile_split: str = "train",
             samples: int = 200, profile_samples: int = 0, workers: int = 1, address: Optional[str] = None,
             out_dir: Optional[Path] = None, bootstrap: int = 1000, progress: bool = True,
             print_fn: Callable[[str], None] = print) -> dict:
    """Run the whole evaluation and write its outputs; returns the report (with meta and output paths)."""
    from shared.budgets import BudgetSampler
    from shared.knobs import KnobSpace
    if split == profile_split:
        raise EvalError(f"the profiling split must differ from the evaluated one (both {split!r})")
    if budgets < 1:
        raise EvalError("--budgets must be >= 1")
    t0 = time.monotonic()
    grid = BudgetSampler(cfg.budget).grid(budgets)
    test = load_split(cfg, split, samples, seed=cfg.system.seed)
    prof = load_split(cfg, profile_split, profile_samples or samples, seed=cfg.system.seed + 1)
    test_ids = {s.sample_id for s in test}
    overlap = [s.sample_id for s in prof if s.sample_id in test_ids]
    if overlap:
        prof = [s for s in prof if s.sample_id not in test_ids]
        print_fn(f"[eval] dropped {len(overlap)} profiling sample(s) that are also in the held-out split")
    if not test or not prof:
        raise EvalError(f"empty split: {len(test)} held-out ({split}) and {len(prof)} profiling "
                        f"({profile_split}) samples")
    items = [x for pair in zip(test, prof) for x in ((pair[0], "test"), (pair[1], "profile"))]
    items += [(s, "test") for s in test[len(prof):]] + [(s, "profile") for s in prof[len(test):]]
    statics = KnobSpace.from_config(cfg.knobs, cfg.model).static_choices(cfg.knobs.static_p)

    def check(info: dict) -> None:
        check_bundle_meta(target.meta, expected_meta(cfg, info, target.meta.get("policy_version", 0)))

    print_fn(f"[eval] {target.source}: {len(test)} held-out ({split}) + {len(prof)} profiling "
             f"({profile_split}) samples, {len(grid)} budgets {grid[0]:.0f}..{grid[-1]:.0f} ms, "
             f"{len(statics)} static combinations, {workers} worker(s)")
    bar = Progress(len(items), enabled=progress)
    if workers > 1:
        results, info = run_ray(cfg, target, items, grid, bar, check, workers, address)
    else:
        results, info = run_in_process(cfg, target, items, grid, bar, check)
    report = build_report(results, statics, grid, num_resamples=bootstrap, seed=cfg.system.seed)
    wall = time.monotonic() - t0
    runs = len(test) * (len(statics) + 2 * len(grid)) + len(prof) * len(statics)
    report["meta"] = {"source": str(target.source),
                      "run_dir": str(target.run_dir) if target.run_dir else None,
                      "backend": info, "split": split, "profile_split": profile_split,
                      "static_p": cfg.knobs.static_p, "bootstrap_resamples": bootstrap,
                      "budget_range_ms": [cfg.budget.min_ms, cfg.budget.max_ms],
                      "policy_version": target.meta.get("policy_version"), "workers": workers, "wall_s": wall,
                      "requests": runs, "requests_per_s": runs / max(wall, 1e-9),
                      "bundle_meta": target.meta}
    out_dir = Path(out_dir) if out_dir else ((target.run_dir or Path(target.source)) / "eval")
    report["outputs"] = {k: str(v) for k, v in write_outputs(report, out_dir).items()}
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="CHECKPOINT_OR_RUN_DIR",
                   help="run folder, bundle folder or checkpoint folder")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--config", help="config YAML (default: the run's config.yaml)")
    p.add_argument("--budgets", type=int, default=8,
                   help="budgets on the grid over [budget.min_ms, max_ms] (8)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="held-out split (test)")
    p.add_argument("--profile-split", choices=["train", "val", "test", "calibration"], default="train",
                   help="split that profiles the static combinations for the lookup table (train)")
    p.add_argument("--samples", type=int, default=200, help="held-out samples (0 = all; default 200)")
    p.add_argument("--profile-samples", type=int, default=0, help="profiling samples (0 = as --samples)")
    p.add_argument("--weights", choices=["final", "best"], default="final",
                   help="a run's exported bundle (final) or its best-by-validation controller (best)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors to shard samples over (1 = in-process)")
    p.add_argument("--address", help="Ray address for --workers > 1 (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the accuracy intervals")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from shared.config import ConfigError, load_config
    args = parse_args(argv)
    try:
        target = resolve_target(args.target, args.weights)
        cfg_path = Path(args.config) if args.config else target.config_path
        if cfg_path is None:
            raise EvalError(f"{args.target} is not inside a run folder: pass --config")
        from shared.calibration import apply_calibration
        cfg = apply_calibration(load_config(cfg_path, args.overrides))   # the calibrated budget range
        from jobs.train import _set_env
        _set_env(cfg)
        report = evaluate(target, cfg, budgets=args.budgets, split=args.split,
                          profile_split=args.profile_split, samples=args.samples,
                          profile_samples=args.profile_samples, workers=max(1, args.workers),
                          address=args.address, out_dir=Path(args.out) if args.out else None,
                          bootstrap=args.bootstrap, progress=not args.no_progress)
    except (CheckpointError, ConfigError, EvalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = report["summary"]
    print(f"[eval] aim met at {s['aim_met_budgets']}/{s['budgets']} budgets; controller mean accuracy "
          f"{s['controller_mean_accuracy']:.3f} (lookup table {s['lookup_mean_accuracy']:.3f}, random "
          f"{s['random_mean_accuracy']:.3f}), min attainment {s['controller_min_attainment']:.3f}")
    print(f"[eval] {report['meta']['requests']} requests in {report['meta']['wall_s']:.1f}s; wrote "
          + ", ".join(report["outputs"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
