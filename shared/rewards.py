"""Rollout rewards: accuracy traded off against the latency budget (DESIGN.md section 5).

Two formulas, chosen by ``cfg.reward.kind``:

- ``"default"`` (`default_reward`): accuracy minus a penalty that is zero within the budget and,
  once the budget is exceeded, a flat step plus a term growing with the relative overrun.
- ``"seed"`` (`seed_reward`): the seed repository's ``RewardFunction`` as a preset, with two
  deliberate deviations listed in its docstring.

Failed rollouts have no reward. A rollout that crashed, timed out or produced no measurable
latency is not a data point: the caller drops it, counts it and logs it. Nothing in this module
turns a failure into a reward of 0 (which would read as "a wrong answer within budget" and bias the
group's advantages); invalid inputs such as a NaN latency raise ValueError instead of scoring.

Usage::

    reward_fn = reward_fn_from_config(cfg.reward)
    r = reward_fn(RewardInputs(accuracy=1.0, latency_ms=231.0, budget_ms=250.0, num_crops=6,
                               max_crops=12, top_k=6, max_top_k=8, num_blocks=14, max_blocks=16))

Pure module: stdlib only.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "REWARD_KINDS",
    "RewardInputs",
    "default_reward",
    "make_reward_fn",
    "reward_fn_from_config",
    "seed_reward",
]

RewardFn = Callable[["RewardInputs"], float]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardInputs:
    """What a reward formula may look at, for one successful rollout.

    Construction validates every field (see `validate`).

    Attributes:
        accuracy: task score in [0, 1] from `shared.scorers`.
        latency_ms: measured end-to-end latency of the rollout (ms), finite and >= 0.
        budget_ms: the latency budget the controller was given (ms), finite and > 0.
        num_crops: image crops actually used (the tier's crop count), in [0, max_crops].
        max_crops: largest crop count of any tier (> 0).
        top_k: experts per token chosen for the adjustable blocks, in [0, max_top_k].
        max_top_k: largest top_k option (> 0).
        num_blocks: transformer blocks executed (prefix included), in [0, max_blocks].
        max_blocks: blocks of the full model (> 0).
    """

    accuracy: float
    latency_ms: float
    budget_ms: float
    num_crops: int
    max_crops: int
    top_k: int
    max_top_k: int
    num_blocks: int
    max_blocks: int

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the first offending field: a non-finite or negative latency, a
                non-finite or non-positive budget, an accuracy outside [0, 1] (or NaN), a knob
                maximum <= 0, or a knob value outside [0, its maximum].
        """
        _check_real("accuracy", self.accuracy)
        if not 0.0 <= self.accuracy <= 1.0:
            raise ValueError(f"accuracy must lie in [0, 1], got {self.accuracy!r}")
        _check_real("latency_ms", self.latency_ms)
        if not math.isfinite(self.latency_ms) or self.latency_ms < 0.0:
            raise ValueError(f"latency_ms must be finite and >= 0, got {self.latency_ms!r}")
        _check_real("budget_ms", self.budget_ms)
        if not math.isfinite(self.budget_ms) or self.budget_ms <= 0.0:
            raise ValueError(f"budget_ms must be finite and > 0, got {self.budget_ms!r}")
        for value_name, max_name in (("num_crops", "max_crops"), ("top_k", "max_top_k"),
                                     ("num_blocks", "max_blocks")):
            value, maximum = getattr(self, value_name), getattr(self, max_name)
            _check_int(max_name, maximum)
            _check_int(value_name, value)
            if maximum <= 0:
                raise ValueError(f"{max_name} must be > 0, got {maximum!r}")
            if not 0 <= value <= maximum:
                raise ValueError(f"{value_name} must lie in [0, {max_name}={maximum}], got {value!r}")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")


# ----------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------
def default_reward(x: RewardInputs, overrun_weight: float = 2.0, overrun_power: float = 1.0,
                   violation_penalty: float = 0.5) -> float:
    """Accuracy minus a budget-overrun penalty (the product's default).

    With L = latency, B = budget and overrun = L - B::

        r = accuracy                                                          if L <= B
        r = accuracy - violation_penalty - overrun_weight * (overrun / B) ** overrun_power   if L > B

    Within budget the reward is the accuracy alone: the controller is not paid for finishing
    early, only for answering well within the budget. Over budget the penalty has two parts:

    - a flat step ``violation_penalty`` at the boundary, so "just over" is strictly worse than
      "just under" even when the relative overrun is tiny (with accuracy in [0, 1] and the
      default 0.5, a violation costs as much as half a correct answer);
    - a term growing with the *relative* overrun (scale-free across budgets), linear by default.

    The reward lies in (-inf, 1]; it is strictly decreasing in the overrun for
    ``overrun_weight > 0``.

    Args:
        x: validated rollout inputs (the knob fields are unused here).
        overrun_weight: penalty per unit of relative overrun (>= 0).
        overrun_power: exponent of the relative overrun (> 0).
        violation_penalty: flat penalty once the budget is exceeded (>= 0).

    Returns:
        The reward.
    """
    x.validate()
    if x.latency_ms <= x.budget_ms:
        return float(x.accuracy)
    relative_overrun = (x.latency_ms - x.budget_ms) / x.budget_ms
    penalty = violation_penalty + overrun_weight * relative_overrun ** overrun_power
    return float(x.accuracy - penalty)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def seed_reward(x: RewardInputs, alpha: float = 1.0, beta: float = 0.5, gamma: float = 10.0,
                delta: float = 0.1, eps: float = 0.05) -> float:
    """The seed repository's reward (``controller_model.py::RewardFunction``) as a preset.

    With L = latency, B = budget and σ the logistic function::

        r = α·acc
            − β·σ(10·(L/B − 1))                                   soft budget penalty
            − γ·(max(0, L − B) / B)²                              quadratic overrun penalty
            − ε·(crops/max_crops + top_k/max_top_k + blocks/max_blocks) / 3    compute cost
            + δ·1[L ≤ B]·(1 − L/B)                                 bonus for finishing early

    Note that the soft penalty is already β/2 at L = B and is not zero well within budget
    (β·σ(−5) ≈ 0.0033 at L = B/2).

    Deliberate deviations from the seed:

    - L is the **end-to-end** latency of the rollout. The seed used the prefill latency of blocks
      1-15 only, while its budgets were drawn from total-latency profiles, so its penalty almost
      never fired (seed-system.md section 4, item 5).
    - The compute cost normalises by the **configured maxima** (max_crops, max_top_k,
      max_blocks). The seed hard-coded crops/12, top_k/32 (a leftover range; the real maximum is
      8) and blocks/16.

    Args:
        x: validated rollout inputs.
        alpha: weight of the accuracy.
        beta: weight of the sigmoid budget penalty.
        gamma: weight of the squared relative overrun.
        delta: weight of the early-finish bonus.
        eps: weight of the normalised compute cost.

    Returns:
        The reward.
    """
    x.validate()
    ratio = x.latency_ms / x.budget_ms
    soft = _sigmoid(10.0 * (ratio - 1.0))
    overrun = max(0.0, x.latency_ms - x.budget_ms) / x.budget_ms
    cost = (x.num_crops / x.max_crops + x.top_k / x.max_top_k + x.num_blocks / x.max_blocks) / 3.0
    bonus = (1.0 - ratio) if x.latency_ms <= x.budget_ms else 0.0
    return float(alpha * x.accuracy - beta * soft - gamma * overrun ** 2 - eps * cost + delta * bonus)


# ----------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------
REWARD_KINDS: dict[str, Callable[..., float]] = {"default": default_reward, "seed": seed_reward}

# Parameter constraints: name -> (predicate, description).
_PARAM_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "overrun_weight": (lambda v: v >= 0.0, ">= 0"),
    "overrun_power": (lambda v: v > 0.0, "> 0"),
    "violation_penalty": (lambda v: v >= 0.0, ">= 0"),
}


