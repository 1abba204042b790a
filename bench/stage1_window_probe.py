"""The Stage1 window step by step (issue 4 point 5): where its host time goes, on a GPU host.

    python bench/stage1_window_probe.py --out runs/bench/stage1_window_probe.json [--requests 200]

Stage1 sits where the GPU is idle (the vision encoder needs the tier), so its host time is controller
overhead one for one. This probe runs the window's steps as `RequestEngine.serve` does, with host
timestamps between them, after what precedes them in a request: a ~10 ms GPU wait polled by the host (the
previous request's decoding) and the image's decode (1024x768 PNG). Variants, interleaved per request:

* ``device``: the request path's default on CUDA (rollout_workers/device_stage1.py): question ids,
  `prepare` (weights and budget term, unchanged here), the two uniforms, `queue` (scalars into the pinned
  buffer, one graph replay: copies in, embedding, mean, MLP, draw, copies out; an event), `result` (poll);
* ``host``: the numpy act path with the language feature computed as `RequestEngine.language_feature`
  does (ids to the device, embedding rows, mean, back to the host), then `act_stage1` (its features'
  log-probs are kept between calls, as for a GRPO group's later rollouts and this A/B's fixed question).

Also each step in a tight loop (no wait, no decode before it), and single primitive calls after the same
wait (`torch.rand(2)`, an event record, a 28-element `np.tanh`) against a tight loop: the factor by which
host code is slower right after milliseconds of other work. Needs no model: the embedding table is random
(50,304 x 2,048 bf16), the controller has d_model 2048. Prints a table of medians (us) and writes JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rollout_workers.device_stage1 import DeviceStage1  # noqa: E402
from rollout_workers.molmoe.preprocessing import decode_image  # noqa: E402
from shared.controller import Stage1Features, TwoStageController, uniform_pair  # noqa: E402

QUESTION = "what colour is the small circle in the top left corner of the picture"


def _png(w: int = 1024, h: int = 768) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/stage1_window_probe.json")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--wait-ms", type=float, default=10.0, help="GPU wait polled before each request")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    torch.set_num_threads(4)
    dev = torch.device("cuda")
    from bench.rollout_speed import benchmark_space
    space = benchmark_space()
    torch.manual_seed(0)
    ctl = TwoStageController(space, 2048)
    table = torch.randn(50304, 2048, device=dev, dtype=torch.bfloat16) * 0.02

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, table)[None]

    vocab = {w: i + 10 for i, w in enumerate(sorted(set(QUESTION.split())))}

    def question_ids(q: str) -> list[int]:
        return [vocab[w] for w in q.split()]

    ds = DeviceStage1(dev, space, embed, 2048, compile=True)
    image = _png()
    budget = 250.0
    tier_tokens = [400, 760, 1210]
    tier_mask, p_mask = space.tier_mask(tier_tokens), [True] * len(space.positions)
    gen = torch.Generator().manual_seed(0)
    done = torch.cuda.Event()
    # calibrate torch.cuda._sleep: cycles per ms
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(10_000_000)
    e.record()
    e.synchronize()
    cycles_per_ms = 10_000_000 / s.elapsed_time(e)

    def gpu_wait() -> None:
        torch.cuda._sleep(int(args.wait_ms * cycles_per_ms))
        done.record()
        while not done.query():
            pass

    def device_steps(stamps: list) -> None:
        ids = question_ids(QUESTION)
        stamps.append(time.perf_counter_ns())
        ds.prepare(ctl, budget)
        stamps.append(time.perf_counter_ns())
        u = uniform_pair(gen)
        stamps.append(time.perf_counter_ns())
        ds.queue(ids, tier_tokens, tier_mask, p_mask, u)
        stamps.append(time.perf_counter_ns())
        ds.result()
        stamps.append(time.perf_counter_ns())

    def host_steps(stamps: list) -> None:
        ids = question_ids(QUESTION)
        stamps.append(time.perf_counter_ns())
        emb = embed(torch.tensor(ids, device=dev))
        lang = emb[0].float().mean(0).cpu().numpy()
        stamps.append(time.perf_counter_ns())
        f1 = Stage1Features(lang_feat=lang, budget_ms=budget, tier_tokens=tier_tokens, tier_mask=tier_mask,
                            p_mask=p_mask)
        stamps.append(time.perf_counter_ns())
        ctl.act_stage1(f1, generator=gen)
        stamps.append(time.perf_counter_ns())

    steps = {"device": (device_steps, ["question ids", "prepare", "uniforms", "queue (writes, replay, event)",
                                       "result (poll)"]),
             "host": (host_steps, ["question ids", "language feature (to the device and back)", "features",
                                   "act_stage1"])}
    for fn, _ in steps.values():          # capture, compile, first calls
        for _ in range(3):
            fn([time.perf_counter_ns()])
    a = np.zeros(28, np.float32)
    ev = torch.cuda.Event()
    prims = {"torch.rand(2)": lambda: torch.rand(2), "event record": ev.record, "np.tanh(28)": lambda: np.tanh(a),
             "graph replay (the Stage1 graph)": ds._graph.replay}
    acc = {name: [] for name in steps}
    prim_cold = {name: [] for name in prims}
    order = np.random.default_rng(1)
    for i in range(args.requests + 5):
        for name in order.permutation(list(steps)):
            gpu_wait()
            decode_image(image)
            stamps = [time.perf_counter_ns()]
            steps[name][0](stamps)
            if i >= 5:
                acc[name].append(np.diff(stamps) / 1e3)
        for pname, fn in prims.items():
            gpu_wait()
            t0 = time.perf_counter_ns()
            fn()
            if i >= 5:
                prim_cold[pname].append((time.perf_counter_ns() - t0) / 1e3)
        torch.cuda.synchronize()
    loop = {}
    for name, (fn, labels) in steps.items():
        rows = []
        for _ in range(300):
            stamps = [time.perf_counter_ns()]
            fn(stamps)
            rows.append(np.diff(stamps) / 1e3)
        loop[name] = np.median(np.array(rows), axis=0).tolist()
    prim_loop = {}
    for pname, fn in prims.items():
        ts = []
        for _ in range(300):
            t0 = time.perf_counter_ns()
            fn()
            ts.append((time.perf_counter_ns() - t0) / 1e3)
        prim_loop[pname] = statistics.median(ts)
    torch.cuda.synchronize()

    card = torch.cuda.get_device_name(0)
    out = {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "requests": args.requests,
           "wait_ms": args.wait_ms, "variants": {}, "primitives": {}}
    print(f"{card}: Stage1 window, median us per step after a {args.wait_ms:.0f} ms GPU wait and the image decode "
          f"({args.requests} requests) / in a tight loop")
    print("| variant | step | in a request (us) | tight loop (us) | ratio |\n|---|---|---|---|---|")
    for name, (_, labels) in steps.items():
        med = np.median(np.array(acc[name]), axis=0).tolist()
        tot = float(np.median(np.array(acc[name]).sum(axis=1)))
        out["variants"][name] = {"steps": labels, "request_us": med, "loop_us": loop[name], "total_request_us": tot,
                                 "total_loop_us": float(sum(loop[name]))}
        for lab, m, lp in zip(labels, med, loop[name]):
            print(f"| {name} | {lab} | {m:.1f} | {lp:.1f} | {m / max(lp, 1e-3):.1f}x |")
        print(f"| {name} | **total** (median of sums) | {tot:.1f} | {sum(loop[name]):.1f} | |")
    print("| primitive | after the wait (us) | tight loop (us) | ratio |\n|---|---|---|---|")
    for pname in prims:
        m = statistics.median(prim_cold[pname])
        out["primitives"][pname] = {"after_wait_us": m, "loop_us": prim_loop[pname]}
        print(f"| {pname} | {m:.1f} | {prim_loop[pname]:.1f} | {m / max(prim_loop[pname], 1e-3):.1f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
