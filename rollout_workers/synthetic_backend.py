"""Synthetic rollout backend: a contextual bandit with known accuracy and latency tables.

It stands in for the frozen model so that the GRPO update and the whole distributed system can be
built and tested without it. Everything the controller sees is produced the way the real backend
would produce it, only from tables:

- Stage1 sees a fixed random "prompt embedding" per question type (plus a small per-sample jitter),
  the budget, and the vision tokens each tier would give (some samples are small images whose tiers
  collapse, so the masking path is exercised).
- Stage2 sees a "latency-token state": a FIXED random map of (question type, budget code, p) standing
  in for the frozen LLM's hidden state at the budget token. The budget and the question type reach
  Stage2 only through it (and through the recomputed budget embedding, as in the real system).
- Accuracy per (question type, effective tier, top_k, num_blocks) comes from a table built from four
  archetypes (global view suffices / small detail needs crops / counting needs depth / reasoning
  needs experts), so the best knobs differ by question type and by budget.
- Latency per knob setting is a sum of segments (preprocess, vision, prefix, rest of prefill, decode)
  with multiplicative Gaussian noise.

The answer text is "yes" with probability equal to the table accuracy, else "no"; the reference answer
is "yes" and the exact-match scorer scores it, so the real scoring path is used.

`SyntheticTables.expected_reward` and `optimal` give the exact optimum (Gauss-Hermite quadrature
over the latency noise), which the bandit test compares the trained controller against.

Pure module: numpy and torch only.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from shared.backend import BackendInfo, RolloutBackend, RolloutOutcome, Sample
from shared.controller import HeadDecision, Stage1Features, Stage2Features, TwoStageController, sinusoidal_code
from shared.knobs import KnobChoice, KnobSpace
from shared.rewards import RewardInputs, default_reward

# Archetype floors: accuracy factor at the cheapest level of (tier, top_k, num_blocks), and peak accuracy.
_ARCHETYPES = {
    "global_colour": ((0.92, 0.92, 0.92), 0.95),
    "small_detail": ((0.15, 0.85, 0.85), 0.90),
    "counting": ((0.80, 0.85, 0.15), 0.85),
    "reasoning": ((0.80, 0.15, 0.85), 0.85),
}
_ANSWER_TOKENS = {"global_colour": 2, "small_detail": 3, "counting": 2, "reasoning": 8}
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(16)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def _levels(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n) if n > 1 else np.ones(1)


@dataclass
class SyntheticTables:
    """Known accuracy and latency tables over the knob space, per question type."""

    space: KnobSpace
    num_question_types: int = 4
    latency_noise: float = 0.02
    seed: int = 0
    d_model: int = 64
    small_image_fraction: float = 0.15

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        names = list(_ARCHETYPES)
        self.qtypes = [names[i] if i < len(names) else f"mixed_{i}" for i in range(self.num_question_types)]
        floors, peaks, answer_tokens = [], [], []
        for i, name in enumerate(self.qtypes):
            if name in _ARCHETYPES:
                f, peak = _ARCHETYPES[name]
            else:  # extra types: random mixes of sensitivities
                f, peak = tuple(rng.uniform(0.15, 0.9, size=3)), float(rng.uniform(0.8, 0.95))
            floors.append(f)
            peaks.append(peak)
            answer_tokens.append(_ANSWER_TOKENS.get(name, int(rng.integers(2, 8))))
        self.floors = np.asarray(floors)                      # [Q, 3]
        self.peaks = np.asarray(peaks)                        # [Q]
        self.answer_tokens = np.asarray(answer_tokens)        # [Q]
        s = self.space
        self.tier_level = _levels(s.num_tiers)
        self.top_k_level = _levels(len(s.top_ks))
        self.nb_level = _levels(len(s.num_blocks))
        # Vision tokens per tier follow Molmo's formula for a 4:3 image with tilings 1x2, 2x3, 3x4...
        self.full_tokens = [self._tokens(c) for c in s.tier_max_crops]
        # Fixed random maps standing in for the frozen LLM (seeded; never trained).
        self.prompt_embed = rng.standard_normal((self.num_question_types, self.d_model)).astype(np.float32)
        in_dim = self.num_question_types + 32 + len(s.positions)
        self.state_map = (rng.standard_normal((in_dim, self.d_model)) / math.sqrt(in_dim)).astype(np.float32)
        self._option_cache: dict = {}

    @staticmethod
    def _tokens(max_crops: int) -> int:
        # Largest r x c <= max_crops with c = r or r + 1 (landscape); tokens = 160 + (8r+4)(8c+5).
        best = (1, 1)
        for r in range(1, max_crops + 1):
            for c in (r + 1, r):
                if r * c <= max_crops and r * c > best[0] * best[1]:
                    best = (r, c)
        r, c = best
        return 160 + (8 * r + 4) * (8 * c + 5)

    # ------------------------------------------------------------------------------------------
    def tier_tokens(self, small_image: bool) -> list[int]:
        """Vision tokens each tier gives. A small image tiles no further than the second tier, so the
        tiers above it collapse onto it (as a 640x480 image gives 2x3 crops at max_crops 6 and 12)."""
        if not small_image or len(self.full_tokens) < 3:
            return list(self.full_tokens)
        return [min(t, self.full_tokens[1]) for t in self.full_tokens]

    def effective_tier(self, tier_idx: int, tokens: list[int]) -> int:
        """Index of the full-size tier whose token count this choice actually produces."""
        return self.full_tokens.index(tokens[tier_idx]) if tokens[tier_idx] in self.full_tokens else tier_idx

    def accuracy(self, q: int, eff_tier: int, k_idx: int, nb_idx: int) -> float:
        lv = (self.tier_level[eff_tier], self.top_k_level[k_idx], self.nb_level[nb_idx])
        acc = self.peaks[q]
        for j in range(3):
            acc *= self.floors[q, j] + (1.0 - self.floors[q, j]) * lv[j] ** 1.5
        return float(acc)

    def segments_ms(self, q: int, eff_tier: int, p: int, k_idx: int, nb_idx: int) -> dict[str, float]:
        """Noise-free latency segments (ms) of one request."""
        s = self.space
        tokens = self.full_tokens[eff_tier]
        crops = 1 + s.tier_max_crops[eff_tier]
        moe = lambda k: 0.55 + 0.45 * k / s.native_top_k   # noqa: E731 - expert cost per block
        block_prefill = 9.0 * tokens / 1200.0
        nb = s.num_blocks[nb_idx]
        k = s.top_ks[k_idx]
        return {
            "preprocess_ms": 6.0 + 0.8 * crops,
            "stage1_ms": 0.1,
            "vision_ms": 6.5 * crops,
            "prefix_ms": p * block_prefill * moe(s.native_top_k),
            "stage2_ms": 0.1,
            "prefill_rest_ms": (nb - p) * block_prefill * moe(k),
            "decode_ms": self.answer_tokens[q] * (2.0 + nb * 0.9 * moe(k)),
            "postprocess_ms": 0.2,
        }

    def mean_latency_ms(self, q: int, eff_tier: int, p: int, k_idx: int, nb_idx: int) -> float:
        return float(sum(self.segments_ms(q, eff_tier, p, k_idx, nb_idx).values()))

    def latency_state(self, q: int, budget_norm: float, p_idx: int) -> np.ndarray:
        x = np.zeros(self.state_map.shape[0], dtype=np.float32)
        x[q] = 1.0
        x[self.num_question_types:self.num_question_types + 32] = \
            sinusoidal_code(torch.tensor([budget_norm]), 32, max_freq=16.0)[0].numpy()
        x[self.num_question_types + 32 + p_idx] = 1.0
        return np.tanh(x @ self.state_map) * 3.0

    # ------------------------------------------------------------------------------------------
    def expected_reward(self, q: int, tokens: list[int], budget_ms: float, idx: tuple[int, int, int, int],
                        reward_fn: Callable[[RewardInputs], float]) -> float:
        """E[reward] of option indices (tier, p, top_k, nb) over the latency noise (exact quadrature)."""
        t, p_idx, k_idx, nb_idx = idx
        eff = self.effective_tier(t, tokens)
        p = self.space.positions[p_idx]
        mean = self.mean_latency_ms(q, eff, p, k_idx, nb_idx)
        acc = self.accuracy(q, eff, k_idx, nb_idx)
        total = 0.0
        for z, w in zip(_GH_NODES, _GH_WEIGHTS):
            lat = max(mean * (1.0 + self.latency_noise * z), 1e-3)
            total += w * reward_fn(self._reward_inputs(acc, lat, budget_ms, eff, k_idx, nb_idx))
        return float(total)

    def _reward_inputs(self, acc, lat, budget_ms, eff, k_idx, nb_idx) -> RewardInputs:
        s = self.space
        return RewardInputs(accuracy=acc, latency_ms=lat, budget_ms=budget_ms,
                            num_crops=1 + s.tier_max_crops[eff], max_crops=1 + max(s.tier_max_crops),
                            top_k=s.top_ks[k_idx], max_top_k=max(s.top_ks), num_blocks=s.num_blocks[nb_idx],
                            max_blocks=s.num_layers)

    def feasible_options(self, tokens: list[int]) -> list[tuple[int, int, int, int]]:
        s = self.space
        mask = s.tier_mask(tokens)
        return [(t, pi, ki, ni) for t in range(s.num_tiers) if mask[t] for pi, p in enumerate(s.positions)
                for ki in range(len(s.top_ks)) for ni, ok in enumerate(s.num_blocks_feasible(p)) if ok]

    def option_table(self, q: int, tokens: list[int],
                     options: Sequence[tuple[int, int, int, int]]) -> dict[str, np.ndarray]:
        """Per-option arrays [O] for question type q: noise-free mean latency, accuracy, and the knob
        values the reward sees (crops, top_k, num_blocks). Cached per (q, tokens, options)."""
        key = (q, tuple(tokens), tuple(options))
        cache = self._option_cache
        hit = cache.get(key)
        if hit is None:
            s = self.space
            mean, acc, crops, top_k, nb = [], [], [], [], []
            for t, p_idx, k_idx, nb_idx in options:
                eff = self.effective_tier(t, tokens)
                mean.append(self.mean_latency_ms(q, eff, s.positions[p_idx], k_idx, nb_idx))
                acc.append(self.accuracy(q, eff, k_idx, nb_idx))
                crops.append(1 + s.tier_max_crops[eff])
                top_k.append(s.top_ks[k_idx])
                nb.append(s.num_blocks[nb_idx])
            hit = {"mean_ms": np.asarray(mean, dtype=np.float64), "accuracy": np.asarray(acc, dtype=np.float64),
                   "num_crops": np.asarray(crops), "top_k": np.asarray(top_k), "num_blocks": np.asarray(nb)}
            if len(cache) >= 1024:
                cache.clear()
            cache[key] = hit
        return hit

    def expected_rewards(self, q: int, tokens: list[int], budget_ms: float,
                         options: Sequence[tuple[int, int, int, int]],
                         reward_fn: Callable[[RewardInputs], float]) -> np.ndarray:
        """E[reward] [O] of many options at once (same quadrature as `expected_reward`).

        The default reward formula is evaluated vectorised (tested equal to
        `shared.rewards.default_reward`); any other reward function falls back to the scalar path.
        """
        params = default_reward_params(reward_fn)
        if params is None:
            return np.array([self.expected_reward(q, tokens, budget_ms, o, reward_fn) for o in options])
        tab = self.option_table(q, tokens, options)
        lat = np.maximum(tab["mean_ms"][:, None] * (1.0 + self.latency_noise * _GH_NODES[None, :]), 1e-3)
        r = default_reward_np(tab["accuracy"][:, None], lat, float(budget_ms), **params)
        return (r * _GH_WEIGHTS[None, :]).sum(axis=1)   # no BLAS call: its threads fight torch's

    def optimal(self, q: int, tokens: list[int], budget_ms: float,
                reward_fn: Callable[[RewardInputs], float]) -> tuple[tuple[int, int, int, int], float]:
        """The option indices with the highest expected reward (the first on ties), and that reward."""
        options = self.feasible_options(tokens)
        best = options[int(np.argmax(self.expected_rewards(q, tokens, budget_ms, options, reward_fn)))]
        return best, self.expected_reward(q, tokens, budget_ms, best, reward_fn)

    def within_budget(self, q: int, tokens: list[int], budget_ms: float, idx: tuple[int, int, int, int]) -> bool:
        t, p_idx, k_idx, nb_idx = idx
        return self.mean_latency_ms(q, self.effective_tier(t, tokens), self.space.positions[p_idx], k_idx,
                                    nb_idx) <= budget_ms


def default_reward_params(reward_fn: Callable) -> Optional[dict[str, float]]:
    """The keyword parameters of `reward_fn` if it is `shared.rewards.default_reward` (possibly a
    functools.partial of it, as `make_reward_fn` builds), with the formula's defaults filled in; else None."""
    func, bound = reward_fn, {}
    if isinstance(reward_fn, functools.partial):
        if reward_fn.args:
            return None
        func, bound = reward_fn.func, dict(reward_fn.keywords)
    if func is not default_reward:
        return None
    sig = inspect.signature(default_reward)
    params = {n: p.default for n, p in sig.parameters.items() if n != "x"}
    if set(bound) - set(params):
        return None
    params.update(bound)
    return {k: float(v) for k, v in params.items()}


