"""Segment timers for one request (DESIGN.md section 4).

`SegmentTimer.mark(name)` closes the segment that started at the previous mark. On a GPU each mark
records a CUDA event on the current stream; an event placed while the stream is idle completes as soon
as it is enqueued, so host-side work between marks (decoding, tokenising, the controller) is counted
too. The host synchronises only where control flow needs it: `elapsed_ms()` (the Stage2 decision reads
the spent fraction) and `finish()`. On CPU the host clock (`time.perf_counter`) is used and the worker
fixes torch's thread count so measurements under concurrency match calibration.
"""
from __future__ import annotations

import time
from typing import Optional

import torch


class SegmentTimer:
    """Marks segment boundaries; segments with the same name accumulate (e.g. two preprocess parts)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.names: list[str] = []
        self.marks: list = []
        self._host_start = time.perf_counter()
        self._first: Optional[object] = None
        self.charged_ms: dict[str, float] = {}
        self.deltas: list[tuple[str, float]] = []
        self.start()

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self._host_start = time.perf_counter()
        self._first = self._now()
        self.marks = [self._first]
        self.names = []
        self.charged_ms = {}
        self.deltas = []

    def mark(self, name: str) -> None:
        """Close the segment `name` (from the previous mark to now)."""
        self.marks.append(self._now())
        self.names.append(name)

    def charge(self, name: str, ms: float) -> None:
        """Add `ms` to segment `name` without timing it now: work measured on an earlier request and
        reused by this one (a GRPO group's shared preprocessing) still counts in this request's latency."""
        self.charged_ms[name] = self.charged_ms.get(name, 0.0) + float(ms)

    def _delta_ms(self, a, b) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3

    def elapsed_ms(self, spin: bool = False) -> float:
        """Time since start (synchronises the GPU: use only at decision points). With `spin` the host polls
        the event in a loop instead of blocking in the driver. Work queued before this call (e.g. a
        non-blocking copy to pinned memory) has completed when it returns."""
        now = self._now()
        if self.cuda:
            if spin:
                while not now.query():
                    pass
            else:
                now.synchronize()
        return self._delta_ms(self._first, now) + sum(self.charged_ms.values())

    def finish(self) -> dict[str, float]:
        """Per-segment milliseconds (synchronises once on GPU)."""
        if self.cuda:
            self.marks[-1].synchronize()
        self.deltas = [(name, self._delta_ms(a, b)) for name, a, b in zip(self.names, self.marks[:-1], self.marks[1:])]
        out: dict[str, float] = {}
        for name, ms in self.deltas:
            out[name] = out.get(name, 0.0) + ms
        for name, ms in self.charged_ms.items():
            out[name] = out.get(name, 0.0) + ms
        return out

    def total_ms(self) -> float:
        """First mark to last, plus the charged time."""
        return self._delta_ms(self.marks[0], self.marks[-1]) + sum(self.charged_ms.values())


def timer_overhead_us(device: torch.device | str = "cpu", marks: int = 1000) -> float:
    """Measured cost of one `mark` on this device (microseconds), for reporting the timers' own cost."""
    t = SegmentTimer(device)
    t0 = time.perf_counter()
    for i in range(marks):
        t.mark("x")
    if t.cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / marks * 1e6
