"""Train the budget controller with GRPO on rollouts of the frozen model, distributed over Ray.

Usage:
    python jobs/train.py                                   # the embedded default config, local Ray
    python jobs/train.py --config jobs/configs/bandit.yaml grpo.lr=1e-3 system.num_workers=2
    python jobs/train.py --resume runs/default             # continue a stopped run
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/X.yaml

Connects to RAY_ADDRESS or --address when given, otherwise starts a local Ray bound to 127.0.0.1.
One rollout worker per GPU (or `system.num_workers`; 2 on a CPU-only machine). SIGTERM (`ray job stop`)
flushes the records and writes a final checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:          # `python jobs/train.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "default.yaml"
log = logging.getLogger("train")


def _set_env(cfg) -> dict:
    """Environment for this process and the actors: offline hub unless asked, no usage stats."""
    env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if not cfg.model.allow_hub:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    os.environ.update(env)
    return env


class JobError(RuntimeError):
    """The run cannot go on (every worker gone, no progress); the message says why."""


class TrainingJob:
    """Drives one run: builds actors, monitors workers and progress, finishes with a bundle."""

    def __init__(self, cfg, *, resume: bool = False, print_fn: Callable[[str], None] = print):
        import ray

        from jobs import actors
        self.ray, self.actors = ray, actors
        self.cfg = cfg
        self.resume = resume
        self.print = print_fn
        self.run_dir = Path(cfg.system.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.env = _set_env(cfg)
        self.stop_requested = False
        self.workers: list = []
        self.learner = None

    # ------------------------------------------------------------------------------------------
    def start(self) -> None:
        ray, cfg = self.ray, self.cfg
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 and cfg.model.backend != "synthetic"
        n = cfg.system.num_workers or (max(1, int(gpus / cfg.system.gpus_per_worker)) if use_gpu else 2)
        self.workers = self.actors.make_workers(cfg, n, use_gpu, self.env)
        t0 = time.monotonic()
        info = ray.get(self.workers[0].info.remote(), timeout=cfg.system.worker_timeout_s)
        train_ids, val_ids = ray.get(self.workers[0].sample_ids.remote(), timeout=cfg.system.worker_timeout_s)
        self.backend_info = info
        self.learner = self.actors.make_learner(cfg, str(self.run_dir), train_ids, val_ids, info, self.resume)
        ray.get(self.learner.status.remote(), timeout=60)
        self.print(f"[train] {n} rollout worker(s) on {'GPU' if use_gpu else 'CPU'}; backend {info['backend']} "
                   f"({info['model_id']}, engine {info['engine']}, {info['device']}); {len(train_ids)} train / "
                   f"{len(val_ids)} val samples; ready in {time.monotonic() - t0:.1f}s; run folder {self.run_dir}")
        self.loops = {i: w.run.remote(self.learner) for i, w in enumerate(self.workers)}

    def monitor(self, on_status: Optional[Callable[[dict, "TrainingJob"], None]] = None,
                poll_s: float = 0.5) -> dict:
        """Wait for the run to finish; restart loops of restarted workers; fail fast with a clear error.

        A worker's `run` call failing with ActorUnavailableError means its process died and Ray is
        restarting it (calls made while it restarts fail the same way; a slow backend load can take a
        while): the loop is resubmitted until the restarted actor takes it. ActorDiedError means Ray gave
        up on it (`system.max_worker_restarts` used up): that worker is gone for good.
        """
        ray, cfg = self.ray, self.cfg
        last_step = -1
        alive = dict(self.loops)
        deaths = {i: 0 for i in alive}
        restarting: dict[int, int] = {}          # worker -> learner restart count when it was seen dying
        status = self._learner_status()
        while True:
            if self.stop_requested:
                self.print("[train] stop requested: flushing records and checkpointing")
                break
            ready, _ = ray.wait(list(alive.values()), num_returns=len(alive), timeout=poll_s)
            for ref in ready:
                i = next(k for k, v in alive.items() if v == ref)
                try:
                    ray.get(ref, timeout=10)
                    del alive[i]                         # finished normally (learner said stop)
                except ray.exceptions.ActorUnavailableError as exc:
                    if i not in restarting:
                        deaths[i] += 1
                        restarting[i] = status["counters"]["worker_restarts"]
                        self.print(f"[train] rollout worker {i} died ({type(exc).__name__}); Ray restarts it "
                                   f"(restart {deaths[i]}/{cfg.system.max_worker_restarts})")
                    alive[i] = self.workers[i].run.remote(self.learner)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    self.print(f"[train] rollout worker {i} is gone for good ({type(exc).__name__}; "
                               f"system.max_worker_restarts = {cfg.system.max_worker_restarts})")
                    del alive[i]
                    restarting.pop(i, None)
            status = self._learner_status()
            for i, seen in list(restarting.items()):     # a restarted worker registered with the learner
                if status["counters"]["worker_restarts"] > seen:
                    del restarting[i]
            if status["step"] != last_step and status["last"]:
                last_step = status["step"]
                if last_step % cfg.system.log_every == 0 or status["done"]:
                    self.print(progress_line(status))
            if on_status is not None:
                on_status(status, self)
            if status["done"] and not alive:
                break
            if not alive:
                raise JobError("every rollout worker is gone (restarts exhausted) and training is not finished "
                               f"(step {status['step']}/{cfg.system.total_updates}); see the worker logs")
            if status["since_last_group_s"] > cfg.system.worker_timeout_s:
                raise JobError(f"no rollout group reached the learner for {status['since_last_group_s']:.0f}s "
                               f"(system.worker_timeout_s = {cfg.system.worker_timeout_s}); workers are stuck")
        return status

    def _learner_status(self) -> dict:
        """The learner's status; its death (max_restarts=0) ends the job with a JobError saying how to go on."""
        try:
            return self.ray.get(self.learner.status.remote(), timeout=60)
        except self.ray.exceptions.RayActorError as exc:
            raise JobError(f"the learner actor died ({type(exc).__name__}); the run folder keeps every update up "
                           f"to its last checkpoint: continue with `python jobs/train.py --resume {self.run_dir}`"
                           ) from exc

    def finish(self) -> dict:
        """Final checkpoint, bundle export and summary."""
        from learner.checkpoint import export_bundle
        from shared.records import read_record_dir
        ray = self.ray
        status = ray.get(self.learner.stop.remote(), timeout=120)
        weights = ray.get(self.learner.controller_state.remote(), timeout=60)
        import torch
        state = {k: torch.tensor(v) for k, v in weights.items()}
        export_bundle(self.run_dir / "bundle", state, bundle_metadata(self.cfg, self.backend_info,
                                                                        status["policy_version"]))
        summary = summarize(read_record_dir(self.run_dir / "records"), status)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.print(summary_text(summary))
        return summary

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                self.ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        if self.learner is not None:
            try:
                self.ray.kill(self.learner, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


def bundle_metadata(cfg, backend_info: dict, policy_version: int) -> dict:
    from shared.config import to_dict
    from shared.knobs import KnobSpace
    return {"model_id": backend_info["model_id"], "engine": backend_info["engine"], "device": backend_info["device"],
            "knob_space": KnobSpace.from_config(cfg.knobs, cfg.model).to_dict(),
            "importance_sha256": backend_info["importance_sha256"],
            "budget_norm": [cfg.budget.norm_min_ms, cfg.budget.norm_max_ms],
            "calibration": cfg.budget.calibration, "d_model": cfg.model.d_model,
            "controller": to_dict(cfg.controller), "policy_version": policy_version,
            "budget_range_ms": [cfg.budget.min_ms, cfg.budget.max_ms], "backend": backend_info["backend"]}


def progress_line(status: dict) -> str:
    s, c = status["last"], status["counters"]
    drops = c["dropped_lag"] + c["dropped_failed"] + c["dropped_worker_died"]
    val = status.get("validation")
    vtxt = f" | val reward {val['reward_mean']:.3f}" if val else ""
    return (f"[train] step {status['step']:5d} | {s['rollouts_per_s']:7.1f} rollouts/s | reward {s['reward_mean']:+.3f}"
            f" | acc {s['accuracy_mean']:.3f} | attain {s['attainment']:.3f} | lat {s['latency_ms_mean']:.1f} ms"
            f" | v{status['policy_version']} | drops {drops} | restarts {c['worker_restarts']}{vtxt}")


def summarize(table, status: dict) -> dict:
    """First-tenth vs last-tenth comparison of reward and attainment (per-rollout means, standard errors)."""
    import numpy as np
    out = {"steps": status["step"], "policy_version": status["policy_version"], "counters": status["counters"],
           "rollouts": table.num_rows}
    if table.num_rows == 0:
        return out
    step = np.asarray(table.column("step").to_pylist())
    n_steps = int(step.max()) + 1
    tenth = max(1, n_steps // 10)
    for name, col in (("reward", "reward"), ("attainment", "within_budget"), ("accuracy", "accuracy")):
        v = np.asarray(table.column(col).to_pylist(), dtype=float)
        first, last = v[step < tenth], v[step >= n_steps - tenth]
        se = math.sqrt(first.var(ddof=1) / max(len(first), 1) + last.var(ddof=1) / max(len(last), 1)) \
            if len(first) > 1 and len(last) > 1 else math.nan
        out[name] = {"first_tenth": float(first.mean()), "last_tenth": float(last.mean()),
                     "diff": float(last.mean() - first.mean()), "se": se,
                     "z": float((last.mean() - first.mean()) / se) if se and se > 0 else math.nan}
    return out


def summary_text(summary: dict) -> str:
    lines = [f"[train] done: {summary['steps']} updates, {summary['rollouts']} rollouts recorded, "
             f"policy v{summary['policy_version']}, counters {summary['counters']}"]
    for name in ("reward", "accuracy", "attainment"):
        if name in summary:
            s = summary[name]
            lines.append(f"[train] {name:10s} first tenth {s['first_tenth']:.3f} -> last tenth {s['last_tenth']:.3f} "
                         f"(diff {s['diff']:+.3f}, {s['z']:.1f} standard errors)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"run config YAML (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p.parse_args(argv)


def load_run_config(args):
    from shared.config import load_config
    if args.resume:
        path = Path(args.config) if args.config else Path(args.resume) / "config.yaml"
        cfg = load_config(path, list(args.overrides) + [f"system.run_dir={args.resume}"])
    else:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    from shared.calibration import apply_calibration
    return apply_calibration(cfg)


def init_ray(cfg, address: Optional[str]):
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": never attach to some other cluster found on this machine (ray.init() alone
        # would join the last `ray start` cluster); every address on loopback.
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=cfg.system.dashboard,
                 dashboard_host=cfg.system.dashboard_host, log_to_driver=True,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k in ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}})


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_run_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _set_env(cfg)
    init_ray(cfg, args.address)
    job = TrainingJob(cfg, resume=bool(args.resume))

    def on_sigterm(signum, frame):
        job.stop_requested = True
    signal.signal(signal.SIGTERM, on_sigterm)
    t0 = time.monotonic()
    try:
        job.start()
        job.monitor()
        job.finish()
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        try:
            job.ray.get(job.learner.stop.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - the error above is what the user needs
            pass
        return 1
    finally:
        job.shutdown()
    print(f"[train] wall time {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
