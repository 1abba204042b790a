"""The central sample dispenser (DESIGN.md section 6): hands out sample ids, keyed by id, so that a
restarted worker or a resume with another worker count neither skips nor repeats data.

Protocol:
- `lease(worker_id)` gives the next sample id: first any released id (from a dropped group or a dead
  worker), then the next id of the epoch's shuffled order.
- `commit(sample_id)` when the learner accepts the sample's group; `release(sample_id)` when the group
  is dropped (the id is handed out again); `release_worker(worker_id)` when a worker died.
- `state_dict()` is saved in each checkpoint. On resume, leases that were not committed are handed out
  again (nothing in flight survives a restart), so every sample of an epoch is committed exactly once.

An epoch ends when every id of it is committed; the next epoch reshuffles with `seed + epoch`.
Pure module.
"""
from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import numpy as np


class SampleDispenser:
    def __init__(self, sample_ids: Sequence[str], seed: int = 0, shuffle: bool = True):
        if not sample_ids:
            raise ValueError("the dispenser needs at least one sample id")
        if len(set(sample_ids)) != len(sample_ids):
            raise ValueError("sample ids must be unique")
        self.sample_ids = list(sample_ids)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0
        self.order = self._order(0)
        self.leases: dict[str, int] = {}          # sample id -> worker id
        self.released: deque[str] = deque()
        self.committed: set[str] = set()           # committed ids of the current epoch
        self.committed_total = 0

    def _order(self, epoch: int) -> list[str]:
        if not self.shuffle:
            return list(self.sample_ids)
        perm = np.random.default_rng(self.seed + epoch).permutation(len(self.sample_ids))
        return [self.sample_ids[i] for i in perm]

    # ------------------------------------------------------------------------------------------
    def lease(self, worker_id: int) -> Optional[str]:
        """Next sample id for `worker_id`, or None when the epoch's remaining ids are all leased."""
        if self.released:
            sid = self.released.popleft()
        elif self.cursor < len(self.order):
            sid = self.order[self.cursor]
            self.cursor += 1
        elif not self.leases:       # epoch fully committed: start the next one
            self._next_epoch()
            return self.lease(worker_id)
        else:
            return None
        self.leases[sid] = worker_id
        return sid

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.cursor = 0
        self.order = self._order(self.epoch)
        self.committed = set()

    def commit(self, sample_id: str) -> None:
        if sample_id not in self.leases:
            raise KeyError(f"sample {sample_id} is not leased (double commit or unknown id)")
        del self.leases[sample_id]
        self.committed.add(sample_id)
        self.committed_total += 1

    def release(self, sample_id: str) -> None:
        """Hand a leased id out again (its group was dropped)."""
        if self.leases.pop(sample_id, None) is not None:
            self.released.append(sample_id)

    def release_worker(self, worker_id: int) -> list[str]:
        """Release every lease of a worker (it died or restarted); returns the released ids."""
        ids = [sid for sid, w in self.leases.items() if w == worker_id]
        for sid in ids:
            self.release(sid)
        return ids

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-ready state. Leased-but-uncommitted ids are stored as released: they are handed out again."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "released": list(self.released) + sorted(self.leases),
                "committed": sorted(self.committed), "committed_total": self.committed_total,
                "num_samples": len(self.sample_ids)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.sample_ids):
            raise ValueError(f"dispenser state is for {state['num_samples']} samples, the data set has "
                             f"{len(self.sample_ids)}: resume with the same data")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.order = self._order(self.epoch)
        self.cursor = state["cursor"]
        self.released = deque(state["released"])
        self.leases = {}
        self.committed = set(state["committed"])
        self.committed_total = state["committed_total"]
