"""Eager-engine request latency (issue 4): end-to-end and segment latency per knob setting, and the
controller-overhead A/B, on the full-size MolmoE architecture with RANDOM weights (timing only).

    python bench/request_latency.py --out runs/bench/request_latency.json [--tiny] [--repeats 10]

For each tier, top_k in {4, 8} and num_blocks in {12, 16} at p = 1: a fixed 1024x768 image (a 640x480
image collapses the medium and high tiers onto the same 2x3 tiling), a 16-token
answer (EOS ignored), median and coefficient of variation over the repeats after warm-up, and the host's own
steadiness before and after (a fixed pure-Python loop's CV over 10 repeats). The A/B
runs the controlled path (budget token, split prefill, both decisions, synchronisations) and then the
plain path with the same knobs the controller chose, alternating, and reports the median difference.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rollout_workers.molmoe.config import MolmoeConfig  # noqa: E402
from rollout_workers.molmoe_backend import word_level_tokenizer  # noqa: E402
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor  # noqa: E402
from rollout_workers.molmoe.tokenizer import MolmoTokenizer  # noqa: E402
from rollout_workers.request_path import SEGMENT_ORDER, RequestEngine  # noqa: E402
from rollout_workers.timers import timer_overhead_us  # noqa: E402
from shared.controller import TwoStageController  # noqa: E402
from shared.knobs import ImportanceScores, KnobChoice, KnobSpace  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_speed_probe import python_loop, window_cvs  # noqa: E402

QUESTION = "what colour is the small circle in the top left corner of the picture"


def bench_tokenizer(cfg: MolmoeConfig) -> MolmoTokenizer:
    """A word-level tokenizer whose special ids match the full config (the real one ships with the checkpoint)."""
    return word_level_tokenizer(cfg, QUESTION.split())


def png(w=1024, h=768) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/request_latency.json")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test of the script)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads (fixed, as the workers do)")
    ap.add_argument("--affinity", type=int, default=0,
                    help="pin this process to this many CPU cores (0 = leave the scheduler free)")
    ap.add_argument("--experts", default="eager", choices=["eager", "grouped_mm", "batched_mm"],
                    help="transformers' experts implementation for the OLMoE blocks (eager = per-expert loop)")
    ap.add_argument("--no-ab", action="store_true", help="skip the controller-overhead A/B")
    args = ap.parse_args()
    if args.affinity:
        import os
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.affinity])
    torch.set_num_threads(args.threads)
    gc.disable()   # no collector pauses inside measured requests; collected between settings
    torch.manual_seed(0)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        from rollout_workers.molmoe.loader import build_empty
        cfg = MolmoeConfig.tiny()
        model = build_empty(cfg, device, torch.float32, torch.float32)
        with torch.no_grad():
            for prm in model.parameters():
                prm.normal_(0.0, 0.02)
        tokenizer = MolmoTokenizer.tiny()
        card = "cpu (tiny config)"
        tiers, topks, nbs = (1, 2, 4), (1, 2), (cfg.n_layers - 1, cfg.n_layers)
    else:
        from rollout_workers.molmoe.loader import random_full_size
        cfg = MolmoeConfig.full()
        model = random_full_size(device, torch.bfloat16)
        tokenizer = bench_tokenizer(cfg)
        card = torch.cuda.get_device_name(0) if cuda else "cpu"
        tiers, topks, nbs = (3, 6, 12), (4, 8), (12, 16)
    model.eval()
    if args.experts != "eager":
        model.llm.set_experts_implementation(args.experts)
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), tiers, (1, 2, 3, 4, 5) if L > 5 else (1,),
                      tuple(sorted(set(topks) | {cfg.top_k})), tuple(nbs), L, cfg.num_experts, cfg.top_k)
    engine = RequestEngine(model, MolmoPreprocessor(cfg, tokenizer), space, ImportanceScores.by_index(L))
    ctl = TwoStageController(space, cfg.d_model, token_rms=engine.token_rms())
    image = png()

    def run(fixed=None, controller=None):
        return engine.serve(image, QUESTION, 1000.0, controller, fixed=fixed, max_new_tokens=args.tokens,
                            stop_at_eos=False, greedy=True)

    def device_allocs() -> int:
        return int(torch.cuda.memory_stats().get("num_device_alloc", 0)) if cuda else 0

    def diagnosed(fixed, controller):
        """One request with what explains its spread: the request thread's CPU time (a slower host shows here),
        its involuntary context switches (preemption), and the caching allocator's device allocations."""
        ru0, cpu0, al0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time(), device_allocs()
        r = run(fixed, controller)
        ru1 = resource.getrusage(resource.RUSAGE_THREAD)
        return r, {"t_start": r.t_start, "latency_ms": r.latency_ms, "host_latency_ms": r.host_latency_ms,
                   "thread_cpu_ms": (time.thread_time() - cpu0) * 1e3,
                   "involuntary_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
                   "voluntary_switches": ru1.ru_nvcsw - ru0.ru_nvcsw, "minor_faults": ru1.ru_minflt - ru0.ru_minflt,
                   "device_allocs": device_allocs() - al0,
                   **{s: r.segments_ms[s] for s in SEGMENT_ORDER}}

    def syncs_per_request(fixed, controller) -> int:
        """Host synchronisations in one request (torch's sync debug mode warns once per synchronising call)."""
        if not cuda:
            return 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(fixed, controller)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    def host_steadiness() -> dict:
        """The host's own steadiness beside the table: a fixed pure-Python loop timed 30 times, and its CV over
        windows of 10 (bench/host_speed_probe.py). If it exceeds the 3% target, so does any host-bound engine."""
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            python_loop(200_000)
            times.append((time.perf_counter() - t0) * 1e3)
        cvs = window_cvs(times, 10)
        return {"python_loop_ms_median": statistics.median(times), "window_cv_median": statistics.median(cvs),
                "window_cv_max": max(cvs)}

    host_before = host_steadiness()
    rows = []
    for t_name, crops in zip(space.tier_names, tiers):
        for k in topks:
            for nb in nbs:
                fixed = KnobChoice(t_name, crops, 1, k, nb)
                for _ in range(args.warmup):
                    run(fixed, ctl)
                syncs = syncs_per_request(fixed, ctl)
                res, per_repeat = zip(*(diagnosed(fixed, ctl) for _ in range(args.repeats)))
                lat = [r.latency_ms for r in res]
                seg = {s: statistics.median(r.segments_ms[s] for r in res) for s in SEGMENT_ORDER}
                row = {"tier": t_name, "max_crops": crops, "top_k": k, "num_blocks": nb, "p": 1,
                       "num_crops": res[0].num_crops, "vision_tokens": res[0].vision_tokens,
                       "prompt_tokens": res[0].prompt_tokens, "answer_tokens": len(res[0].answer_ids),
                       "latency_ms_median": statistics.median(lat),
                       "latency_cv": statistics.pstdev(lat) / statistics.mean(lat),
                       "decode_ms_per_token": seg["decode_ms"] / max(1, len(res[0].answer_ids) - 1),
                       **{f"{s}_median": v for s, v in seg.items()},
                       "syncs_per_request": syncs, "per_repeat": list(per_repeat)}
                rows.append(row)
                gc.collect()
                print(f"{t_name:6s} crops {row['num_crops']:2d} tok {row['prompt_tokens']:5d} k {k} nb {nb:2d} | "
                      f"total {row['latency_ms_median']:8.2f} ms cv {row['latency_cv'] * 100:4.1f}% | " +
                      " ".join(f"{s[:-3]} {seg[s]:.2f}" for s in SEGMENT_ORDER) +
                      f" | syncs {syncs} | slowest: {max(lat):.1f} ms, cpu "
                      f"{max(per_repeat, key=lambda d: d['latency_ms'])['thread_cpu_ms']:.1f} ms vs median cpu "
                      f"{statistics.median(d['thread_cpu_ms'] for d in per_repeat):.1f}", flush=True)
    # Controller overhead A/B: controlled path vs plain path with the knobs the controller chose.
    diffs, ctl_lat, plain_lat = [], [], []
    gen = torch.Generator().manual_seed(0)
    for i in range(0 if args.no_ab else args.warmup + args.repeats * 2):
        a = engine.serve(image, QUESTION, 250.0, ctl, max_new_tokens=args.tokens, stop_at_eos=False, generator=gen)
        b = run(a.knobs, None)
        if i >= args.warmup:
            diffs.append(a.latency_ms - b.latency_ms)
            ctl_lat.append(a.latency_ms)
            plain_lat.append(b.latency_ms)
    ab = {"pairs": len(diffs), "stage1_plus_stage2_params": ctl.num_policy_params(),
          "timer_mark_cost_us": timer_overhead_us(device, 2000)}
    if diffs:
        ab.update(overhead_ms_median=statistics.median(diffs), overhead_ms_mean=statistics.mean(diffs),
                  controlled_ms_median=statistics.median(ctl_lat), plain_ms_median=statistics.median(plain_lat))
        print(f"controller overhead (A/B, median of {len(diffs)} pairs): {ab['overhead_ms_median']:.3f} ms "
              f"(target < 0.2 ms; ratio {ab['overhead_ms_median'] / 0.2:.2f})")
    print(f"timer mark {ab['timer_mark_cost_us']:.1f} us")
    host = {"before": host_before, "after": host_steadiness()}
    print("host steadiness (pure-Python loop, CV over 10 repeats; median / max): " + ", ".join(
        f"{k} {v['window_cv_median'] * 100:.1f}% / {v['window_cv_max'] * 100:.1f}%" for k, v in host.items()))
    out = {"card": card, "affinity_cores": args.affinity, "experts_implementation": args.experts,
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "host_steadiness": host,
           "engine": "eager", "dtype": "bfloat16" if not args.tiny else "float32", "repeats": args.repeats,
           "answer_tokens": args.tokens, "rows": rows, "ab": ab,
           "max_cv": max(r["latency_cv"] for r in rows)}
    import transformers
    out["transformers"] = transformers.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"max CV {out['max_cv'] * 100:.2f}% (target <= 3%); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
