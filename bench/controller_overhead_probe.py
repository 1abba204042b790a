"""Where the controller's overhead goes on a GPU (issue 4 point 5), full-size MolmoE, random bf16 weights.

    python bench/controller_overhead_probe.py --out runs/bench/controller_overhead_probe.json [--requests 200]

The controller-overhead A/B (`bench/rollout_speed.py`) gives the total (0.73-1.04 ms on H100s) and the
segments (Stage1 ~0.2 ms, Stage2 ~0.45-0.5 ms). This probe splits those segments. It times the HOST Stage2
path (`RequestEngine(device_stage2=False)`, and fixed decisions); on CUDA the request path now decides Stage2
on the device by default (rollout_workers/device_stage2.py; its A/B is in `bench/rollout_speed.py
--ab-host-stage2`). It runs the controlled
path's steps as `RequestEngine.serve` does (same calls, same order; high tier, p = 1, the controller's own
sampled top_k / num_blocks) with host timestamps (`time.perf_counter`) between the steps and CUDA events at
the points where the GPU waits for the host:

* Stage1 window (the GPU is idle: the question's feature was read back): the event after preprocessing ->
  `act_stage1` -> `budget_token_embedding` -> its host-to-device copy -> the event after it. The token is
  computed and copied on every request here, as for a request with a new budget; the request path keeps the
  last one on the device (`RequestEngine._budget_token_on_device`), so a group's later rollouts skip both.
* Stage2 window: the event after the prefix's graphs were queued (completes when the GPU finishes the
  prefix) -> the latency token's device-to-host copy (the host waits here) -> the spent fraction (an event
  and its synchronisation) -> features -> `act_stage2` -> block selection -> the event just before the rest
  of the prefill is queued. GPU bubble = the time between the two events; the host's share of it starts when
  the copy returns.

Three ways of reading the latency token back, interleaved request by request: ``blocking`` (the request path
before this probe: ``.cpu()``, then the timer's own event synchronisation for the spent fraction),
``pinned+spin`` (the request path since, `RequestEngine._latency_state_and_elapsed`: a copy into pinned memory
queued before the timer's event, which the host polls: one wait) and ``pinned+block`` (the same, blocking on
the event). (The H100 JSONs in docs/bench came from earlier versions of this script, named in
docs/PERFORMANCE.md.) Also the controller's calls in tight loops (the host's
speed without a GPU wait before each call). Prints a table of median microseconds per step and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


class _HostEvent:
    """torch.cuda.Event's interface on the host clock (--tiny-cpu)."""

    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: "_HostEvent") -> float:
        return (other.t - self.t) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/controller_overhead_probe.json")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tiny-cpu", action="store_true", help="the tiny random model on the CPU, host clock for "
                    "the events: only checks that the script runs")
    args = ap.parse_args()
    if not args.tiny_cpu and not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from bench.rollout_speed import QUESTION, png
    from rollout_workers.fast_engine import FastEngine
    from rollout_workers.molmoe.config import MolmoeConfig
    from rollout_workers.molmoe.loader import random_full_size
    from rollout_workers.molmoe.preprocessing import MolmoPreprocessor
    from rollout_workers.molmoe_backend import word_level_tokenizer
    from rollout_workers.request_path import RequestEngine
    from rollout_workers.timers import SegmentTimer
    from shared.controller import Stage1Features, Stage2Features, TwoStageController
    from shared.knobs import ImportanceScores, KnobSpace, select_blocks

    torch.set_grad_enabled(False)
    dev = torch.device("cpu" if args.tiny_cpu else "cuda")
    cfg = MolmoeConfig.tiny() if args.tiny_cpu else MolmoeConfig.full()
    L = cfg.n_layers
    if args.tiny_cpu:
        space = KnobSpace(("low", "medium", "high"), (1, 2, 4), (1, 2), (1, 2), (3, 4), L, cfg.num_experts, cfg.top_k)
    else:
        from bench.rollout_speed import benchmark_space
        space = benchmark_space(L, cfg.num_experts, cfg.top_k)
    imp = ImportanceScores.by_index(L)
    pre = MolmoPreprocessor(cfg, word_level_tokenizer(cfg, QUESTION.split()))
    if args.tiny_cpu:
        from rollout_workers.molmoe.modeling import MolmoeModel
        torch.manual_seed(0)
        model = MolmoeModel(cfg).eval()
    else:
        model = random_full_size(dev, torch.bfloat16, seed=0).eval()
    ex = FastEngine(model, max_len=2048, top_k_max=max(space.top_ks))
    Event = _HostEvent if args.tiny_cpu else torch.cuda.Event
    sync = (lambda: None) if args.tiny_cpu else torch.cuda.synchronize
    eng = RequestEngine(model, pre, space, imp, executor=ex)
    ctl = TwoStageController(space, cfg.d_model, token_rms=eng.token_rms())
    t0 = time.perf_counter()
    ex.warmup(space, importance=imp, crop_counts=[max(space.tier_max_crops) + 1])
    print(f"warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    rgb = pre.load_image(png())
    h_px, w_px = rgb.shape[:2]
    tier_tokens = [int(c[1]) for c in pre.tier_token_counts(w_px, h_px, space.tier_max_crops)]
    lang = eng.language_feature(QUESTION)
    inputs = pre.preprocess(QUESTION, rgb, max_crops=max(space.tier_max_crops), device=ex.preprocess_device).to(dev)
    budget_ms, p = 250.0, 1
    gen = torch.Generator().manual_seed(0)
    now = time.perf_counter
    torch.set_num_threads(4)          # as bench/rollout_speed.py
    # steady state, no GPU wait before each call: the host's own speed for the same calls
    f1s = Stage1Features(lang_feat=lang, budget_ms=budget_ms, tier_tokens=tier_tokens,
                         tier_mask=space.tier_mask(tier_tokens), p_mask=[True] * len(space.positions))
    f2s = Stage2Features(latency_state=lang.copy(), p_idx=0, vision_tokens=tier_tokens[-1], spent_frac=0.3,
                         nb_mask=space.num_blocks_feasible(p))

    def loop_us(fn, n=2000):
        for _ in range(50):
            fn()
        t = now()
        for _ in range(n):
            fn()
        return (now() - t) / n * 1e6
    steady = {"act_stage1_us": loop_us(lambda: ctl.act_stage1(f1s, generator=gen)),
              "act_stage2_us": loop_us(lambda: ctl.act_stage2(budget_ms, f2s, generator=gen)),
              "select_blocks_us": loop_us(lambda: select_blocks(p, max(space.num_blocks), imp.scores)),
              "select_blocks_uncached_us": loop_us(lambda: sorted(range(p, L), key=lambda b: (-imp.scores[b], b)))}
    print("steady state (tight loops):", {k: round(v, 1) for k, v in steady.items()}, flush=True)
    variants = ("blocking", "pinned+spin", "pinned+block")
    rows: list[dict] = []
    for i in range(3 * args.requests + 10):
        variant = variants[i % 3]
        sync()
        timer = SegmentTimer(dev)
        f1 = Stage1Features(lang_feat=lang, budget_ms=budget_ms, tier_tokens=tier_tokens,
                            tier_mask=space.tier_mask(tier_tokens), p_mask=[True] * len(space.positions))
        # ---- Stage1 window
        e1 = Event(enable_timing=True)
        e1.record()
        h0 = now()
        d_tier, d_p = ctl.act_stage1(f1, generator=gen)
        h1 = now()
        tok_host = ctl.budget_token_embedding(budget_ms)
        h2 = now()
        budget_tok = tok_host.to(device=dev, dtype=model.dtype)
        h3 = now()
        e2 = Event(enable_timing=True)
        e2.record()
        # ---- vision and prefix (high tier, p = 1, as the A/B's requests)
        x = ex.encode(inputs)
        T = x.shape[1]
        ex.begin()
        x = torch.cat([x, budget_tok.to(x.dtype)[None, None, :]], dim=1)
        h = ex.prefill(x, list(range(p)), {})
        e3 = Event(enable_timing=True)
        e3.record()
        h4 = now()
        # ---- Stage2 window
        if variant == "blocking":
            state = h[0, -1].cpu()
            h5 = now()
            state = state.float().numpy().copy()
            spent = timer.elapsed_ms() / budget_ms
        else:
            eng.spin_wait = variant == "pinned+spin"
            state, elapsed = eng._latency_state_and_elapsed(h[0, -1], timer)
            h5 = now()
            spent = elapsed / budget_ms
        h6 = now()
        f2 = Stage2Features(latency_state=state, p_idx=0, vision_tokens=tier_tokens[-1], spent_frac=float(spent),
                            nb_mask=space.num_blocks_feasible(p))
        h7 = now()
        d_k, d_nb = ctl.act_stage2(budget_ms, f2, generator=gen)
        h8 = now()
        top_k, nb = space.top_ks[d_k.index], space.num_blocks[d_nb.index]
        block_ids = select_blocks(p, nb, imp.scores)
        k_map = {b: top_k for b in block_ids if b >= p}
        e4 = Event(enable_timing=True)
        e4.record()
        h9 = now()
        h = ex.prefill(h, block_ids[p:], k_map)
        h10 = now()
        ex.head(h[:, T - 1:T])
        sync()
        if i < 10:
            continue
        rows.append({
            "variant": variant,
            "stage1_gpu_gap_us": e1.elapsed_time(e2) * 1e3,
            "act_stage1_us": (h1 - h0) * 1e6, "budget_token_us": (h2 - h1) * 1e6,
            "budget_token_to_device_us": (h3 - h2) * 1e6,
            "stage2_gpu_bubble_us": e3.elapsed_time(e4) * 1e3,
            "wait_for_state_us": (h5 - h4) * 1e6,
            "after_wait_state_and_spent_fraction_us": (h6 - h5) * 1e6,
            "stage2_features_us": (h7 - h6) * 1e6, "act_stage2_us": (h8 - h7) * 1e6,
            "select_blocks_us": (h9 - h8) * 1e6, "host_after_wait_to_event_us": (h9 - h5) * 1e6,
            "rest_prefill_queue_us": (h10 - h9) * 1e6, "num_blocks": nb, "top_k": top_k})
    keys = [k for k in rows[0] if k.endswith("_us")]
    med = {v: {k: statistics.median(r[k] for r in rows if r["variant"] == v) for k in keys} for v in variants}
    for v in variants:
        med[v]["bubble_minus_host_us"] = med[v]["stage2_gpu_bubble_us"] - med[v]["host_after_wait_to_event_us"]
    print("\n| step (median µs) | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for k in keys + ["bubble_minus_host_us"]:
        print(f"| {k} | " + " | ".join(f"{med[v][k]:.1f}" for v in variants) + " |")
    print("| steady state: " + ", ".join(f"{k} {v:.1f}" for k, v in steady.items()) + " | | | |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    card = "cpu (tiny model)" if args.tiny_cpu else torch.cuda.get_device_name(0)
    Path(args.out).write_text(json.dumps({"card": card, "date": time.strftime("%Y-%m-%d"),
                                          "torch": torch.__version__, "requests_per_variant": args.requests,
                                          "steady_state_us": steady, "median_us": med, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
