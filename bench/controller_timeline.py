"""Where the controlled path's extra time goes on the GPU (issue 4 point 5): requests profiled with
torch.profiler, the GPU's own timeline of each request read back, controlled against plain.

    python3 bench/controller_timeline.py --out controller_timeline.json [--requests 20] [--tiny]

The controller A/B of `bench/rollout_speed.py` gives the controlled path's extra end-to-end time (~0.2 ms
without preprocessing on an H100) but not whether it is device work (the decisions' kernels, the budget token's
position, the top_k copies) or the GPU waiting for the host (the Stage1 and Stage2 read-backs, the host work
queued after them). Here the GPU's own timeline is recorded (torch.profiler, CUDA activity only: tracing the
host's ops too slowed the host, and so the bubbles, far more). Each request starts after a short GPU wait the
host polls (the previous request's end); that wait's kernel marks where a request's kernels begin. For each
request: the GPU span (first kernel start to last kernel end), and the "model" part of it, after the last gap of
at least 1 ms (the GPU waiting for the host's preprocessing; the controlled path queues its Stage1 decision
before it): its busy time (the union of the kernels' intervals) and its idle gaps, each named by the kernels
before and after it. Pairs, two variants interleaved in a shuffled order per round: the controlled path (greedy),
then the plain path with the knobs it chose; the same with `early_rest_prefill`. CUPTI slows each graph launch
a little, so gaps are upper bounds of the unprofiled ones; the busy time is the device's own.
Full-size MolmoE (random weights, bf16) on CUDA; `--tiny` runs the tiny model (CPU: a smoke test, no kernels).
Prints a table and writes JSON (and the raw trace with `--trace`).
"""
from __future__ import annotations

