"""Host cost of the controller's act path per request (issue 4, point 5: controller overhead < 0.2 ms):
Stage1 act, the budget token and Stage2 act, numpy path (the default, `TwoStageController.act_impl =
"numpy"`) against the torch path (the torch forward, `act_impl = "torch"`), at d_model 2048 (the real
MolmoE-1B config) and at the embedded tiny model's d_model (jobs/configs/default.yaml).

    python bench/controller_act.py [--out runs/bench/controller_act.json] [--calls 3000] [--rounds 10]
                                   [--threads 0] [--flush-mb 0] [--group-size 8] [--impls numpy torch]

Cases (each call times one act with sampling, `greedy=False`, and a seeded generator):

* ``stage1_group_hit``: the same request features as the previous call (the G-1 later rollouts of a
  group, which share sample and budget: the log-probs are reused, only the draws differ);
* ``stage1_new_features``: a new language feature each call, budget already seen (its embedding kept);
* ``stage1_new_budget``: a new budget each call (the budget encoder runs: once per group);
* ``token_hit`` / ``token_new_budget``: `budget_token_embedding` for a kept / a new budget;
* ``stage2``: a new latency state, p and spent fraction each call, budget already seen (every request).

``per_request_group`` is what one request of a group of ``--group-size`` costs on average: one rollout
pays stage1_new_budget + token_new_budget + stage2, the others stage1_group_hit + token_hit + stage2.
``per_request_new_features`` is stage1_new_features + token_hit + stage2 (a budget seen before, new
features). Times are medians and 90th percentiles in microseconds of single calls (perf_counter_ns),
the act paths and cases interleaved in ``--rounds`` rounds (a busy host's slow spells hit all alike);
sums of medians for the per-request rows. ``--flush-mb N`` walks an N MB buffer before every call to
evict the caches, as the model's forward between two controller calls does on a worker (colder, slower
numbers). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from shared.config import load_config
from shared.controller import Stage1Features, Stage2Features, TwoStageController
from shared.knobs import KnobSpace

CASES = ("stage1_group_hit", "stage1_new_features", "stage1_new_budget", "token_hit", "token_new_budget",
         "stage2")


def build(config: str | None) -> tuple[TwoStageController, dict]:
    cfg = load_config(config)
    space = KnobSpace.from_config(cfg.knobs, cfg.model)
    torch.manual_seed(0)
    ctl = TwoStageController.from_config(cfg, space, token_rms=0.02).eval()
    return ctl, {"config": config or "<defaults: MolmoE-1B>", "d_model": cfg.model.d_model,
                 "budget_dim": ctl.budget_encoder.net[0].out_features, "stage1_hidden": cfg.controller.stage1_hidden,
                 "stage2_hidden": cfg.controller.stage2_hidden, "policy_params": ctl.num_policy_params(),
                 "budget_encoder_params": ctl.num_budget_encoder_params()}


def make_inputs(ctl: TwoStageController, n: int, seed: int = 0):
    """n distinct requests (Stage1Features, Stage2Features) at one budget (a group's rollouts share it;
    the torch path keeps the last budget's embedding), and n fresh budgets for the new-budget cases."""
    rng = np.random.default_rng(seed)
    s = ctl.space
    budget = 263.7
    reqs = []
    for i in range(n):
        d = ctl.d_model
        p_idx = int(rng.integers(len(s.positions)))
        f1 = Stage1Features(lang_feat=rng.standard_normal(d).astype(np.float32) * 0.02, budget_ms=budget,
                            tier_tokens=[412, 740, 1196], tier_mask=[True, True, True], p_mask=[True] * len(s.positions))
        f2 = Stage2Features(latency_state=rng.standard_normal(d).astype(np.float32), p_idx=p_idx,
                            vision_tokens=740, spent_frac=float(rng.uniform(0.1, 0.9)),
                            nb_mask=ctl.nb_mask_for(p_idx))
        reqs.append((f1, f2))
    fresh = [float(b) for b in 100.0 + 400.0 * (np.arange(n) + 0.5) / n + rng.uniform(0, 1e-3, n)]
    return budget, reqs, fresh


def time_calls(fn, indices: range, flush: np.ndarray | None) -> np.ndarray:
    """Microseconds of each call fn(i), i in indices."""
    out = np.empty(len(indices))
    for j, i in enumerate(indices):
        if flush is not None:
            flush += 1.0
        t0 = time.perf_counter_ns()
        fn(i)
        out[j] = time.perf_counter_ns() - t0
    return out / 1e3


def case_functions(ctl: TwoStageController, n: int) -> dict:
    """The timed call of each case, by call index (0..n-1)."""
    budget, reqs, fresh = make_inputs(ctl, n)
    gen = torch.Generator().manual_seed(0)
    same = reqs[0][0]
    fresh_f1 = [Stage1Features(f1.lang_feat, fresh[i], f1.tier_tokens, f1.tier_mask, f1.p_mask)
                for i, (f1, _) in enumerate(reqs)]
    return {
        "stage1_group_hit": lambda i: ctl.act_stage1(same, generator=gen),
        "stage1_new_features": lambda i: ctl.act_stage1(reqs[i][0], generator=gen),
        "stage1_new_budget": lambda i: ctl.act_stage1(fresh_f1[i], generator=gen),
        "token_hit": lambda i: ctl.budget_token_embedding(budget),
        "token_new_budget": lambda i: ctl.budget_token_embedding(fresh[i] + 1e-4),
        "stage2": lambda i: ctl.act_stage2(budget, reqs[i][1], generator=gen),
    }


def bench(ctl: TwoStageController, impls: list[str], n: int, rounds: int, flush: np.ndarray | None) -> dict:
    """Times every case of every act path, interleaved in `rounds` rounds of n / rounds calls (a busy
    host's slow spells then hit all cases alike). A new-budget case uses each budget once."""
    fns = {impl: case_functions(ctl, n) for impl in impls}
    warm = {impl: case_functions(ctl, 200) for impl in impls}
    times = {impl: {c: [] for c in CASES} for impl in impls}
    with torch.no_grad():
        for impl in impls:                                   # warm-up (budgets of its own)
            ctl.act_impl = impl
            for case in CASES:
                for i in range(200):
                    warm[impl][case](i)
        per = max(1, n // rounds)
        for r in range(rounds):
            for impl in impls:
                ctl.act_impl = impl
                for case in CASES:
                    times[impl][case].append(time_calls(fns[impl][case], range(r * per, min(n, (r + 1) * per)), flush))
    ctl.act_impl = "numpy"
    out = {}
    for impl in impls:
        out[impl] = {}
        for case in CASES:
            t = np.concatenate(times[impl][case])
            out[impl][case] = {"median_us": float(np.median(t)), "p90_us": float(np.percentile(t, 90)),
                               "mean_us": float(t.mean()), "calls": int(t.size)}
    return out


def per_request(r: dict, g: int) -> dict:
    med = {k: v["median_us"] for k, v in r.items()}
    group = (med["stage1_new_budget"] + med["token_new_budget"]
             + (g - 1) * (med["stage1_group_hit"] + med["token_hit"])) / g + med["stage2"]
    return {"per_request_group": group,
            "per_request_new_features": med["stage1_new_features"] + med["token_hit"] + med["stage2"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/controller_act.json")
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per case")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds over act paths and cases")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--flush-mb", type=float, default=0.0, help="walk a buffer this large before each call")
    ap.add_argument("--group-size", type=int, default=8, help="rollouts per group (per-request averages)")
    ap.add_argument("--impls", nargs="+", default=["numpy", "torch"], choices=["numpy", "torch"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flush = np.zeros(int(args.flush_mb * 2**20 / 8)) if args.flush_mb > 0 else None

    results = []
    for config in (None, str(ROOT / "jobs" / "configs" / "default.yaml")):
        ctl, info = build(config)
        res = bench(ctl, args.impls, args.calls, args.rounds, flush)
        row = {**info, "impls": {impl: {"cases": r, **per_request(r, args.group_size)} for impl, r in res.items()}}
        results.append(row)

    print(f"controller act path, microseconds per call: median / p90 over {args.calls} calls"
          f"{f', {args.flush_mb:g} MB flushed before each call' if flush is not None else ''}")
    head = f"{'d_model':>7} {'case':<26}" + "".join(f" {impl:>17}" for impl in args.impls)
    print(head)
    for row in results:
        for case in CASES:
            cells = "".join(f" {row['impls'][i]['cases'][case]['median_us']:8.1f} /{row['impls'][i]['cases'][case]['p90_us']:7.1f}"
                            for i in args.impls)
            print(f"{row['d_model']:>7} {case:<26}{cells}")
        for key in ("per_request_group", "per_request_new_features"):
            cells = "".join(f" {row['impls'][i][key]:8.1f} {'':7}" for i in args.impls)
            print(f"{row['d_model']:>7} {key + ' (sum)':<26}{cells}")
    out = {"calls": args.calls, "rounds": args.rounds, "threads": torch.get_num_threads(), "flush_mb": args.flush_mb,
           "group_size": args.group_size, "results": results,
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                       "cpus": os.cpu_count(), "platform": platform.platform(),
                       "cpu": _cpu_name()}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
