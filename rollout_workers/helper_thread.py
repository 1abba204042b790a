"""One helper thread per process for short jobs started by a request thread and collected a few ms later (the
Stage1 window under the image decode, rollout_workers/request_path.py).

Why not a `ThreadPoolExecutor`: its `submit` and `result` are Python-level work on the request thread, on the
critical path of the request, and such calls run several times slower inside a request than in a loop. Measured
on the 2-core CPU machine, after 10 ms of other work, around a PNG decode (`python bench/handoff_probe.py`):
`submit` ~120 µs and `result` ~19 µs, against ~40 and ~6 µs for a put and a get on `queue.SimpleQueue` (C).

    pending = run_in_helper(fn)      # returns at once; fn runs on the helper thread
    ...                              # the request thread's own work (e.g. a decode that releases the GIL)
    value = pending.result()         # fn's value, or its exception raised here
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Optional

_jobs: Optional[queue.SimpleQueue] = None
_start_lock = threading.Lock()


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        fn, reply = jobs.get()
        try:
            reply.put((True, fn()))
        except BaseException as exc:        # handed to the caller, raised by Pending.result()
            reply.put((False, exc))


def _forget_after_fork() -> None:
    """A forked child has the queue but not the thread: start afresh there."""
    global _jobs
    _jobs = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class Pending:
    """The outcome of one job: `result()` waits for it and returns its value or raises its exception;
    `exception()` waits and returns the exception (None if it succeeded). Either may be called repeatedly."""

    __slots__ = ("_reply", "_outcome")

    def __init__(self, reply: queue.SimpleQueue):
        self._reply = reply
        self._outcome: Optional[tuple[bool, Any]] = None

    def _wait(self) -> tuple[bool, Any]:
        if self._outcome is None:
            self._outcome = self._reply.get()
        return self._outcome

    def result(self) -> Any:
        ok, value = self._wait()
        if not ok:
            raise value
        return value

    def exception(self) -> Optional[BaseException]:
        ok, value = self._wait()
        return None if ok else value


def run_in_helper(fn: Callable[[], Any]) -> Pending:
    """Run `fn()` on the process's helper thread (started on first use; jobs run one at a time, in order)."""
    global _jobs
    jobs = _jobs
    if jobs is None:
        with _start_lock:
            if _jobs is None:
                new = queue.SimpleQueue()
                threading.Thread(target=_serve, args=(new,), name="request-helper", daemon=True).start()
                _jobs = new
            jobs = _jobs
    reply: queue.SimpleQueue = queue.SimpleQueue()
    jobs.put((fn, reply))
    return Pending(reply)
