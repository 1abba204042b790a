"""SampleDispenser: no skip and no repeat across release/commit, worker restarts, epochs and resumes."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from learner.dispenser import SampleDispenser

IDS = [f"s{i:03d}" for i in range(20)]


def drain_epoch(d: SampleDispenser, workers=(0,)) -> list[str]:
    """Lease and commit round-robin until the current epoch is complete; returns the commit order."""
    epoch = d.epoch
    out = []
    w = 0
    while True:
        sid = d.lease(workers[w % len(workers)])
        if d.epoch != epoch:               # the lease opened the next epoch: give it back
            d.release(sid)
            break
        assert sid is not None
        d.commit(sid)
        out.append(sid)
        w += 1
    return out


def test_epoch_is_a_permutation_and_reshuffles():
    d = SampleDispenser(IDS, seed=3)
    e0 = drain_epoch(d)
    assert sorted(e0) == sorted(IDS) and len(e0) == len(IDS)
    assert d.committed_total == len(IDS)
    e1 = drain_epoch(d)
    assert d.epoch == 2                              # the last lease opened epoch 2
    assert sorted(e1) == sorted(IDS)
    assert e0 != e1                                  # reshuffled with seed + epoch
    # Deterministic: the same seed gives the same order.
    assert drain_epoch(SampleDispenser(IDS, seed=3)) == e0


def test_no_shuffle_keeps_order():
    d = SampleDispenser(IDS, shuffle=False)
    assert drain_epoch(d) == IDS


def test_release_is_handed_out_again_before_new_ids():
    d = SampleDispenser(IDS, shuffle=False)
    a, b = d.lease(0), d.lease(1)
    d.release(a)
    assert d.lease(1) == a                            # released first
    assert d.lease(0) == IDS[2]
    d.commit(a)
    d.commit(b)
    # Releasing an id that is not leased is a no-op (a late duplicate drop cannot re-queue it).
    d.release(a)
    assert a not in d.released


def test_double_commit_and_unknown_commit_raise():
    d = SampleDispenser(IDS)
    sid = d.lease(0)
    d.commit(sid)
    with pytest.raises(KeyError):
        d.commit(sid)
    with pytest.raises(KeyError):
        d.commit("nope")


def test_epoch_waits_for_outstanding_leases():
    d = SampleDispenser(IDS[:3], shuffle=False)
    ids = [d.lease(0) for _ in range(3)]
    assert d.lease(1) is None                          # all leased, none committed: wait
    d.commit(ids[0])
    d.commit(ids[1])
    assert d.lease(1) is None                          # one still out: the epoch is not over
    d.release(ids[2])
    assert d.lease(1) == ids[2]                        # the dropped one comes back
    d.commit(ids[2])
    assert d.lease(0) is not None and d.epoch == 1     # now the next epoch opens


def test_release_worker_returns_only_its_leases():
    d = SampleDispenser(IDS, shuffle=False)
    got = {w: [d.lease(w) for _ in range(3)] for w in (0, 1, 2)}
    released = d.release_worker(1)
    assert sorted(released) == sorted(got[1])
    assert set(d.leases) == set(got[0]) | set(got[2])
    # They are handed out next, to anyone.
    assert [d.lease(0) for _ in range(3)] == got[1]


def test_random_protocol_commits_every_sample_exactly_once_per_epoch():
    """Random interleaving of lease / commit / release / release_worker over 3 epochs."""
    import random
    rng = random.Random(0)
    d = SampleDispenser(IDS, seed=1)
    per_epoch: dict[int, Counter] = {}
    held: dict[int, list[str]] = {0: [], 1: [], 2: []}
    while d.epoch < 3:
        w = rng.randrange(3)
        op = rng.random()
        if op < 0.5:
            sid = d.lease(w)
            if sid is not None:
                assert not any(sid in h for h in held.values()), "an id leased twice at once"
                held[w].append(sid)
        elif op < 0.85 and held[w]:
            sid = held[w].pop(rng.randrange(len(held[w])))
            per_epoch.setdefault(d.epoch, Counter())[sid] += 1
            d.commit(sid)
        elif op < 0.95 and held[w]:
            d.release(held[w].pop(0))
        elif held[w]:
            assert sorted(d.release_worker(w)) == sorted(held[w])
            held[w] = []
    for e in (0, 1, 2):
        assert sorted(per_epoch[e]) == sorted(IDS), f"epoch {e} skipped samples"
        assert set(per_epoch[e].values()) == {1}, f"epoch {e} repeated samples"


def test_state_dict_round_trip_re_dispenses_leases():
    d = SampleDispenser(IDS, seed=5)
    committed = []
    for _ in range(6):
        sid = d.lease(0)
        d.commit(sid)
        committed.append(sid)
    out0 = [d.lease(0), d.lease(0)]
    out1 = [d.lease(1)]
    d.release(out0[0])                                  # one dropped (queued), two still leased
    state = json.loads(json.dumps(d.state_dict()))      # what a checkpoint stores (JSON)
    assert set(state["released"]) == {out0[0], out0[1], out1[0]}

    r = SampleDispenser(IDS, seed=5)
    r.load_state_dict(state)
    assert r.epoch == d.epoch and r.cursor == d.cursor and r.committed == d.committed
    assert r.committed_total == 6 and r.leases == {}
    # The uncommitted leases come back first, then the epoch continues where it stopped.
    first = [r.lease(7) for _ in range(3)]
    assert sorted(first) == sorted(out0 + out1)
    for sid in first:
        r.commit(sid)
    rest = drain_epoch(r, workers=(7, 8))
    assert sorted(committed + first + rest) == sorted(IDS)   # no skip, no repeat


@pytest.mark.parametrize("before,after", [(2, 3), (3, 1), (1, 4)])
def test_resume_with_a_different_worker_count(before, after):
    """Stop mid-epoch with `before` workers holding leases; resume with `after` workers."""
    d = SampleDispenser(IDS, seed=11)
    done: list[str] = []
    for i in range(7):
        sid = d.lease(i % before)
        d.commit(sid)
        done.append(sid)
    for w in range(before):                              # each worker holds one unfinished lease
        d.lease(w)
    state = d.state_dict()
    r = SampleDispenser(IDS, seed=11)
    r.load_state_dict(state)
    w = 0
    while r.epoch == 0:
        sid = r.lease(w % after)
        if r.epoch != 0:
            break
        r.commit(sid)
        done.append(sid)
        w += 1
    assert sorted(done) == sorted(IDS)                   # no skip, no repeat


def test_load_refuses_another_data_set():
    d = SampleDispenser(IDS)
    with pytest.raises(ValueError, match="same data"):
        SampleDispenser(IDS[:-1]).load_state_dict(d.state_dict())


def test_bad_construction():
    with pytest.raises(ValueError):
        SampleDispenser([])
    with pytest.raises(ValueError):
        SampleDispenser(["a", "a"])
