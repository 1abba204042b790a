"""The synthetic bandit acceptance (issue 2, point 9) outside pytest: trains the real controller with the
real GRPO update on the synthetic backend (no Ray, no model) for each seed, evaluates the greedy policy
against the exact optimum, prints a table and writes JSON.

    python bench/bandit.py [--out runs/bench/bandit.json] [--seeds 0 1 2] [--config jobs/configs/bandit.yaml]
                           [--threads 2] [--eval-budgets 29] [--act numpy|torch] [overrides ...]

`--act torch` runs the controller's torch act path instead of the numpy one (the default): the acceptance
must not hinge on the ~1e-7 differences between the two.

Targets (same as tests/test_synthetic_bandit.py): ratio >= 0.90 of the optimal expected reward, feasible
picks >= 0.95, best static configuration <= 0.70 of the optimum, training + evaluation < 60 s per seed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"ratio": 0.90, "feasible_pick_rate": 0.95, "best_static_share": 0.70, "total_s": 60.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "bandit.yaml"))
    ap.add_argument("--out", default="runs/bench/bandit.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the targets assume 2 CPU cores)")
    ap.add_argument("--eval-budgets", type=int, default=29, help="evenly spaced evaluation budgets")
    ap.add_argument("--act", choices=["numpy", "torch"], default="numpy", help="the controller's act path")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = ap.parse_args(argv)

    import torch

    from learner.local import run_bandit
    from shared.config import load_config, to_dict
    from shared.controller import TwoStageController

    torch.set_num_threads(args.threads)
    TwoStageController.act_impl = args.act
    results = []
    print(f"{'seed':>4} {'ratio':>6} {'feasible':>8} {'static':>6} {'train s':>7} {'eval s':>6} {'total s':>7}  ok")
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.overrides, f"system.seed={seed}"])
        r = run_bandit(cfg, eval_budgets=args.eval_budgets)
        row = r.to_dict()
        row["passed"] = (r.ratio >= TARGETS["ratio"] and r.feasible_pick_rate >= TARGETS["feasible_pick_rate"]
                         and r.best_static_share <= TARGETS["best_static_share"] and r.total_s < TARGETS["total_s"])
        results.append(row)
        print(f"{seed:>4} {r.ratio:6.3f} {r.feasible_pick_rate:8.3f} {r.best_static_share:6.3f} {r.train_s:7.1f} "
              f"{r.eval_s:6.1f} {r.total_s:7.1f}  {'yes' if row['passed'] else 'NO'}", flush=True)
    out = {"config": args.config, "overrides": args.overrides, "threads": args.threads, "act": args.act,
           "eval_budgets": args.eval_budgets, "targets": TARGETS, "results": results,
           "all_passed": all(r["passed"] for r in results),
           "resolved_config": to_dict(load_config(args.config, args.overrides)),
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpus": os.cpu_count(), "platform": platform.platform()}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0 if out["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
