"""The request path's helper thread (rollout_workers/helper_thread.py): values, errors, order, and a forked child."""
from __future__ import annotations

import multiprocessing
import threading

import pytest

from rollout_workers.helper_thread import run_in_helper


def test_value_error_and_order():
    assert run_in_helper(lambda: 41 + 1).result() == 42
    seen = []
    pendings = [run_in_helper(lambda i=i: seen.append(i) or i) for i in range(20)]
    assert [p.result() for p in pendings] == list(range(20)) and seen == list(range(20))
    assert all(p.exception() is None for p in pendings)

    def bad():
        raise ValueError("the window failed")

    pending = run_in_helper(bad)
    assert isinstance(pending.exception(), ValueError)
    with pytest.raises(ValueError, match="the window failed"):
        pending.result()
    with pytest.raises(ValueError):                  # repeatable: the outcome is kept
        pending.result()
    assert run_in_helper(lambda: "still serving").result() == "still serving"


def test_runs_on_another_thread():
    assert run_in_helper(threading.get_ident).result() != threading.get_ident()


def _child(conn) -> None:
    conn.send(run_in_helper(lambda: "from the child").result())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_starts_its_own_helper():
    run_in_helper(lambda: None).result()             # the parent's helper exists before the fork
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,))
    proc.start()
    try:
        assert parent.poll(30), "the child's job never ran"
        assert parent.recv() == "from the child"
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
