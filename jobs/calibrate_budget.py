"""Budget calibration: end-to-end latency of the cheapest and the most expensive static knob combinations
on this hardware and engine, under the training thread count and concurrency; writes the budget range.

    python jobs/calibrate_budget.py --config jobs/configs/X.yaml [--samples 32] [--out PATH]
                                    [--split train] [--repeats 1] [overrides key.sub=value ...]

What is measured: `RequestEngine.serve` through the rollout backend (`backend.run(..., controller=None,
fixed=knobs)`), i.e. the plain static path from image bytes + question to answer text, with the same
latency the workers record (host clock on CPU, CUDA events on GPU). Answers are decoded greedily up to
each sample's max_new_tokens and stop at EOS, as in training. Combinations, at p = knobs.static_p:

- cheapest: the first tier, the smallest top_k, the smallest num_blocks feasible at p;
- most expensive: the last tier, the largest top_k, the largest num_blocks.

Conditions match training: every process calls torch.set_num_threads(system.torch_threads), and
`concurrency` processes run at once, the number of rollout workers training starts
(`system.num_workers`, else one per GPU / gpus_per_worker, else 2 on CPU; override with --concurrency).
Each process (spawned, its own model copy; on GPU process i uses GPU i mod #GPUs) warms up (both
combinations on a few inputs in turn, so that their shapes warm up too), waits at a barrier, times its
share of the samples (sample j goes to process j mod concurrency; both combinations per sample, their
order alternating), then keeps serving unmeasured requests until every process has finished, so that
every measurement ran under the full concurrency.

Budget range written (and read by `shared.calibration.apply_calibration`):
    min_ms = p50 of the cheapest, max_ms = p95 of the most expensive;
    norm_min_ms = max(0, min_ms - m), norm_max_ms = max_ms + m, m = max(0.1 (max_ms - min_ms), 0.05 max_ms, 1).
Fails (exit 1) when the most expensive p95 is not above the cheapest p50: the knobs would not change
latency on this setting, and there would be nothing to control.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import queue as queue_mod
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

BIG_BUDGET_MS = 1e6          # static path: the budget is not used, only checked


def extreme_choices(space, static_p: int):
    """(cheapest, most expensive) KnobChoice at p = static_p."""
    from shared.knobs import KnobChoice, KnobError
    if static_p not in space.positions:
        raise KnobError(f"knobs.static_p={static_p} is not one of the insertion positions {list(space.positions)}")
    feasible = [nb for nb, ok in zip(space.num_blocks, space.num_blocks_feasible(static_p)) if ok]
    cheap = KnobChoice(space.tier_names[0], space.tier_max_crops[0], static_p, space.top_ks[0], feasible[0])
    dear = KnobChoice(space.tier_names[-1], space.tier_max_crops[-1], static_p, space.top_ks[-1], feasible[-1])
    return cheap, dear


def resolve_concurrency(cfg, override: int = 0) -> tuple[int, bool]:
    """(number of concurrent processes, use GPU): the worker count jobs/train.py starts."""
    import torch
    use_gpu = (cfg.model.backend != "synthetic" and cfg.model.device != "cpu" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if use_gpu else 0
    n = override or cfg.system.num_workers or (max(1, int(gpus / cfg.system.gpus_per_worker)) if use_gpu else 2)
    return n, use_gpu


def summarize(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean()),
            "std": float(a.std()), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def derive_range(cheap: dict, dear: dict) -> dict:
    lo, hi = cheap["p50"], dear["p95"]
    if not hi > lo:
        raise ValueError(f"the most expensive combination's p95 ({hi:.2f} ms) is not above the cheapest's p50 "
                         f"({lo:.2f} ms): the knobs do not change latency here, nothing to calibrate")
    m = max(0.1 * (hi - lo), 0.05 * hi, 1.0)
    return {"min_ms": lo, "max_ms": hi, "norm_min_ms": max(0.0, lo - m), "norm_max_ms": hi + m}


def _measure(rank: int, cfg, samples: list, choices: dict, warmup: int, repeats: int, gpu_index: Optional[int],
             barrier=None, done=None, n_procs: int = 1, show_progress: bool = False) -> dict:
    """One process's share: warm-up, barrier, timed requests, then unmeasured load until all are done."""
    import torch

    from rollout_workers.backends import make_backend
    from shared.backend import SampleError
    torch.set_num_threads(cfg.system.torch_threads)
    if gpu_index is not None:
        torch.cuda.set_device(gpu_index)
    backend = make_backend(cfg, worker_id=rank)
    info = backend.info()
    names = list(choices)

    def serve(sample, name):
        return backend.run(sample, BIG_BUDGET_MS, None, fixed=choices[name])

    usable = list(samples)
    for w in range(warmup):                      # cycle through the inputs: new shapes warm up too
        for name in names:
            while usable:
                s = usable[w % len(usable)]
                try:
                    serve(s, name)
                    break
                except SampleError:
                    usable.remove(s)
    if barrier is not None:
        barrier.wait()
    mine = usable[rank::n_procs] if n_procs > 1 else usable
    rows, failures = [], []
    work = [(j, r, s) for j, s in enumerate(mine) for r in range(repeats)]
    if show_progress:
        from jobs.job_utils import progress
        work = progress(work, total=len(work), desc=f"calibration (process {rank})")
    for j, r, s in work:
        order = names if (j + r) % 2 == 0 else names[::-1]
        for name in order:
            try:
                out = serve(s, name)
            except SampleError as exc:
                failures.append(f"{s.sample_id}: {exc}")
                break
            rows.append({"combo": name, "sample_id": s.sample_id, "latency_ms": float(out.latency_ms),
                         "answer_tokens": int(out.answer_tokens), "vision_tokens": int(out.vision_tokens),
                         "segments_ms": {k: float(v) for k, v in out.segments_ms.items()}})
    if done is not None:
        with done.get_lock():
            done.value += 1
        k = 0
        while done.value < n_procs and mine:               # keep the load on until every process is done
            serve(mine[k % len(mine)], names[k % len(names)])
            k += 1
    return {"rank": rank, "rows": rows, "failures": failures, "device": info.device, "engine": info.engine,
            "model_id": info.model_id, "backend": info.backend, "importance_sha256": info.importance_sha256}