def default_reward_np(accuracy: np.ndarray, latency_ms: np.ndarray, budget_ms: float, overrun_weight: float = 2.0,
                      overrun_power: float = 1.0, violation_penalty: float = 0.5) -> np.ndarray:
    """`shared.rewards.default_reward` on arrays (broadcasting): the same formula, operation for operation."""
    latency_ms = np.asarray(latency_ms, dtype=np.float64)
    accuracy = np.broadcast_to(np.asarray(accuracy, dtype=np.float64), np.broadcast_shapes(
        np.shape(accuracy), latency_ms.shape))
    over = latency_ms > budget_ms
    rel = np.where(over, (latency_ms - budget_ms) / budget_ms, 0.0)
    penalty = violation_penalty + overrun_weight * rel ** overrun_power
    return np.where(over, accuracy - penalty, accuracy)


def synthetic_samples(tables: SyntheticTables, num_samples: int, seed: int = 0, prefix: str = "syn") -> list[Sample]:
    """A deterministic synthetic data set: question types round-robin, some small images."""
    rng = np.random.default_rng(seed + 7919)
    out = []
    for i in range(num_samples):
        q = i % tables.num_question_types
        small = bool(rng.random() < tables.small_image_fraction)
        out.append(Sample(sample_id=f"{prefix}-{i:06d}", question=f"{tables.qtypes[q]} question {i}",
                          answers=["yes"], metric="exact", question_type=tables.qtypes[q], source="synthetic",
                          max_new_tokens=int(tables.answer_tokens[q]),
                          meta={"q": q, "small_image": small, "jitter_seed": int(rng.integers(1 << 31))}))
    return out


