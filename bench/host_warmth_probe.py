"""How host calls slow down after the host has done something else, and whether touching them keeps them fast.

The controller's host window runs ~10x slower inside a request than in a loop (docs/PERFORMANCE.md, "Stage1 on
the device"): every call right after milliseconds of other work is slow. This probe measures one call
(`torch.rand(2)`, a 28-element `np.tanh`, a 50-iteration Python loop) right after a Python spin of `--spin-ms`
milliseconds, with the same call repeated during the spin every `--every-us` microseconds (or never), against
the call in a tight loop. No GPU needed.

    python bench/host_warmth_probe.py --out runs/bench/host_warmth_probe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _py_loop() -> int:
    s = 0
    for i in range(50):
        s += i * i
    return s


_ARR = np.zeros(28)
CALLS = {"torch.rand(2)": lambda: torch.rand(2), "np.tanh (28)": lambda: np.tanh(_ARR), "python loop (50)": _py_loop}


def spin(ms: float, every_us: float | None, fn) -> None:
    """Busy-wait `ms` milliseconds, calling `fn` every `every_us` microseconds if given."""
    end = time.perf_counter() + ms / 1e3
    nxt = 0.0
    while (now := time.perf_counter()) < end:
        if every_us is not None and now >= nxt:
            fn()
            nxt = now + every_us / 1e6


def after_spin_us(fn, ms: float, every_us: float | None, repeats: int) -> float:
    """Median µs of one call of `fn` right after a spin."""
    out = []
    for _ in range(repeats):
        spin(ms, every_us, fn)
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e3)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spin-ms", type=float, default=10.0)
    ap.add_argument("--every-us", type=float, nargs="+", default=[1000.0, 300.0, 100.0])
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/host_warmth_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, fn in CALLS.items():
        row = {"call": name, "tight_loop_us": after_spin_us(fn, 0.0, None, args.repeats),
               "after_spin_us": after_spin_us(fn, args.spin_ms, None, args.repeats)}
        for ev in args.every_us:
            row[f"after_spin_touched_every_{ev:g}us"] = after_spin_us(fn, args.spin_ms, ev, args.repeats)
        rows.append(row)
    cols = list(rows[0])[1:]
    print(f"\nmedian µs of one call; spin {args.spin_ms:g} ms; {args.repeats} repeats\n")
    print("| call | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['call']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                         indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
