"""In-process training loop (no Ray): the same backend, group execution and GRPO update as the
distributed job, run one group at a time. Used by the bandit test (`run_bandit`) and for debugging."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
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


# ----------------------------------------------------------------------------------------------
# The synthetic bandit (issue 2, point 9): train the real controller with the real GRPO update on the
# synthetic backend's known tables, then score its greedy choices against the exact optimum.
# ----------------------------------------------------------------------------------------------
@dataclass
class BanditResult:
    """One seed of the bandit acceptance run (rewards are exact expectations, see `evaluate_bandit`)."""

    seed: int
    ratio: float                    # greedy policy's mean expected reward / the optimum's
    feasible_pick_rate: float       # share of grid points with a feasible option where the pick is feasible
    best_static_share: float        # best single static configuration's mean expected reward / the optimum's
    policy_reward: float
    optimal_reward: float
    best_static_reward: float
    train_s: float
    eval_s: float
    updates: int
    rollouts: int
    eval_points: int

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


def run_bandit(cfg, *, eval_budgets: int = 29,
               on_update: Optional[Callable[[int, dict], None]] = None) -> BanditResult:
    """Train on the configured synthetic backend for `cfg.system.total_updates` updates (seed
    `cfg.system.seed`) and evaluate the greedy controller on the held-out samples (`data.val_samples`
    of the val split) at `eval_budgets` evenly spaced budgets over [budget.min_ms, budget.max_ms].

    The timings cover training (`train_s`) and evaluation (`eval_s`), not building the tables.
    """
    import numpy as np

    from rollout_workers.backends import make_backend
    from rollout_workers.synthetic_backend import evaluate_bandit
    from shared.controller import TwoStageController
    from shared.datasets import load_samples

    if cfg.model.backend != "synthetic":
        raise ValueError(f"the bandit needs model.backend=synthetic, got {cfg.model.backend!r}")
    seed = int(cfg.system.seed)
    backend = make_backend(cfg, worker_id=0)
    train_samples = load_samples(cfg, "train")
    eval_samples = load_samples(cfg, "val")
    if not eval_samples:
        raise ValueError("the bandit evaluates on the val split: set data.val_samples > 0")
    torch.manual_seed(seed)                    # controller initialisation
    controller = TwoStageController.from_config(cfg, backend.space, token_rms=backend.info().token_rms)
    trainer = GRPOTrainer(controller, cfg.grpo, seed, total_updates=int(cfg.system.total_updates))
    budgets = [float(b) for b in np.linspace(cfg.budget.min_ms, cfg.budget.max_ms, eval_budgets)]
    t0 = time.perf_counter()
    train_local(cfg, backend, trainer, train_samples, updates=int(cfg.system.total_updates), seed=seed,
                on_update=on_update)
    t1 = time.perf_counter()
    report = evaluate_bandit(backend, controller, eval_samples, budgets, reward_fn_from_config(cfg.reward))
    t2 = time.perf_counter()
    return BanditResult(seed=seed, ratio=report.ratio, feasible_pick_rate=report.feasible_pick_rate,
                        best_static_share=report.best_static_reward / report.optimal_reward,
                        policy_reward=report.policy_reward, optimal_reward=report.optimal_reward,
                        best_static_reward=report.best_static_reward, train_s=t1 - t0, eval_s=t2 - t1,
                        updates=int(cfg.system.total_updates),
                        rollouts=int(cfg.system.total_updates) * cfg.grpo.groups_per_update * cfg.grpo.group_size,
                        eval_points=len(eval_samples) * len(budgets))
