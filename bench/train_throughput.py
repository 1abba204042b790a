"""Throughput of a real training run (issue 5 point 12, issue 8 point 4): runs jobs/train.py's
TrainingJob with the given config and reports rollouts/s in total and per worker, the weight broadcast
time per update (ray.put of the numpy weights plus the workers' pulls are counted in the learner's
publish time) and the learner's idle fraction. Prints a table and writes JSON.

    python bench/train_throughput.py --config jobs/configs/gpu_full_random.yaml --out runs/bench/train.json [overrides]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="runs/bench/train_throughput.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy as np
    import ray

    from jobs.train import TrainingJob, init_ray, _set_env
    from shared.config import load_config
    from shared.records import read_record_dir
    cfg = load_config(args.config, args.overrides)
    _set_env(cfg)
    init_ray(cfg, None)
    job = TrainingJob(cfg)
    t0 = time.monotonic()
    try:
        job.start()
        t_ready = time.monotonic()
        job.monitor()
        job.finish()
        warmups = []
        for w in job.workers:
            try:
                warmups.append(ray.get(w.warmup_info.remote(), timeout=60))
            except Exception as exc:  # noqa: BLE001 - a report, not a reason to lose the run's figures
                warmups.append({"error": f"{type(exc).__name__}: {exc}"[:300]})
    finally:
        job.shutdown()
    wall = time.monotonic() - t0
    metrics = [json.loads(ln) for ln in (Path(cfg.system.run_dir) / "metrics.jsonl").read_text().splitlines() if ln]
    table = read_record_dir(Path(cfg.system.run_dir) / "records")
    wid = np.asarray(table.column("worker_id").to_pylist())
    t_start = np.asarray(table.column("t_start").to_pylist())
    t_end = np.asarray(table.column("t_end").to_pylist())
    per_worker = {}
    for w in sorted(set(wid.tolist())):
        sel = wid == w
        span = t_end[sel].max() - t_start[sel].min()
        per_worker[int(w)] = {"rollouts": int(sel.sum()), "rollouts_per_s": float(sel.sum() / max(span, 1e-9)),
                              "busy_fraction": float((t_end[sel] - t_start[sel]).sum() / max(span, 1e-9))}
    span_all = t_end.max() - t_start.min()
    # Workers finish warm-up at different times and stop at different times: the fair total rate for
    # scaling is the one over the window in which every worker was producing.
    w_lo = max(t_start[wid == w].min() for w in per_worker)
    w_hi = min(t_end[wid == w].max() for w in per_worker)
    in_window = (t_end > w_lo) & (t_end <= w_hi)
    overlap_rate = float(in_window.sum() / (w_hi - w_lo)) if w_hi > w_lo else float("nan")
    steady = metrics[len(metrics) // 4:] or metrics
    out = {"config": args.config, "overrides": args.overrides, "workers": len(per_worker), "updates": len(metrics),
           "rollouts": int(table.num_rows), "wall_s": wall, "startup_s": t_ready - t0,
           "rollouts_per_s_total": float(table.num_rows / max(span_all, 1e-9)), "per_worker": per_worker,
           "rollouts_per_s_all_workers_active": overlap_rate, "all_workers_active_s": float(max(0.0, w_hi - w_lo)),
           "warmup": warmups,
           "broadcast_ms_median": float(np.median([m["broadcast_ms"] for m in metrics])),
           "update_ms_median": float(np.median([m["update_ms"] for m in metrics])),
           "learner_idle_fraction": float(metrics[-1]["learner_idle_fraction"]),
           "rollouts_per_s_steady": float(np.median([m["rollouts_per_s"] for m in steady])),
           "date": time.strftime("%Y-%m-%d")}
    try:
        import torch
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        out["device"] = "unknown"
    print(f"{'worker':>6} {'rollouts':>8} {'rollouts/s':>10} {'busy':>6}")
    for w, r in per_worker.items():
        print(f"{w:>6} {r['rollouts']:>8} {r['rollouts_per_s']:>10.2f} {r['busy_fraction']:>6.2f}")
    print(f"all workers active: {overlap_rate:.2f} rollouts/s over {out['all_workers_active_s']:.1f} s")
    print(f"total {out['rollouts_per_s_total']:.2f} rollouts/s over {out['updates']} updates; broadcast "
          f"{out['broadcast_ms_median']:.2f} ms/update; update {out['update_ms_median']:.1f} ms; learner idle "
          f"{out['learner_idle_fraction']:.3f}; startup {out['startup_s']:.1f}s; wall {wall:.1f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
