"""Tests for shared/rewards.py; expected values are worked out by hand in the comments."""
from __future__ import annotations

import math
import pickle
from dataclasses import replace
from types import SimpleNamespace

import pytest

from shared.rewards import RewardInputs, default_reward, make_reward_fn, reward_fn_from_config, seed_reward

SIG_5 = 1.0 / (1.0 + math.exp(-5.0))   # σ(5)  ≈ 0.9933071491
SIG_M5 = 1.0 / (1.0 + math.exp(5.0))   # σ(-5) ≈ 0.0066928509


def inputs(accuracy: float = 1.0, latency_ms: float = 100.0, budget_ms: float = 100.0,
           **knobs: int) -> RewardInputs:
    # Knobs at half their maxima: cost term = (6/12 + 4/8 + 8/16) / 3 = 0.5.
    base = dict(num_crops=6, max_crops=12, top_k=4, max_top_k=8, num_blocks=8, max_blocks=16)
    base.update(knobs)
    return RewardInputs(accuracy=accuracy, latency_ms=latency_ms, budget_ms=budget_ms, **base)


# ----------------------------------------------------------------------------------------------
# default_reward
# ----------------------------------------------------------------------------------------------
def test_default_under_and_at_budget_is_accuracy() -> None:
    assert default_reward(inputs(accuracy=0.8, latency_ms=50.0)) == pytest.approx(0.8)
    assert default_reward(inputs(accuracy=0.8, latency_ms=100.0)) == pytest.approx(0.8)  # L == B: no penalty
    assert default_reward(inputs(accuracy=0.0, latency_ms=0.0)) == 0.0


def test_default_over_budget() -> None:
    # overrun/B = 50/100 = 0.5; penalty = 0.5 + 2 * 0.5 = 1.5; r = 0.8 - 1.5 = -0.7.
    assert default_reward(inputs(accuracy=0.8, latency_ms=150.0)) == pytest.approx(-0.7)
    # power 2: penalty = 0.5 + 2 * 0.25 = 1.0; r = -0.2.
    assert default_reward(inputs(accuracy=0.8, latency_ms=150.0), overrun_power=2.0) == pytest.approx(-0.2)
    # weight 1, penalty 0.25, B = 200, L = 260: rel = 0.3; r = 1 - 0.25 - 0.3 = 0.45.
    x = inputs(accuracy=1.0, latency_ms=260.0, budget_ms=200.0)
    assert default_reward(x, overrun_weight=1.0, violation_penalty=0.25) == pytest.approx(0.45)


def test_default_step_at_boundary() -> None:
    # "Just over" is worse than "just under" by about the flat violation penalty.
    just_under = default_reward(inputs(accuracy=1.0, latency_ms=99.999))
    just_over = default_reward(inputs(accuracy=1.0, latency_ms=100.001))
    assert just_under == pytest.approx(1.0)
    assert just_over == pytest.approx(1.0 - 0.5 - 2.0 * 1e-5)
    assert just_under - just_over > 0.49


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_default_monotone_in_overrun(power: float) -> None:
    latencies = [100.0, 100.5, 101.0, 110.0, 150.0, 200.0, 400.0, 1000.0]
    rewards = [default_reward(inputs(accuracy=1.0, latency_ms=L), overrun_power=power) for L in latencies]
    assert all(a > b for a, b in zip(rewards, rewards[1:]))


def test_default_ignores_knobs() -> None:
    small = inputs(accuracy=0.5, latency_ms=120.0, num_crops=0, top_k=0, num_blocks=0)
    large = inputs(accuracy=0.5, latency_ms=120.0, num_crops=12, top_k=8, num_blocks=16)
    assert default_reward(small) == default_reward(large)


# ----------------------------------------------------------------------------------------------
# seed_reward
# ----------------------------------------------------------------------------------------------
def test_seed_under_budget() -> None:
    # L/B = 0.5: soft = 0.5 * σ(-5) = 0.0033464; overrun 0; cost 0.05 * 0.5 = 0.025;
    # bonus 0.1 * 0.5 = 0.05. r = 1 - 0.0033464 - 0.025 + 0.05 = 1.0216536.
    r = seed_reward(inputs(accuracy=1.0, latency_ms=50.0))
    assert r == pytest.approx(1.0 - 0.5 * SIG_M5 - 0.025 + 0.05)
    assert r == pytest.approx(1.0216535746, abs=1e-9)


def test_seed_at_budget() -> None:
    # σ(0) = 0.5 -> soft = 0.25; no overrun, no bonus; r = 1 - 0.25 - 0.025 = 0.725.
    assert seed_reward(inputs(accuracy=1.0, latency_ms=100.0)) == pytest.approx(0.725)


def test_seed_over_budget() -> None:
    # L/B = 1.5: soft = 0.5 * σ(5) = 0.4966536; quad = 10 * 0.5^2 = 2.5; cost 0.025; no bonus.
    # r = 1 - 0.4966536 - 2.5 - 0.025 = -2.0216536.
    r = seed_reward(inputs(accuracy=1.0, latency_ms=150.0))
    assert r == pytest.approx(1.0 - 0.5 * SIG_5 - 2.5 - 0.025)
    assert r == pytest.approx(-2.0216535746, abs=1e-9)


def test_seed_uses_configured_maxima() -> None:
    # All knobs at their maxima: cost = 0.05 * (1 + 1 + 1) / 3 = 0.05 (the seed's top_k/32
    # would have given 0.05 * (1 + 0.25 + 1) / 3 = 0.0375).
    x = inputs(accuracy=0.0, latency_ms=100.0, num_crops=12, top_k=8, num_blocks=16)
    assert seed_reward(x) == pytest.approx(-0.25 - 0.05)
    x = inputs(accuracy=0.0, latency_ms=100.0, num_crops=0, top_k=0, num_blocks=0)
    assert seed_reward(x) == pytest.approx(-0.25)


