"""How steady is this host's speed? Fixed host-bound workloads run back to back, and the coefficient of variation
of their times over windows of 10 consecutive repeats (the eager-engine benchmark's repeats per setting).

    python3 bench/host_speed_probe.py --out host_speed_probe.json [--repeats 300]

Workloads (each sized to ~20 ms here, the same work every repeat):
- python: a pure-Python arithmetic loop (the interpreter alone);
- png: decoding the benchmarks' 1024x768 PNG with Pillow (the request's first preprocessing step);
- launches (CUDA only): 1,000 tiny kernel launches, then one synchronisation (an eager decode step's shape:
  the host's launch path sets the pace, the GPU idles).

If a fixed host-bound workload already varies by more than 3% over 10 repeats, so does any engine whose latency
is host-bound (the eager engine's decode), whatever its code. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def python_loop(n: int = 400_000) -> int:
    acc = 0
    for i in range(n):
        acc = (acc + i * 7) % 1_000_003
    return acc


def make_png_work():
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(buf, "PNG")
    blob = buf.getvalue()

    def run():
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
    return run


def make_launch_work(n_launches: int = 1000):
    import torch
    x = torch.zeros(16, device="cuda")

    def run():
        for _ in range(n_launches):
            x.add_(1.0)
        torch.cuda.synchronize()
    return run


def window_cvs(times: list[float], window: int) -> list[float]:
    """CV (pstdev / mean) of every run of `window` consecutive times."""
    return [statistics.pstdev(times[i:i + window]) / statistics.mean(times[i:i + window])
            for i in range(0, len(times) - window + 1)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/host_speed_probe.json")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--window", type=int, default=10)
    args = ap.parse_args()
    works = {"python": python_loop, "png": make_png_work()}
    card = "cpu"
    try:
        import torch
        if torch.cuda.is_available():
            works["launches"] = make_launch_work()
            card = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    rows = {}
    print("| workload | median ms | CV all | window CV median | window CV max | windows with CV <= 3% |")
    print("|---|---|---|---|---|---|")
    for name, fn in works.items():
        for _ in range(5):
            fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        cvs = window_cvs(times, args.window)
        rows[name] = {"median_ms": statistics.median(times),
                      "cv_all": statistics.pstdev(times) / statistics.mean(times),
                      "window_cv_median": statistics.median(cvs), "window_cv_max": max(cvs),
                      "windows_within_3pct": sum(c <= 0.03 for c in cvs) / len(cvs), "times_ms": times}
        r = rows[name]
        print(f"| {name} | {r['median_ms']:.2f} | {r['cv_all'] * 100:.1f}% | {r['window_cv_median'] * 100:.1f}% | "
              f"{r['window_cv_max'] * 100:.1f}% | {r['windows_within_3pct'] * 100:.0f}% |", flush=True)
    out = {"card": card, "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "window": args.window,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
