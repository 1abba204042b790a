"""Paired A/B of a request's first preprocessing step with and without the controller's Stage1 window under it
(RequestEngine's decode overlap, issue 4 point 5): what the overlap adds to the preprocess segment.

    python3 bench/decode_overlap_ab.py --out decode_overlap_ab.json [--pairs 2000] [--tiny]

The controller-overhead A/B of `bench/rollout_speed.py` resolves the controlled path's cost outside
preprocessing to within ~±0.03 ms, but its preprocess difference (where the overlapped window now runs) only to
~±0.3 ms: the image decode is the noisiest part of a request. This script times that step alone, many times,
as `RequestEngine.serve` runs it:

- plain (no controller): decode the image bytes, count the tiers' tokens;
- controlled: the header opened and its size read, the Stage1 window submitted to the helper thread (there:
  the question's ids, the tiers' token counts, the device decision queued), the decode of the opened header,
  the window's result awaited, the sizes compared;
- controlled, ids on the request thread: the previous split (commit f22a75c), the question's ids and the tiers'
  token counts before the submit, handed over through a ThreadPoolExecutor as then;
- controlled, decision read after the decode (`stage1_read_in_helper=False`, the split before 2026-11-27): the
  helper queues the decision and returns; the request thread reads it back after the step. In the other
  controlled arms the helper also waits for the decision (in the driver, without the GIL) and reads it back.

The arms alternate in a random order per round, each after a ~10 ms GPU wait polled by the host (the previous
request's end, as in a request); a controlled arm's decision is read back after its timed step (that read-back
is the stage1 segment, in the A/B's figure without preprocessing). For each arm: the request thread's wall time
and its CPU time. Their difference (wall - CPU) is the time the thread did not run: waiting for the GIL the helper held,
or descheduled. It is far less noisy than the wall time, whose noise is the host's speed, so the paired
difference of (wall - CPU) resolves the GIL's cost to a few microseconds; the paired difference of the CPU time
holds everything else (the hand-off, the header probe, a slower decode beside the helper).
Full-size MolmoE (random weights) on CUDA; `--tiny` runs the tiny model (CPU: a smoke test of the script).
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rollout_speed import QUESTION, benchmark_space, png  # noqa: E402
from rollout_workers.molmoe_backend import word_level_tokenizer  # noqa: E402
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor  # noqa: E402
from rollout_workers.request_path import RequestEngine  # noqa: E402
from shared.controller import TwoStageController, uniform_pair  # noqa: E402
from shared.knobs import ImportanceScores, KnobSpace  # noqa: E402

BUDGET_MS = 250.0
_F22A75C_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage1-window")   # that split's hand-off


def build(tiny: bool, device: torch.device) -> tuple[RequestEngine, TwoStageController]:
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
        space = benchmark_space(L, cfg.num_experts, cfg.top_k)
    engine = RequestEngine(model, pre, space, ImportanceScores.by_index(L), device_stage1=True, overlap_decode=True)
    return engine, TwoStageController(space, cfg.d_model, token_rms=engine.token_rms())


def part1_plain(engine: RequestEngine, image: bytes) -> None:
    """What serve() runs before its first preprocess mark without a controller."""
    rgb = engine._decode_image(image)
    h_px, w_px = rgb.shape[:2]
    engine.pre.tier_token_counts(w_px, h_px, engine.space.tier_max_crops)


def part1_controlled(engine: RequestEngine, image: bytes, ctl: TwoStageController, gen: torch.Generator) -> None:
    """What serve() runs before its first preprocess mark with a controller and the decode overlap: the header
    opened and its size read, the window (the question's ids, the tiers' token counts, the device decision)
    submitted to the helper, the decode of the opened header, the window's result, the sizes compared; the
    decision's read-back (the stage1 segment) after the timed step."""
    header, size = engine._probe_size(image)
    job = engine._overlapped_stage1(QUESTION, size, ctl, BUDGET_MS, False, gen)
    rgb = engine._decode_image(header)
    if not job.result().queued or (rgb.shape[1], rgb.shape[0]) != size:
        raise RuntimeError("the window did not queue, or the header's size differs from the decode's")


def part1_controlled_ids_here(engine: RequestEngine, image: bytes, ctl: TwoStageController,
                              gen: torch.Generator) -> None:
    """The previous split (commit f22a75c), for comparison: the question's ids and the tiers' token counts on the
    request thread, only the device decision in the helper."""
    space, dev_s1 = engine.space, engine.stage1_on_device
    q_ids = engine.question_ids(QUESTION)
    header, size = engine._probe_size(image)
    tier_tokens = [int(c[1]) for c in engine.pre.tier_token_counts(size[0], size[1], space.tier_max_crops)]
    tier_mask, p_mask = space.tier_mask(tier_tokens), [True] * len(space.positions)
    stream = torch.cuda.current_stream(engine.device) if engine.device.type == "cuda" else None

    def window():
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            dev_s1.prepare(ctl, BUDGET_MS)
            dev_s1.queue(q_ids, tier_tokens, tier_mask, p_mask, uniform_pair(gen))

    job = _F22A75C_POOL.submit(window)
    rgb = engine._decode_image(header)
    job.result()
    if (rgb.shape[1], rgb.shape[0]) != size:
        raise RuntimeError("the header's size differs from the decode's")


