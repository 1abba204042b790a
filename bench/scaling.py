"""Scaling of real training runs over GPUs (issue 8 point 4): runs bench/train_throughput.py (jobs/train.py's
TrainingJob: rollouts, GRPO updates, weight broadcasts, records, checkpoints) once per GPU count, one rollout
worker per GPU, each in its own process with CUDA_VISIBLE_DEVICES set to the first n GPUs, and reports
total rollouts/s against linear scaling of the 1-GPU run, the learner's idle fraction and the broadcast time
per update. Prints a table and writes JSON.

    python bench/scaling.py --gpus 1 2 4 --config jobs/configs/gpu_fast_random.yaml --out runs/bench/scaling.json

The number of updates grows with the GPU count (`--updates-per-gpu`), so every run trains for about the
same wall time. Rates are taken over the window in which every worker was producing (start-up and
warm-up excluded; they are reported separately).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--config", default="jobs/configs/gpu_fast_random.yaml")
    ap.add_argument("--updates-per-gpu", type=int, default=16)
    ap.add_argument("--out", default="runs/bench/scaling.json")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.gpus:
        run_json = out_dir / f"scaling_{n}gpu.json"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(n)),
                   RAY_USAGE_STATS_ENABLED="0")
        cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--config", args.config,
               "--out", str(run_json), f"system.total_updates={args.updates_per_gpu * n}",
               f"system.num_workers={n}", f"system.run_dir=runs/scaling_{n}gpu", *args.overrides]
        print(f"[scaling] {n} GPU(s): {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=args.timeout_s)
        if proc.returncode != 0:
            runs.append({"gpus": n, "error": f"exit status {proc.returncode}", "wall_s": time.monotonic() - t0})
            continue
        r = json.loads(run_json.read_text())
        r["gpus"] = n
        runs.append(r)
    base = next((r for r in runs if r.get("gpus") == 1 and "error" not in r), None)
    print()
    print(f"{'GPUs':>4} {'rollouts/s':>10} {'per worker':>22} {'x linear':>8} {'learner idle':>12} "
          f"{'broadcast ms':>12} {'update ms':>9} {'warm-up s':>16} {'start-up s':>10}")
    for r in runs:
        if "error" in r:
            print(f"{r['gpus']:>4} FAILED: {r['error']}")
            continue
        rate = r["rollouts_per_s_all_workers_active"]
        r["fraction_of_linear"] = (rate / (r["gpus"] * base["rollouts_per_s_all_workers_active"])
                                   if base else None)
        per = " / ".join(f"{w['rollouts_per_s']:.1f}" for w in r["per_worker"].values())
        warm = [w.get("warmup_s") for w in r.get("warmup", []) if w.get("warmup_s") is not None]
        warm_txt = f"{min(warm):.0f}-{max(warm):.0f}" if warm else "-"
        lin = f"{r['fraction_of_linear']:.2f}" if r["fraction_of_linear"] is not None else "-"
        print(f"{r['gpus']:>4} {rate:>10.2f} {per:>22} {lin:>8} {r['learner_idle_fraction']:>12.3f} "
              f"{r['broadcast_ms_median']:>12.2f} {r['update_ms_median']:>9.1f} {warm_txt:>16} {r['startup_s']:>10.1f}")
    Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides, "runs": runs,
                                          "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
