"""Where the controlled path's extra time goes on the GPU (issue 4 point 5): requests profiled with
torch.profiler, the GPU's own timeline of each request read back, controlled against plain.

    python3 bench/controller_timeline.py --out controller_timeline.json [--requests 20] [--tiny]

The controller A/B of `bench/rollout_speed.py` gives the controlled path's extra end-to-end time (~0.2 ms
without preprocessing on an H100) but not whether it is device work (the decisions' kernels, the budget token's
position, the top_k copies) or the GPU waiting for the host (the Stage1 and Stage2 read-backs, the host work
queued after them). Here each request runs inside a `record_function` range; its kernels and copies are those
that ran within the range (a request ends with a host sync). For each request: the GPU span (first kernel start
to last kernel end), the busy time (the union of the kernels' intervals) and the idle gaps inside the span, each
gap named by the kernels before and after it. Variants, interleaved in a shuffled order per round: the plain
path with fixed knobs (the controlled arm's greedy choice), the controlled path (greedy), the controlled path with
`early_rest_prefill`. The profiler slows the host a little, so gaps are upper bounds of the unprofiled ones.
Full-size MolmoE (random weights, bf16) on CUDA; `--tiny` runs the tiny model (CPU: a smoke test, no kernels).
Prints a table and writes JSON (and the raw trace with `--trace`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rollout_speed import QUESTION, png  # noqa: E402
from rollout_workers.fast_engine import FastEngine  # noqa: E402
from rollout_workers.molmoe_backend import word_level_tokenizer  # noqa: E402
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor  # noqa: E402
from rollout_workers.request_path import RequestEngine  # noqa: E402
from shared.controller import TwoStageController  # noqa: E402
from shared.knobs import ImportanceScores, KnobSpace  # noqa: E402

BUDGET_MS = 250.0
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
GAP_MIN_US = 3.0


def build(tiny: bool, device: torch.device):
    if tiny:
        from rollout_workers.molmoe.loader import load_molmoe
        from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
        bundle = load_molmoe(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=3), device)
        model, pre = bundle.model, bundle.preprocessor
        cfg = model.config
        L = cfg.n_layers
        space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                          tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    else:
        from rollout_workers.molmoe.config import MolmoeConfig
        from rollout_workers.molmoe.loader import random_full_size
        cfg = MolmoeConfig.full()
        model = random_full_size(device, torch.bfloat16, seed=0).eval()
        pre = MolmoPreprocessor(cfg, word_level_tokenizer(cfg, QUESTION.split()))
        L = cfg.n_layers
        space = KnobSpace(("low", "medium", "high"), (3, 6, 12), (1, 2, 3, 4, 5), (4, 5, 6, 7, 8),
                          (12, 13, 14, 15, 16), L, cfg.num_experts, cfg.top_k)
    importance = ImportanceScores.by_index(L)
    fast = FastEngine(model, max_len=2048 if not tiny else 512, top_k_max=max(space.top_ks))
    warm = fast.warmup(space, importance=importance) if fast.use_graphs else {}
    base = RequestEngine(model, pre, space, importance, executor=fast)
    early = RequestEngine(model, pre, space, importance, executor=fast, early_rest_prefill=True)
    ctl = TwoStageController(space, cfg.d_model, token_rms=base.token_rms())
    return base, early, ctl, warm


def request_timeline(events: list[dict], start_us: float, end_us: float) -> dict:
    """The GPU's view of one request: its kernels and copies are those that started within [start, end]."""
    ks = sorted((e for e in events if start_us <= e["ts"] <= end_us), key=lambda e: e["ts"])
    if not ks:
        return {"kernels": 0}
    busy, gaps = 0.0, []
    cur_s, cur_e, prev = ks[0]["ts"], ks[0]["ts"] + ks[0].get("dur", 0.0), ks[0]
    first = cur_s
    for e in ks[1:]:
        s, t = e["ts"], e["ts"] + e.get("dur", 0.0)
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= GAP_MIN_US:
                gaps.append({"at_us": cur_e - first, "gap_us": s - cur_e, "before": prev["name"][:60],
                             "after": e["name"][:60]})
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
        prev = e if t >= cur_e else prev
    busy += cur_e - cur_s
    return {"kernels": len(ks), "span_us": cur_e - first, "busy_us": busy, "idle_us": (cur_e - first) - busy,
            "first_kernel_after_start_us": first - start_us, "gaps": gaps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/controller_timeline.json")
    ap.add_argument("--requests", type=int, default=20, help="profiled requests per variant")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--trace", default="", help="also write the raw chrome trace here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    base, early, ctl, warm = build(args.tiny, device)
    image = png()
    probe = base.serve(image, QUESTION, BUDGET_MS, ctl, greedy=True, max_new_tokens=args.tokens, stop_at_eos=False)
    knobs = probe.knobs

    def run(variant: str):
        if variant == "plain":
            return base.serve(image, QUESTION, BUDGET_MS, None, fixed=knobs, max_new_tokens=args.tokens,
                              stop_at_eos=False)
        eng = base if variant == "controlled" else early
        return eng.serve(image, QUESTION, BUDGET_MS, ctl, greedy=True, max_new_tokens=args.tokens, stop_at_eos=False)

    variants = ("plain", "controlled", "controlled_early")
    for _ in range(5):                      # warm, unprofiled
        for v in variants:
            run(v)
    order = np.random.default_rng(0)
    latency: dict = {v: [] for v in variants}
    other_knobs: set = set()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                      if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(args.requests):
            for v in order.permutation(variants):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda._sleep(int(2e6))     # the previous request's end: the GPU busy, the host waiting
                    torch.cuda.synchronize()
                with torch.profiler.record_function(f"req|{v}|{i}"):
                    r = run(str(v))
                if r.knobs != knobs:        # greedy Stage2 reads the spent fraction: rarely, other knobs
                    other_knobs.add((str(v), i))
                latency[str(v)].append(r.latency_ms)
    with tempfile.TemporaryDirectory() as d:
        path = args.trace or str(Path(d) / "trace.json")
        prof.export_chrome_trace(path)
        trace = json.loads(Path(path).read_text())
    evs = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = [e for e in evs if e.get("ph") == "X" and e.get("cat") in GPU_CATS]
    ranges = [e for e in evs if e.get("ph") == "X" and str(e.get("name", "")).startswith("req|")
              and e.get("cat") in ("user_annotation", "cpu_op")]
    per: dict = {v: [] for v in variants}
    for e in ranges:
        _, v, i = e["name"].split("|")
        tl = request_timeline(gpu, e["ts"], e["ts"] + e["dur"])
        tl.update(round=int(i), host_us=e["dur"])
        if (v, int(i)) not in other_knobs:
            per[v].append(tl)
    summary = {}
    for v in variants:
        rows = [t for t in per[v] if t.get("kernels")]
        summary[v] = {"requests": len(per[v]), "latency_ms_median": statistics.median(latency[v]),
                      "with_kernels": len(rows)}
        if rows:
            for key in ("kernels", "span_us", "busy_us", "idle_us", "first_kernel_after_start_us"):
                summary[v][key + "_median"] = statistics.median(t[key] for t in rows)
            # the gaps of the request with the median idle time, largest first
            med = sorted(rows, key=lambda t: t["idle_us"])[len(rows) // 2]
            summary[v]["median_request_gaps"] = sorted(med["gaps"], key=lambda g: -g["gap_us"])[:10]
    # paired differences per round: controlled minus plain
    paired = {}
    for v in variants[1:]:
        by_round = {t["round"]: t for t in per[v] if t.get("kernels")}
        plain = {t["round"]: t for t in per["plain"] if t.get("kernels")}
        common = sorted(set(by_round) & set(plain))
        if common:
            paired[v] = {key: statistics.median(by_round[r][key] - plain[r][key] for r in common)
                         for key in ("span_us", "busy_us", "idle_us", "kernels")}
    out = {"card": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "knobs": str(knobs),
           "requests_per_variant": args.requests, "answer_tokens": args.tokens, "warmup": warm,
           "gpu_events": len(gpu), "requests_with_other_knobs": len(other_knobs), "summary": summary, "paired_minus_plain_median": paired,
           "per_request": per}
    print(f"{out['card']}, knobs {knobs}, {args.requests} profiled requests per variant, {len(gpu)} GPU events")
    print("| variant | latency ms | kernels | GPU span us | busy us | idle us | first kernel after start us |")
    print("|---|---|---|---|---|---|---|")
    for v, s in summary.items():
        print(f"| {v} | {s['latency_ms_median']:.3f} | {s.get('kernels_median', 0)} | {s.get('span_us_median', 0):.1f} "
              f"| {s.get('busy_us_median', 0):.1f} | {s.get('idle_us_median', 0):.1f} "
              f"| {s.get('first_kernel_after_start_us_median', 0):.1f} |")
    for v, d in paired.items():
        print(f"paired {v} - plain (median): span {d['span_us']:+.1f} us, busy {d['busy_us']:+.1f} us, "
              f"idle {d['idle_us']:+.1f} us, kernels {d['kernels']:+.0f}")
    for v, s in summary.items():
        print(f"largest gaps, median-idle {v} request:")
        for g in s.get("median_request_gaps", []):
            print(f"  at {g['at_us']:8.1f} us: {g['gap_us']:6.1f} us  {g['before']} -> {g['after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