_CACHE_MAX = 4096


def _bounded_put(cache: dict, key, value) -> None:
    """Insert into a memo dict, emptying it first when full (entries are cheap to recompute)."""
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value


class SyntheticBackend(RolloutBackend):
    """RolloutBackend over `SyntheticTables` (no model; timings are simulated, not measured)."""

    def __init__(self, tables: SyntheticTables, *, seed: int = 0, importance_sha256: str = ""):
        self.tables = tables
        self.space = tables.space
        self.rng = np.random.default_rng(seed)
        self._importance_sha = importance_sha256 or hashlib.sha256(b"synthetic").hexdigest()
        self._s1_cache: dict = {}
        self._state_cache: dict = {}

    def info(self) -> BackendInfo:
        return BackendInfo(backend="synthetic", model_id=f"synthetic-bandit-q{self.tables.num_question_types}"
                           f"-seed{self.tables.seed}", engine="tables", device="simulated",
                           d_model=self.tables.d_model, token_rms=1.0, importance_sha256=self._importance_sha)

    def stage1_features(self, sample: Sample, budget_ms: float) -> Stage1Features:
        tb = self.tables
        key = (sample.meta["q"], sample.meta["jitter_seed"], sample.meta["small_image"])
        hit = self._s1_cache.get(key)
        if hit is None:   # deterministic per sample: computed once (a group's G rollouts share it)
            q = sample.meta["q"]
            jitter = np.random.default_rng(sample.meta["jitter_seed"]).standard_normal(tb.d_model).astype(np.float32)
            tokens = tb.tier_tokens(sample.meta["small_image"])
            hit = (tb.prompt_embed[q] + 0.1 * jitter, tokens, self.space.tier_mask(tokens))
            _bounded_put(self._s1_cache, key, hit)
        lang_feat, tokens, mask = hit
        return Stage1Features(lang_feat=lang_feat.copy(), budget_ms=float(budget_ms), tier_tokens=list(tokens),
                              tier_mask=list(mask), p_mask=[True] * len(self.space.positions))

    def _latency_state(self, q: int, budget_ms: float, p_idx: int, controller: TwoStageController) -> np.ndarray:
        """The fixed map's state for (question type, budget, p), cached (a group shares type and budget)."""
        key = (q, float(budget_ms), p_idx, controller.norm_min_ms, controller.norm_max_ms)
        hit = self._state_cache.get(key)
        if hit is None:
            with torch.inference_mode():
                norm = float(controller.normalise_budget(torch.tensor([budget_ms]))[0])
            hit = self.tables.latency_state(q, norm, p_idx)
            _bounded_put(self._state_cache, key, hit)
        return hit.copy()

    def run(self, sample: Sample, budget_ms: float, controller: TwoStageController, *, greedy: bool = False,
            generator: Optional[torch.Generator] = None, fixed: Optional[KnobChoice] = None) -> RolloutOutcome:
        tb, s = self.tables, self.space
        t_start = time.time()
        q = sample.meta["q"]
        f1 = self.stage1_features(sample, budget_ms)
        if fixed is None:
            d_tier, d_p = controller.act_stage1(f1, greedy=greedy, generator=generator)
        else:
            ti, pi, _, _ = s.index_of(fixed)
            d_tier, d_p = HeadDecision(ti, 0.0), HeadDecision(pi, 0.0)
        p = s.positions[d_p.index]
        eff = tb.effective_tier(d_tier.index, f1.tier_tokens)
        noise = 1.0 + tb.latency_noise * float(self.rng.standard_normal())
        # Segments up to the Stage2 decision (k, nb don't matter yet: use index 0 for the prefix cost).
        seg = tb.segments_ms(q, eff, p, 0, len(s.num_blocks) - 1)
        spent = (seg["preprocess_ms"] + seg["stage1_ms"] + seg["vision_ms"] + seg["prefix_ms"]) * noise
        f2 = Stage2Features(latency_state=self._latency_state(q, budget_ms, d_p.index, controller),
            p_idx=d_p.index, vision_tokens=f1.tier_tokens[d_tier.index],
            spent_frac=spent / budget_ms, nb_mask=s.num_blocks_feasible(p))
        if fixed is None:
            d_k, d_nb = controller.act_stage2(budget_ms, f2, greedy=greedy, generator=generator)
        else:
            _, _, ki, ni = s.index_of(fixed)
            d_k, d_nb = HeadDecision(ki, 0.0), HeadDecision(ni, 0.0)
        seg = {k: v * noise for k, v in tb.segments_ms(q, eff, p, d_k.index, d_nb.index).items()}
        acc = tb.accuracy(q, eff, d_k.index, d_nb.index)
        answer = "yes" if self.rng.random() < acc else "no"
        n_ans = int(tb.answer_tokens[q])
        return RolloutOutcome(stage1=f1, stage2=f2, tier=d_tier, p=d_p, top_k=d_k, num_blocks=d_nb,
                              knobs=s.choice(d_tier.index, d_p.index, d_k.index, d_nb.index),
                              num_crops=1 + s.tier_max_crops[eff], vision_tokens=f1.tier_tokens[d_tier.index],
                              prompt_tokens=f1.tier_tokens[d_tier.index] + 12, answer_tokens=n_ans,
                              segments_ms=seg, latency_ms=float(sum(seg.values())), answer=answer,
                              t_start=t_start, t_end=time.time())


