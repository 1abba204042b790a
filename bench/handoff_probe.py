"""The request thread's cost of handing a short job to a helper thread around an image decode, as the decode
overlap does (rollout_workers/helper_thread.py): a `ThreadPoolExecutor`'s submit/result against
`run_in_helper` (a put and a get on `queue.SimpleQueue`). Each round follows 10 ms of busy Python (the rest of a
request), then: start the job, decode the benchmarks' 1024x768 PNG, collect the job. Arms alternate.

    python3 bench/handoff_probe.py --out handoff_probe.json [--rounds 300]

Prints a table (medians and p90 of the start and collect calls, and of the whole step against the decode
alone) and writes JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from rollout_workers.helper_thread import run_in_helper  # noqa: E402


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/handoff_probe.json")
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    blob = _png()

    def decode() -> None:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()

    def job() -> int:                     # a little Python, like the window's host calls
        return sum(range(2000))

    def busy(ms: float = 10.0) -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < ms / 1e3:
            pass

    pool = ThreadPoolExecutor(max_workers=1)
    pool.submit(job).result()
    run_in_helper(job).result()
    arms = {"ThreadPoolExecutor": (pool.submit, lambda f: f.result()),
            "run_in_helper": (run_in_helper, lambda p: p.result())}
    data = {name: {"start_us": [], "collect_us": [], "step_ms": []} for name in arms}
    data["decode alone"] = {"step_ms": []}
    for _ in range(args.rounds):
        busy()
        t0 = time.perf_counter()
        decode()
        data["decode alone"]["step_ms"].append((time.perf_counter() - t0) * 1e3)
        for name, (start, collect) in arms.items():
            busy()
            t0 = time.perf_counter()
            handle = start(job)
            t1 = time.perf_counter()
            decode()
            t2 = time.perf_counter()
            collect(handle)
            t3 = time.perf_counter()
            d = data[name]
            d["start_us"].append((t1 - t0) * 1e6)
            d["collect_us"].append((t3 - t2) * 1e6)
            d["step_ms"].append((t3 - t0) * 1e3)
    rows = {}
    print("| arm | start µs (median / p90) | collect µs (median / p90) | whole step ms (median) |")
    print("|---|---|---|---|")
    for name, d in data.items():
        row = {k: {"median": statistics.median(v), "p90": float(np.percentile(v, 90))} for k, v in d.items()}
        rows[name] = row
        start = f"{row['start_us']['median']:.1f} / {row['start_us']['p90']:.1f}" if "start_us" in row else "-"
        collect = f"{row['collect_us']['median']:.1f} / {row['collect_us']['p90']:.1f}" if "collect_us" in row else "-"
        print(f"| {name} | {start} | {collect} | {row['step_ms']['median']:.3f} |")
    out = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