def _proc_main(rank, cfg, samples, choices, warmup, repeats, gpu_index, barrier, done, n_procs, results):
    try:
        results.put(("ok", _measure(rank, cfg, samples, choices, warmup, repeats, gpu_index, barrier, done,
                                    n_procs)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails with it
        import traceback
        results.put(("error", f"process {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        with done.get_lock():
            done.value += 1


def run_processes(cfg, samples, choices, concurrency, use_gpu, warmup, repeats, timeout_s=3600.0) -> list[dict]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(concurrency)
    done = ctx.Value("i", 0)
    results = ctx.Queue()
    import torch
    ngpu = torch.cuda.device_count() if use_gpu else 0
    procs = [ctx.Process(target=_proc_main, args=(i, cfg, samples, choices, warmup, repeats,
                                                  (i % ngpu) if ngpu else None, barrier, done, concurrency,
                                                  results), daemon=True)
             for i in range(concurrency)]
    for p in procs:
        p.start()
    outs, errors = [], []
    deadline = time.monotonic() + timeout_s
    try:
        while len(outs) + len(errors) < concurrency:
            try:
                kind, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"calibration process exited with code {dead[0].exitcode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"calibration did not finish within {timeout_s:.0f}s")
                continue
            (outs if kind == "ok" else errors).append(payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError(errors[0])
    return sorted(outs, key=lambda o: o["rank"])


def calibrate(cfg, samples: list, *, concurrency: int, use_gpu: bool, warmup: int = 2, repeats: int = 1,
              show_progress: bool = False) -> dict:
    """Measure both combinations and derive the budget range (the report without provenance fields)."""
    from shared.knobs import KnobSpace
    if cfg.model.backend != "molmoe":
        raise ValueError(f"model.backend is {cfg.model.backend!r}: only a real model has latencies to calibrate")
    space = KnobSpace.from_config(cfg.knobs, cfg.model)
    cheap, dear = extreme_choices(space, cfg.knobs.static_p)
    choices = {"cheapest": cheap, "most_expensive": dear}
    if concurrency == 1:
        outs = [_measure(0, cfg, samples, choices, warmup, repeats, 0 if use_gpu else None,
                         show_progress=show_progress)]
    else:
        outs = run_processes(cfg, samples, choices, concurrency, use_gpu, warmup, repeats)
    rows = [r for o in outs for r in o["rows"]]
    failures = [f for o in outs for f in o["failures"]]
    report = {}
    for name, choice in choices.items():
        mine = [r for r in rows if r["combo"] == name]
        if not mine:
            raise ValueError(f"no successful request for the {name} combination ({len(failures)} failures: "
                             f"{failures[:3]})")
        stats = summarize([r["latency_ms"] for r in mine])
        seg_names = sorted({k for r in mine for k in r["segments_ms"]})
        report[name] = {"knobs": vars(choice).copy(), **stats,
                        "segments_p50_ms": {k: float(np.median([r["segments_ms"].get(k, 0.0) for r in mine]))
                                            for k in seg_names},
                        "mean_answer_tokens": float(np.mean([r["answer_tokens"] for r in mine])),
                        "mean_vision_tokens": float(np.mean([r["vision_tokens"] for r in mine]))}
    report.update(derive_range(report["cheapest"], report["most_expensive"]))
    first = outs[0]
    report.update({"backend": first["backend"], "engine": first["engine"], "model_id": first["model_id"],
                   "device": first["device"], "importance_sha256": first["importance_sha256"],
                   "failures": len(failures), "failure_examples": failures[:5]})
    return report


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (model, knobs, system, data)")
    ap.add_argument("--samples", type=int, default=32, help="inputs to time (the first N of the split; default 32)")
    ap.add_argument("--split", default="train", help="'train'/'val' or a split name (default: train)")
    ap.add_argument("--repeats", type=int, default=1, help="timed requests per (sample, combination)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="warm-up rounds per process, each serving both combinations on the next input "
                         "(default: max(system.warmup_rollouts, min(#samples, 8)))")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="processes at once (default: the training worker count); a value other than "
                         "training's makes the calibration not match training")
    ap.add_argument("--out", required=True, help="output JSON (the file budget.calibration names)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jobs.job_utils import hardware_description, samples_for_split
    from shared.config import load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        samples = samples_for_split(cfg, args.split, args.samples)[: args.samples]
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not samples:
        print(f"error: split {args.split!r} has no samples", file=sys.stderr)
        return 2
    concurrency, use_gpu = resolve_concurrency(cfg, args.concurrency)
    warmup = args.warmup or max(cfg.system.warmup_rollouts, min(len(samples), 8))
    print(f"[calibrate] {len(samples)} samples x {args.repeats} repeat(s), concurrency {concurrency}, "
          f"{cfg.system.torch_threads} torch thread(s) per process, {'GPU' if use_gpu else 'CPU'}", flush=True)
    try:
        report = calibrate(cfg, samples, concurrency=concurrency, use_gpu=use_gpu, warmup=warmup,
                           repeats=args.repeats, show_progress=not args.quiet)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import torch
    out = {"hardware": hardware_description("cuda" if use_gpu else "cpu"), "engine": report.pop("engine"),
           "model_id": report.pop("model_id"), "torch_threads": cfg.system.torch_threads,
           "concurrency": concurrency, **report,
           "static_p": cfg.knobs.static_p, "samples": len(samples), "repeats": args.repeats, "split": args.split,
           "sources": [s.name for s in cfg.data.sources], "warmup_rounds": warmup,
           "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", "jobs/calibrate_budget.py",
                                *(argv if argv is not None else sys.argv[1:])])}
    assert all(math.isfinite(out[k]) for k in ("min_ms", "max_ms", "norm_min_ms", "norm_max_ms"))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name in ("cheapest", "most_expensive"):
        s = out[name]
        k = s["knobs"]
        print(f"  {name:14s} tier {k['tier']} (max_crops {k['max_crops']}), top_k {k['top_k']}, "
              f"{k['num_blocks']} blocks: p50 {s['p50']:.1f} ms, p95 {s['p95']:.1f} ms, mean {s['mean']:.1f} ms "
              f"(n={s['n']})")
    print(f"[calibrate] budget range [{out['min_ms']:.1f}, {out['max_ms']:.1f}] ms, normalisation "
          f"[{out['norm_min_ms']:.1f}, {out['norm_max_ms']:.1f}] ms on {out['hardware']} ({out['device']}, engine "
          f"{out['engine']}); {out['failures']} failed request(s); wrote {path} in {out['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