def make_reward_fn(kind: str, **params: float) -> RewardFn:
    """Build a reward function ``RewardInputs -> float``.

    Args:
        kind: "default" (`default_reward`) or "seed" (`seed_reward`).
        **params: keyword parameters of that formula; missing ones take its defaults.

    Returns:
        The reward function with `params` bound.

    Raises:
        ValueError: for an unknown kind (naming it and the known kinds), a parameter the formula
            does not take, or a parameter that is not a finite number or is out of range.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; known kinds: {sorted(REWARD_KINDS)}")
    formula = REWARD_KINDS[kind]
    accepted = [p for p in inspect.signature(formula).parameters if p != "x"]
    for name, value in params.items():
        if name not in accepted:
            raise ValueError(f"reward kind {kind!r} takes no parameter {name!r}; it takes {accepted}")
        _check_real(name, value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        rule = _PARAM_RULES.get(name)
        if rule is not None and not rule[0](value):
            raise ValueError(f"{name} must be {rule[1]}, got {value!r}")
    # A partial of a module-level function pickles, so the result can travel through Ray.
    return functools.partial(formula, **{k: float(v) for k, v in params.items()})


def reward_fn_from_config(reward_cfg: Any) -> RewardFn:
    """Build the reward function a run's config asks for.

    Reads ``reward_cfg.kind`` and, for kind "default", ``overrun_weight``, ``overrun_power`` and
    ``violation_penalty`` (the `shared.config.RewardConfig` fields). Kind "seed" uses the seed's
    coefficients.

    Args:
        reward_cfg: the ``cfg.reward`` section (any object with those attributes).

    Returns:
        The reward function.

    Raises:
        ValueError: as `make_reward_fn`.
    """
    kind = reward_cfg.kind
    if kind == "default":
        return make_reward_fn(
            kind,
            overrun_weight=reward_cfg.overrun_weight,
            overrun_power=reward_cfg.overrun_power,
            violation_penalty=reward_cfg.violation_penalty,
        )
    return make_reward_fn(kind)