import argparse
import collections
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
PREPROCESS_GAP_US = 1000.0


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
    """The GPU's view of one request: its kernels and copies are those that started within [start, end].
    The "model" figures start after the last gap of at least PREPROCESS_GAP_US (the GPU waiting for the host's
    preprocessing; the controlled path queues Stage1 before it): the vision encoder to the last token."""
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
    span = cur_e - first
    long_gaps = [g for g in gaps if g["gap_us"] >= PREPROCESS_GAP_US]
    model_start = long_gaps[-1]["at_us"] + long_gaps[-1]["gap_us"] if long_gaps else 0.0
    model_gaps = [g for g in gaps if g["at_us"] >= model_start]
    for g in model_gaps:
        g["model_at_us"] = g["at_us"] - model_start
    model_idle = sum(g["gap_us"] for g in model_gaps)       # gaps under GAP_MIN_US are counted as busy
    return {"kernels": len(ks), "span_us": span, "busy_us": busy, "idle_us": span - busy,
            "model_span_us": span - model_start, "model_idle_us": model_idle,
            "model_busy_us": span - model_start - model_idle, "gaps": model_gaps}


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
    cuda = device.type == "cuda"

    def controlled(variant: str):
        eng = base if variant == "controlled" else early
        return eng.serve(image, QUESTION, BUDGET_MS, ctl, greedy=True, max_new_tokens=args.tokens, stop_at_eos=False)

    def plain(knobs):
        return base.serve(image, QUESTION, BUDGET_MS, None, fixed=knobs, max_new_tokens=args.tokens,
                          stop_at_eos=False)

    def previous_request_end():
        """A GPU wait the host polls (the previous request's end); its kernel also marks where a request begins."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(int(2e6))
            torch.cuda.synchronize()

    variants = ("controlled", "controlled_early")
    for _ in range(5):                      # warm, unprofiled
        for v in variants:
            plain(controlled(v).knobs)
    order = np.random.default_rng(0)
    launched: list[tuple[str, int, str]] = []          # (variant, round, arm) in the order the requests ran
    latency: dict = {}
    # CUDA activity only: tracing every host op as well slowed the host (and so the bubbles) far more
    acts = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(args.requests):
            for v in order.permutation(variants):
                previous_request_end()
                a = controlled(str(v))
                previous_request_end()
                b = plain(a.knobs)
                launched += [(str(v), i, "controlled"), (str(v), i, "plain")]
                latency[(str(v), i)] = (a.latency_ms, b.latency_ms, str(a.knobs))
        previous_request_end()
    with tempfile.TemporaryDirectory() as d:
        path = args.trace or str(Path(d) / "trace.json")
        prof.export_chrome_trace(path)
        trace = json.loads(Path(path).read_text())
    evs = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e for e in evs if e.get("ph") == "X" and e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    marks = [e for e in gpu if any(w in str(e.get("name", "")).lower() for w in ("spin_kernel", "sleep"))]
    per: dict = {v: [] for v in variants}
    if cuda and len(marks) != len(launched) + 1:        # one before each request, one after the last
        names = collections.Counter(str(e.get("name", ""))[:50] for e in gpu).most_common(8)
        raise RuntimeError(f"{len(marks)} request marks (torch.cuda._sleep's kernel) in the trace for "
                           f"{len(launched)} requests; most frequent GPU events: {names}")
    for k, (v, i, arm) in enumerate(launched):
        if not cuda:
            continue
        m0, m1 = marks[k], marks[k + 1]
        tl = request_timeline([e for e in gpu if e is not m0 and e is not m1], m0["ts"] + m0["dur"], m1["ts"])
        tl.update(round=i, arm=arm, latency_ms=latency[(v, i)][0 if arm == "controlled" else 1])
        per[v].append(tl)
    summary, paired = {}, {}
    for v in variants:
        for arm in ("controlled", "plain"):
            rows = [t for t in per[v] if t["arm"] == arm and t.get("kernels")]
            s_ = {"requests": len(rows),
                  "latency_ms_median": statistics.median(latency[(v, i)][0 if arm == "controlled" else 1]
                                                         for i in range(args.requests))}
            for key in ("kernels", "span_us", "busy_us", "idle_us", "model_span_us", "model_busy_us",
                        "model_idle_us"):
                if rows:
                    s_[key + "_median"] = statistics.median(t[key] for t in rows)
            if rows:        # the gaps of the request with the median model idle time, largest first
                med = sorted(rows, key=lambda t: t["model_idle_us"])[len(rows) // 2]
                s_["median_request_gaps"] = sorted(med["gaps"], key=lambda g: -g["gap_us"])[:12]
            summary[f"{v} / {arm}"] = s_
        a_rows = {t["round"]: t for t in per[v] if t["arm"] == "controlled" and t.get("kernels")}
        b_rows = {t["round"]: t for t in per[v] if t["arm"] == "plain" and t.get("kernels")}
        common = sorted(set(a_rows) & set(b_rows))
        if common:
            paired[v] = {key: statistics.median(a_rows[r][key] - b_rows[r][key] for r in common)
                         for key in ("model_span_us", "model_busy_us", "model_idle_us", "kernels")}
            paired[v]["latency_ms"] = statistics.median(latency[(v, r)][0] - latency[(v, r)][1] for r in common)
    out = {"card": torch.cuda.get_device_name(0) if cuda else "cpu",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "requests_per_variant": args.requests, "answer_tokens": args.tokens, "warmup": warm,
           "gpu_events": len(gpu), "summary": summary, "paired_controlled_minus_plain_median": paired,
           "per_request": per, "knobs": sorted({k for _, _, k in latency.values()})}
    print(f"{out['card']}, {args.requests} profiled pairs per variant, {len(gpu)} GPU events; knobs {out['knobs']}")
    print("| variant / arm | latency ms | kernels | GPU span us | model span us | model busy us | model idle us |")
    print("|---|---|---|---|---|---|---|")
    for v, s_ in summary.items():
        print(f"| {v} | {s_['latency_ms_median']:.3f} | {s_.get('kernels_median', 0)} | {s_.get('span_us_median', 0):.1f} "
              f"| {s_.get('model_span_us_median', 0):.1f} | {s_.get('model_busy_us_median', 0):.1f} "
              f"| {s_.get('model_idle_us_median', 0):.1f} |")
    for v, d in paired.items():
        print(f"paired {v} - plain (median): latency {d['latency_ms']:+.3f} ms; model span {d['model_span_us']:+.1f} "
              f"us = busy {d['model_busy_us']:+.1f} + idle {d['model_idle_us']:+.1f} us; kernels {d['kernels']:+.0f}")
    for v, s_ in summary.items():
        print(f"largest gaps after preprocessing, median-idle {v} request:")
        for g in s_.get("median_request_gaps", []):
            print(f"  at {g['model_at_us']:8.1f} us: {g['gap_us']:6.1f} us  {g['before']} -> {g['after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
