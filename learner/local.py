"""In-process training loop (no Ray): the same backend, group execution and GRPO update as the
distributed job, run one group at a time. Used by the bandit test and for debugging."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from learner.trainer import GRPOTrainer
from shared.backend import RolloutBackend, Sample, run_group
from shared.budgets import BudgetSampler
from shared.records import FIELD_NAMES
from shared.rewards import reward_fn_from_config


def train_local(cfg, backend: RolloutBackend, trainer: GRPOTrainer, samples: Sequence[Sample], *,
                updates: int, seed: int = 0,
                on_update: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Run `updates` GRPO updates of `cfg.grpo.groups_per_update` groups each; returns the stats per update.

    Rows are shallow field dicts of the records (what `RolloutRecord.to_row` gives, without its deep copy:
    each record's lists are fresh, so nothing is shared).
    """
    reward_fn = reward_fn_from_config(cfg.reward)
    budgets = BudgetSampler(cfg.budget, seed)
    gen = torch.Generator().manual_seed(seed)
    history = []
    cursor = 0
    for u in range(updates):
        rows = []
        for _ in range(cfg.grpo.groups_per_update):
            sample = samples[cursor % len(samples)]
            cursor += 1
            budget = budgets.draw()
            res = run_group(backend, sample, budget, trainer.controller, reward_fn, group_size=cfg.grpo.group_size,
                            group_id=f"{sample.sample_id}/{cursor}", policy_version=trainer.policy_version,
                            generator=gen)
            rows.extend({name: getattr(r, name) for name in FIELD_NAMES} for r in res.records)
        stats = trainer.update(rows)
        history.append(stats)
        if on_update is not None:
            on_update(u, stats)
    return history
