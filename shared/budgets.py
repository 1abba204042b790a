"""Budget distributions for training (pure; numpy only)."""
from __future__ import annotations

import math

import numpy as np


class BudgetSampler:
    """Draws latency budgets (ms) from the configured distribution.

    Args:
        budget_cfg: the `budget` config section (min_ms, max_ms, distribution).
        seed: RNG seed (a worker passes its own, so workers draw different budgets).
    """

    def __init__(self, budget_cfg, seed: int = 0):
        self.min_ms = float(budget_cfg.min_ms)
        self.max_ms = float(budget_cfg.max_ms)
        self.distribution = budget_cfg.distribution
        self.rng = np.random.default_rng(seed)

    def draw(self) -> float:
        if self.distribution == "loguniform":
            return float(math.exp(self.rng.uniform(math.log(self.min_ms), math.log(self.max_ms))))
        return float(self.rng.uniform(self.min_ms, self.max_ms))

    def grid(self, n: int) -> list[float]:
        """n evenly spaced budgets across the range (evaluation)."""
        return [float(b) for b in np.linspace(self.min_ms, self.max_ms, n)]
