"""How long the GPU really waits around the Stage2 decision (issue 4 point 5), read from the GPU's own clock.

    python3 bench/stage2_gap_probe.py --out stage2_gap_probe.json [--rounds 200]

The stage2 segment of the request timers (CUDA events) ends when the host records its event, after its own
bookkeeping, so it does not say how long the GPU sat idle. Here the fast engine's prefill calls and Stage2's
queue are wrapped to launch a one-thread kernel that writes the GPU's `%globaltimer` (the kernel device-side
Stage2 already uses) before and after each of them, so the stream records when it reached each point:

    prefix start | prefix end | Stage2 queued ... Stage2 done | rest (or early blocks) start ... end | head end

Per request: the GPU's wait between Stage2's end and the next prefill's start (the bubble), and the GPU time from
the prefix's end to the head's end (Stage2, the bubble, the rest of the prefill). Two greedy variants, interleaved
per round in a shuffled order: the default request path (`early_rest_prefill`: the always-run blocks and the
top_k write queued before the decision is read) and the rest of the prefill queued after the decision is read. Their paired difference of "prefix end -> head end" is the
early path's gain on the GPU clock, free of the host-speed noise of end-to-end latencies. Each stamp adds one
tiny kernel (~2-4 us) to the stream; the early path has one more prefill call, hence two more stamps.
Full-size MolmoE (random weights, bf16) on CUDA. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rollout_speed import QUESTION, benchmark_space, png  # noqa: E402
from rollout_workers import triton_kernels  # noqa: E402
from rollout_workers.fast_engine import FastEngine  # noqa: E402
from rollout_workers.molmoe.config import MolmoeConfig  # noqa: E402
from rollout_workers.molmoe.loader import random_full_size  # noqa: E402
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor  # noqa: E402
from rollout_workers.molmoe_backend import word_level_tokenizer  # noqa: E402
from rollout_workers.request_path import RequestEngine  # noqa: E402
from shared.controller import TwoStageController  # noqa: E402
from shared.knobs import ImportanceScores  # noqa: E402

BUDGET_MS = 250.0


class Stamps:
    """Labelled `%globaltimer` stamps in one int64 device buffer, reset per request."""

    def __init__(self, device: torch.device, slots: int = 64):
        self.buf = torch.zeros(slots, dtype=torch.int64, device=device)
        self.labels: list[str] = []
        self.host: dict[str, float] = {}        # host perf_counter (s) at labelled points

    def reset(self) -> None:
        self.labels = []
        self.host = {}

    def __call__(self, label: str) -> None:
        triton_kernels.stamp_ns(self.buf, len(self.labels))
        self.labels.append(label)

    def read(self) -> list[tuple[str, float]]:
        """(label, microseconds since the first stamp) after the stream has passed them."""
        ns = self.buf[:len(self.labels)].tolist()
        return [(lab, (t - ns[0]) / 1e3) for lab, t in zip(self.labels, ns)]


def instrument(engine: RequestEngine, fast: FastEngine, stamps: Stamps) -> None:
    """Stamps around the engine's prefill calls, Stage2's queue and the head (instance attributes shadow the
    methods; the request path calls them through the instance)."""
    state = {"after_stage2": False}
    prefill, head, dev_s2 = fast.prefill, fast.head, engine.stage2_on_device
    queue, result = dev_s2.queue, dev_s2.result

    def stamped_prefill(x, block_ids, top_k):
        name = "rest" if state["after_stage2"] else "prefix"
        if state["after_stage2"] and top_k is None:
            name = "early"
        stamps.host.setdefault(f"{name} call", time.perf_counter())
        stamps(f"{name} start")
        h = prefill(x, block_ids, top_k)
        stamps(f"{name} end")
        return h

    def stamped_queue(*a, **k):
        queue(*a, **k)
        stamps("stage2 done")
        stamps.host["stage2 queued"] = time.perf_counter()
        state["after_stage2"] = True

    def timed_result(*a, **k):
        out = result(*a, **k)
        stamps.host["decision read"] = time.perf_counter()
        return out

    dev_s2.result = timed_result

    def stamped_head(h):
        out = head(h)
        stamps("head end")
        state["after_stage2"] = False
        return out

    engine._stamp_hooks = (stamped_prefill, stamped_queue, stamped_head)


def use_hooks(engine: RequestEngine, fast: FastEngine) -> None:
    fast.prefill, engine.stage2_on_device.queue, fast.head = engine._stamp_hooks


def summarise(stamps: list[tuple[str, float]], host: dict[str, float]) -> dict:
    t = dict(stamps)      # labels are unique within a request (one prefix, at most one early, one rest)
    first_after = "early start" if "early start" in t else "rest start"
    return {"bubble_us": t[first_after] - t["stage2 done"],
            # the host: from Stage2 queued to its decision read (waiting for the GPU), then to the rest's call
            "host_wait_for_decision_us": (host["decision read"] - host["stage2 queued"]) * 1e6,
            "host_decision_to_rest_call_us": (host["rest call"] - host["decision read"]) * 1e6,
            "stage2_us": t["stage2 done"] - t["prefix end"],
            "prefix_end_to_head_end_us": t["head end"] - t["prefix end"],
            "early_end_to_rest_start_us": (t["rest start"] - t["early end"]) if "early end" in t else None,
            "stamps": stamps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/stage2_gap_probe.json")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=4)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not triton_kernels.available(torch.device("cuda")):
        print("needs a CUDA GPU with Triton")
        return 2
    torch.set_num_threads(4)
    device = torch.device("cuda")
    cfg = MolmoeConfig.full()
    L = cfg.n_layers
    space = benchmark_space(L, cfg.num_experts, cfg.top_k)
    importance = ImportanceScores.by_index(L)
    model = random_full_size(device, torch.bfloat16, seed=0).eval()
    pre = MolmoPreprocessor(cfg, word_level_tokenizer(cfg, QUESTION.split()))
    fast = FastEngine(model, max_len=2048, top_k_max=max(space.top_ks))
    fast.warmup(space, importance=importance)
    engines = {"early_rest_prefill (default)": RequestEngine(model, pre, space, importance, executor=fast),
               "after the decision": RequestEngine(model, pre, space, importance, executor=fast,
                                                   early_rest_prefill=False)}
    if not engines["early_rest_prefill (default)"].early_rest_prefill:
        raise RuntimeError("the default engine does not queue the rest of the prefill early")
    ctl = TwoStageController(space, cfg.d_model, token_rms=engines["after the decision"].token_rms())
    image = png()
    stamps = Stamps(device)
    # a stamp's own host cost: the GPU waits for it too where the host is behind (what each wait includes)
    for _ in range(3):          # Triton specialises integer arguments (1, multiples of 16): every slot once
        for _ in range(32):
            stamps("warm")
        stamps.reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(32):
        for _ in range(32):
            stamps("x")
        stamps.reset()
    launch_us = (time.perf_counter() - t0) / 1024 * 1e6
    torch.cuda.synchronize()
    originals = (fast.prefill, None, fast.head)
    for e in engines.values():
        instrument(e, fast, stamps)
    rows: dict = {name: [] for name in engines}
    knobs: dict = {name: [] for name in engines}
    order = np.random.default_rng(0)
    for i in range(args.rounds + 5):
        for name in order.permutation(list(engines)):
            e = engines[str(name)]
            use_hooks(e, fast)
            stamps.reset()
            r = e.serve(image, QUESTION, BUDGET_MS, ctl, greedy=True, max_new_tokens=args.tokens, stop_at_eos=False)
            torch.cuda.synchronize()
            fast.prefill, fast.head = originals[0], originals[2]
            if i >= 5:
                rows[str(name)].append(summarise(stamps.read(), stamps.host))
                knobs[str(name)].append(str(r.knobs))
    out = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "rounds": args.rounds, "knobs": {n: sorted(set(k)) for n, k in knobs.items()},
           "stamp_launch_host_us": launch_us, "variants": {}}
    print(f"{out['card']}, {args.rounds} rounds, greedy; knobs {out['knobs']}; one stamp costs the host "
          f"{launch_us:.1f} us to launch (each wait below includes one)")
    print("| variant | Stage2 us | GPU wait after Stage2 us | early end -> rest start us | prefix end -> head end us "
          "| host: Stage2 queued -> decision read us | host: decision read -> rest call us |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("stage2_us", "bubble_us", "prefix_end_to_head_end_us",
                                                                 "host_wait_for_decision_us",
                                                                 "host_decision_to_rest_call_us")}
        gaps = [r["early_end_to_rest_start_us"] for r in rs if r["early_end_to_rest_start_us"] is not None]
        med["early_end_to_rest_start_us"] = statistics.median(gaps) if gaps else None
        out["variants"][name] = {"median": med, "per_request": rs}
        print(f"| {name} | {med['stage2_us']:.1f} | {med['bubble_us']:.1f} | "
              f"{'-' if med['early_end_to_rest_start_us'] is None else format(med['early_end_to_rest_start_us'], '.1f')} "
              f"| {med['prefix_end_to_head_end_us']:.1f} | {med['host_wait_for_decision_us']:.1f} "
              f"| {med['host_decision_to_rest_call_us']:.1f} |")
    same = [(a["prefix_end_to_head_end_us"] - b["prefix_end_to_head_end_us"])
            for a, b, ka, kb in zip(rows["early_rest_prefill (default)"], rows["after the decision"],
                                    knobs["early_rest_prefill (default)"], knobs["after the decision"]) if ka == kb]
    if same:
        boot = np.random.default_rng(0)
        meds = [float(np.median(boot.choice(same, len(same)))) for _ in range(1000)]
        out["early_minus_after_decision_prefix_end_to_head_end_us"] = {
            "median": statistics.median(same), "ci95": [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))],
            "pairs": len(same)}
        d = out["early_minus_after_decision_prefix_end_to_head_end_us"]
        print(f"early minus after the decision, prefix end -> head end (GPU clock, same knobs, {d['pairs']} rounds): "
              f"{d['median']:+.1f} us (95% CI {d['ci95'][0]:+.1f}..{d['ci95'][1]:+.1f}); the early path has two stamps "
              f"more (~2-4 us each)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