def gpu_wait(device: torch.device, ms: float, event) -> None:
    """Keep the GPU busy for ~ms and poll its completion, as the request thread does at a request's end."""
    if device.type != "cuda":
        time.sleep(ms / 1e3)
        return
    torch.cuda._sleep(int(ms * 1.4e6))        # ~1.4 GHz cycles per ms: roughly ms, whatever the exact clock
    event.record()
    while not event.query():
        pass


def median_ci(xs: list[float], rng: np.random.Generator, n_boot: int = 2000) -> tuple[float, float, float]:
    a = np.asarray(xs)
    meds = np.median(rng.choice(a, (n_boot, len(a))), axis=1)
    return float(np.median(a)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/decode_overlap_ab.json")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--tiny", action="store_true", help="the tiny model (on CPU: a smoke test of the script)")
    ap.add_argument("--wait-ms", type=float, default=10.0, help="GPU wait polled before each timed step")
    args = ap.parse_args()
    torch.set_num_threads(4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine, ctl = build(args.tiny, device)
    image = png()
    gen = torch.Generator().manual_seed(0)
    event = torch.cuda.Event() if device.type == "cuda" else None
    for _ in range(3):                                   # graphs captured, weights uploaded, caches warm
        engine.serve(image, QUESTION, BUDGET_MS, ctl, max_new_tokens=2, generator=gen)
    overlapped_before = engine.decode_overlapped
    reads_after = RequestEngine(engine.model, engine.pre, engine.space, engine.importance, executor=engine.executor,
                                device_stage1=True, overlap_decode=True, stage1_read_in_helper=False)
    for _ in range(3):
        reads_after.serve(image, QUESTION, BUDGET_MS, ctl, max_new_tokens=2, generator=gen)
    arms = {"plain": lambda: part1_plain(engine, image),
            "controlled": lambda: part1_controlled(engine, image, ctl, gen),
            "controlled, ids on the request thread (f22a75c)":
                lambda: part1_controlled_ids_here(engine, image, ctl, gen),
            "controlled, decision read after the decode": lambda: part1_controlled(reads_after, image, ctl, gen)}
    readback = {"controlled, decision read after the decode": reads_after}
    data = {name: {"wall_ms": [], "cpu_ms": []} for name in arms}
    order = np.random.default_rng(1)
    t_start = time.perf_counter()
    engine._overlapped_stage1(QUESTION, (1024, 768), ctl, BUDGET_MS, False, gen).result()   # the helper thread
    engine.stage1_on_device.result()
    for i in range(args.pairs + 10):
        for name in order.permutation(list(arms)):
            gpu_wait(device, args.wait_ms, event)
            w0, c0 = time.perf_counter(), time.thread_time()
            arms[name]()
            w1, c1 = time.perf_counter(), time.thread_time()
            if name != "plain":     # the stage1 segment's read-back (already done by the helper, but in one arm)
                e = readback.get(name, engine)
                e.stage1_on_device.result(spin=e.spin_wait)
            if i >= 10:
                data[name]["wall_ms"].append((w1 - w0) * 1e3)
                data[name]["cpu_ms"].append((c1 - c0) * 1e3)
    seconds = time.perf_counter() - t_start
    rng = np.random.default_rng(0)
    stats = {}
    for arm in arms:
        if arm == "plain":
            continue
        diff = {k: [c - p for c, p in zip(data[arm][k], data["plain"][k])] for k in ("wall_ms", "cpu_ms")}
        diff["off_cpu_ms"] = [dw - dc for dw, dc in zip(diff["wall_ms"], diff["cpu_ms"])]
        stats[arm] = {k: dict(zip(("median", "ci95_lo", "ci95_hi"), median_ci(v, rng))) for k, v in diff.items()}
    rows = {}
    for name in arms:
        off = [w - c for w, c in zip(data[name]["wall_ms"], data[name]["cpu_ms"])]
        rows[name] = {"wall_ms_median": statistics.median(data[name]["wall_ms"]),
                      "wall_ms_p90": float(np.percentile(data[name]["wall_ms"], 90)),
                      "cpu_ms_median": statistics.median(data[name]["cpu_ms"]),
                      "off_cpu_ms_median": statistics.median(off)}
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"\n{args.pairs} pairs in {seconds:.0f} s on {card}")
    print("| arm | wall ms (median) | wall p90 | request thread's CPU ms | wall - CPU ms |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_ms_median']:.3f} | {r['wall_ms_p90']:.3f} | {r['cpu_ms_median']:.3f} | "
              f"{r['off_cpu_ms_median']:.4f} |")
    print("\n| arm - plain, paired | wall ms (95% CI) | request thread's CPU ms | wall - CPU ms (GIL waits) |")
    print("|---|---|---|---|")
    for arm, st in stats.items():
        print(f"| {arm} | " + " | ".join(f"{st[k]['median']:.4f} ({st[k]['ci95_lo']:.4f} .. {st[k]['ci95_hi']:.4f})"
                                         for k in ("wall_ms", "cpu_ms", "off_cpu_ms")) + " |")
    overlapped = engine.decode_overlapped - overlapped_before + reads_after.decode_overlapped - 3
    out = {"device": card, "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "tiny": args.tiny, "pairs": args.pairs, "wait_ms": args.wait_ms,
           "png_bytes": len(image), "seconds": seconds, "arms": rows, "paired_difference": stats,
           "serve_overlapped_in_warmup": overlapped_before, "raw": data}
    if overlapped:
        raise RuntimeError("serve() ran during the pairs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