def test_seed_custom_coefficients() -> None:
    # alpha 2, beta 0, gamma 1, delta 0, eps 0 at L/B = 1.2: r = 2 * 0.5 - 1 * 0.2^2 = 0.96.
    x = inputs(accuracy=0.5, latency_ms=120.0)
    assert seed_reward(x, alpha=2.0, beta=0.0, gamma=1.0, delta=0.0, eps=0.0) == pytest.approx(0.96)


def test_seed_monotone_in_overrun() -> None:
    latencies = [100.0, 101.0, 110.0, 150.0, 200.0, 400.0]
    rewards = [seed_reward(inputs(accuracy=1.0, latency_ms=L)) for L in latencies]
    assert all(a > b for a, b in zip(rewards, rewards[1:]))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("latency_ms", float("nan")),
    ("latency_ms", float("inf")),
    ("latency_ms", -1.0),
    ("budget_ms", 0.0),
    ("budget_ms", -5.0),
    ("budget_ms", float("nan")),
    ("budget_ms", float("inf")),
    ("accuracy", -0.01),
    ("accuracy", 1.01),
    ("accuracy", float("nan")),
    ("accuracy", "1.0"),
    ("max_crops", 0),
    ("num_crops", 13),
    ("top_k", -1),
    ("max_top_k", 8.0),
    ("num_blocks", 17),
    ("num_blocks", True),
])
def test_invalid_inputs_raise_naming_field(field: str, value: object) -> None:
    kwargs = dict(accuracy=1.0, latency_ms=100.0, budget_ms=100.0, num_crops=6, max_crops=12,
                  top_k=4, max_top_k=8, num_blocks=8, max_blocks=16)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        RewardInputs(**kwargs)


def test_boundary_values_are_valid() -> None:
    inputs(accuracy=0.0, latency_ms=0.0)
    inputs(accuracy=1.0, latency_ms=1e9, budget_ms=1e-6)


def test_formulas_revalidate() -> None:
    # A RewardInputs cannot be mutated, but a bypassed constructor must still not score.
    x = inputs()
    object.__setattr__(x, "latency_ms", float("nan"))
    for fn in (default_reward, seed_reward):
        with pytest.raises(ValueError, match="latency_ms"):
            fn(x)


# ----------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------
def test_make_reward_fn_default_and_params() -> None:
    x = inputs(accuracy=0.8, latency_ms=150.0)
    assert make_reward_fn("default")(x) == pytest.approx(-0.7)
    assert make_reward_fn("default", overrun_power=2)(x) == pytest.approx(-0.2)
    assert make_reward_fn("seed")(inputs(latency_ms=100.0)) == pytest.approx(0.725)
    assert make_reward_fn("seed", gamma=0.0, beta=0.0, eps=0.0)(x) == pytest.approx(0.8)


def test_make_reward_fn_errors() -> None:
    with pytest.raises(ValueError, match="'cubic'"):
        make_reward_fn("cubic")
    with pytest.raises(ValueError, match="gamma"):
        make_reward_fn("default", gamma=1.0)
    with pytest.raises(ValueError, match="overrun_power"):
        make_reward_fn("default", overrun_power=0.0)
    with pytest.raises(ValueError, match="overrun_weight"):
        make_reward_fn("default", overrun_weight=-1.0)
    with pytest.raises(ValueError, match="violation_penalty"):
        make_reward_fn("default", violation_penalty=float("nan"))


def test_reward_fn_is_picklable() -> None:
    fn = pickle.loads(pickle.dumps(make_reward_fn("default", overrun_weight=3.0)))
    # rel = 0.5: r = 0.8 - 0.5 - 3 * 0.5 = -1.2.
    assert fn(inputs(accuracy=0.8, latency_ms=150.0)) == pytest.approx(-1.2)


def test_reward_fn_from_config() -> None:
    cfg = SimpleNamespace(kind="default", overrun_weight=1.0, overrun_power=2.0, violation_penalty=0.1)
    # rel = 0.5: r = 0.8 - 0.1 - 1 * 0.25 = 0.45.
    assert reward_fn_from_config(cfg)(inputs(accuracy=0.8, latency_ms=150.0)) == pytest.approx(0.45)
    cfg = SimpleNamespace(kind="seed", overrun_weight=1.0, overrun_power=2.0, violation_penalty=0.1)
    assert reward_fn_from_config(cfg)(inputs(latency_ms=100.0)) == pytest.approx(0.725)
    with pytest.raises(ValueError, match="'bogus'"):
        reward_fn_from_config(replace_kind(cfg, "bogus"))


def test_reward_fn_from_real_config_section() -> None:
    config = pytest.importorskip("shared.config")
    cfg = config.RewardConfig()
    x = inputs(accuracy=0.8, latency_ms=150.0)
    assert reward_fn_from_config(cfg)(x) == pytest.approx(default_reward(x, cfg.overrun_weight,
                                                                         cfg.overrun_power,
                                                                         cfg.violation_penalty))
    assert reward_fn_from_config(replace(cfg, kind="seed"))(x) == pytest.approx(seed_reward(x))


def replace_kind(cfg: SimpleNamespace, kind: str) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(cfg), "kind": kind})


def test_no_failure_path_yields_zero_reward() -> None:
    # A failed rollout has no latency; passing NaN (or nothing) must raise, never score 0.
    with pytest.raises(ValueError):
        inputs(latency_ms=float("nan"))
    with pytest.raises(TypeError):
        RewardInputs(accuracy=0.0)  # type: ignore[call-arg]