@dataclass
class BanditReport:
    """Greedy controller vs the exact optimum on an evaluation grid."""

    policy_reward: float          # mean expected reward of the greedy choices
    optimal_reward: float         # mean expected reward of the per-point optimum
    best_static_reward: float     # mean expected reward of the best single static configuration
    feasible_pick_rate: float     # share of points with a feasible option where the pick is feasible

    @property
    def ratio(self) -> float:
        return self.policy_reward / self.optimal_reward


def evaluate_bandit(backend: SyntheticBackend, controller: TwoStageController, samples: list[Sample],
                    budgets: list[float], reward_fn: Callable[[RewardInputs], float]) -> BanditReport:
    """Expected reward of the greedy controller on every (sample, budget) point, against the optimum.

    The noise of the run (latency, answers) does not enter: choices are scored by exact expectations.
    """
    tb = backend.tables
    policy, optimal, picks_ok, picks_n = [], [], 0, 0
    static_options = tb.feasible_options(tb.full_tokens)
    static_sum = np.zeros(len(static_options))
    cache: dict = {}
    for sample in samples:
        q = sample.meta["q"]
        tokens = tb.tier_tokens(sample.meta["small_image"])
        for b in budgets:
            out = backend.run(sample, b, controller, greedy=True)
            idx = (out.tier.index, out.p.index, out.top_k.index, out.num_blocks.index)
            policy.append(tb.expected_reward(q, tokens, b, idx, reward_fn))
            key = (q, tuple(tokens), b)
            if key not in cache:
                opts = tb.feasible_options(tokens)
                statics = [_collapse(o, tokens, backend.space) for o in static_options]
                cache[key] = (tb.optimal(q, tokens, b, reward_fn)[1],
                              bool((tb.option_table(q, tokens, opts)["mean_ms"] <= b).any()),
                              tb.expected_rewards(q, tokens, b, statics, reward_fn))
            opt, any_feasible, static = cache[key]
            optimal.append(opt)
            static_sum += static
            if any_feasible:
                picks_n += 1
                picks_ok += tb.within_budget(q, tokens, b, idx)
    n = len(policy)
    return BanditReport(float(np.mean(policy)), float(np.mean(optimal)), float(static_sum.max() / n),
                        picks_ok / max(picks_n, 1))


def _collapse(option: tuple[int, int, int, int], tokens: list[int], space: KnobSpace) -> tuple[int, int, int, int]:
    """A static tier that is masked for this image runs as the cheapest tier with the same tokens."""
    t = option[0]
    return (tokens.index(tokens[t]),) + option[1:]
