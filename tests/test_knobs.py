"""Knob spaces (shared/knobs.py): option sets from config, the num_blocks feasibility mask, collapsed tiers,
deterministic block selection, validation against the model's shape, importance files."""
from __future__ import annotations

import json
import math

import pytest

from shared.config import load_config
from shared.knobs import ImportanceScores, KnobChoice, KnobError, KnobSpace, select_blocks


def space(**kw) -> KnobSpace:
    base = dict(tier_names=("low", "medium", "high"), tier_max_crops=(3, 6, 12), positions=(1, 2, 3, 4, 5),
                top_ks=(4, 5, 6, 7, 8), num_blocks=(12, 13, 14, 15, 16), num_layers=16, num_experts=64,
                native_top_k=8)
    base.update(kw)
    return KnobSpace(**base)


def small_space() -> KnobSpace:
    """A 4-layer model where the mask is real: num_blocks options [2, 3, 4], positions [1, 2, 3]."""
    return space(positions=(1, 2, 3), num_blocks=(2, 3, 4), top_ks=(1, 2), num_layers=4, num_experts=4,
                 native_top_k=2)


# ----------------------------------------------------------------------------------------------
# Option sets and the feasibility mask
# ----------------------------------------------------------------------------------------------
def test_default_config_space_and_every_option_feasible():
    cfg = load_config(None)
    s = KnobSpace.from_config(cfg.knobs, cfg.model)
    assert s.tier_names == ("low", "medium", "high") and s.tier_max_crops == (3, 6, 12)
    assert s.positions == (1, 2, 3, 4, 5) and s.top_ks == (4, 5, 6, 7, 8) and s.num_blocks == (12, 13, 14, 15, 16)
    assert (s.num_layers, s.num_experts, s.native_top_k) == (16, 64, 8)
    for p in s.positions:                           # with the default ranges nothing is masked
        assert s.num_blocks_feasible(p) == [True] * 5


def test_feasibility_mask_is_real_on_a_small_model():
    s = small_space()
    assert s.num_blocks_feasible(1) == [True, True, True]
    assert s.num_blocks_feasible(2) == [False, True, True]       # 2 blocks = the prefix alone
    assert s.num_blocks_feasible(3) == [False, False, True]
    # choice() refuses an infeasible pair and accepts a feasible one
    with pytest.raises(KnobError, match="infeasible"):
        s.choice(0, 2, 0, 1)                                     # p=3, num_blocks=3
    c = s.choice(2, 2, 1, 2)
    assert c == KnobChoice("high", 12, 3, 2, 4)
    assert s.index_of(c) == (2, 2, 1, 2)
    # static baselines at a fixed p list exactly the feasible combinations
    assert len(s.static_choices(1)) == 3 * 2 * 3
    assert len(s.static_choices(2)) == 3 * 2 * 2
    assert all(ch.num_blocks > ch.p for ch in s.static_choices(3))


def test_knob_space_from_config_with_overrides():
    cfg = load_config(None, ["knobs.insertion_positions=[1, 2, 3]", "knobs.num_blocks_options=[2, 3, 4]",
                             "knobs.top_k_options=[1, 2]", "model.num_layers=4", "model.num_experts=4",
                             "model.native_top_k=2"])
    assert KnobSpace.from_config(cfg.knobs, cfg.model) == small_space()


def test_choice_index_round_trip_and_full_compute():
    s = space()
    for idx in [(0, 0, 0, 0), (1, 2, 3, 4), (2, 4, 4, 4)]:
        assert s.index_of(s.choice(*idx)) == idx
    assert s.full_compute() == KnobChoice("high", 12, 1, 8, 16)
    with pytest.raises(KnobError, match="not in this knob space"):
        s.index_of(KnobChoice("ultra", 24, 1, 8, 16))
    assert KnobSpace(**s.to_dict() | {k: tuple(v) for k, v in s.to_dict().items() if isinstance(v, list)}) == s


# ----------------------------------------------------------------------------------------------
# Collapsed tiers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, mask", [
    ([412, 740, 1196], [True, True, True]),       # a large image: every tier changes the crops
    ([412, 740, 740], [True, True, False]),       # small image: high gives what medium gives
    ([412, 412, 412], [True, False, False]),      # tiny image: one crop whatever the tier
    ([412, 740, 412], [True, True, False]),       # only the cheapest of equal tiers stays
])
def test_tier_mask_masks_tiers_that_change_nothing(tokens, mask):
    assert space().tier_mask(tokens) == mask


def test_tier_mask_needs_one_count_per_tier():
    with pytest.raises(KnobError, match="3 tier token counts"):
        space().tier_mask([412, 740])


# ----------------------------------------------------------------------------------------------
# Validation against the model's shape
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(top_ks=(4, 8, 65)), "64 experts"),                          # top_k > experts
    (dict(top_ks=(0, 4)), "top_k options"),
    (dict(native_top_k=65), "native top_k"),
    (dict(num_blocks=(12, 16, 17)), "16 blocks"),                      # num_blocks > layers
    (dict(positions=(0, 1)), "block 0 always runs"),
    (dict(positions=(1, 16), num_blocks=(12, 16)), "p=16"),           # p = L: no num_blocks > p fits
    (dict(positions=(3, 1)), "strictly increasing"),
    (dict(top_ks=()), "empty"),
    (dict(tier_names=("low", "high")), "equal length"),
])
def test_invalid_spaces_are_refused(kw, match):
    with pytest.raises(KnobError, match=match):
        space(**kw)


def test_position_without_a_feasible_num_blocks_names_it():
    with pytest.raises(KnobError) as info:
        space(positions=(1, 4), num_blocks=(2, 3, 4), top_ks=(1, 2), num_layers=4, num_experts=4, native_top_k=2)
    msg = str(info.value)
    assert "p=4" in msg and "[2, 3, 4]" in msg


# ----------------------------------------------------------------------------------------------
# Block selection
# ----------------------------------------------------------------------------------------------
def test_select_blocks_keeps_the_prefix_then_the_most_important():
    importance = [9.0, 1.0, 5.0, 5.0, 2.0, 7.0]
    # prefix 0..1; then by importance among 2..5: block 5 (7), then 2 and 3 tie (5) -> the lower index 2
    assert select_blocks(2, 4, importance) == [0, 1, 2, 5]
    assert select_blocks(2, 5, importance) == [0, 1, 2, 3, 5]
    # the prefix runs even when unimportant; a prefix block never counts twice
    assert select_blocks(3, 4, [0.0, 0.0, 0.0, 1.0, 9.0]) == [0, 1, 2, 4]
    # with p=1 block 1 competes with the rest on importance
    assert select_blocks(1, 3, importance) == [0, 2, 5]
    assert select_blocks(1, 6, importance) == list(range(6))


def test_select_blocks_ties_broken_by_index_and_deterministic():
    assert select_blocks(1, 4, [1.0] * 8) == [0, 1, 2, 3]
    assert select_blocks(2, 4, [3.0, 3.0, 1.0, 2.0, 2.0, 2.0]) == [0, 1, 3, 4]
    imp = [0.3, 0.1, 0.9, 0.9, 0.2, 0.9, 0.4]
    assert all(select_blocks(1, 5, imp) == [0, 2, 3, 5, 6] for _ in range(3))


def test_select_blocks_by_index_drops_from_the_end():
    imp = ImportanceScores.by_index(16).scores
    assert select_blocks(1, 12, imp) == list(range(12))
    assert select_blocks(5, 14, imp) == list(range(14))


@pytest.mark.parametrize("p, nb", [(0, 3), (3, 3), (4, 3), (1, 7)])
def test_select_blocks_refuses_impossible_requests(p, nb):
    with pytest.raises(KnobError):
        select_blocks(p, nb, [1.0] * 6)


# ----------------------------------------------------------------------------------------------
# Importance files
# ----------------------------------------------------------------------------------------------
def test_importance_round_trip_and_hash(tmp_path):
    scores = ImportanceScores(tuple(float(i % 5) for i in range(16)), model_id="m", method="ablation")
    path = tmp_path / "imp.json"
    scores.save(path, note="extra keys are kept in the file")
    again = ImportanceScores.load(path, 16)
    assert again == scores
    assert again.sha256() == scores.sha256()
    assert len(scores.sha256()) == 64
    changed = ImportanceScores(scores.scores[:-1] + (9.0,))
    assert changed.sha256() != scores.sha256()
    assert json.loads(path.read_text())["note"]


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("{not json", "not readable JSON"),
    (json.dumps([1.0] * 16), "list of numbers under 'scores'"),
    (json.dumps({"weights": [1.0] * 16}), "list of numbers under 'scores'"),
    (json.dumps({"scores": [1.0] * 15 + ["x"]}), "list of numbers"),
    (json.dumps({"scores": [1.0] * 15}), "15 block scores but the model has 16"),
    (json.dumps({"scores": [1.0] * 17}), "17 block scores but the model has 16"),
    ('{"scores": [' + ", ".join(["1.0"] * 15) + ', NaN]}', "non-finite"),
])
def test_importance_load_errors(tmp_path, content, match):
    path = tmp_path / "imp.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KnobError, match=match):
        ImportanceScores.load(path, 16)


def test_importance_scores_are_floats():
    path_scores = ImportanceScores.by_index(4)
    assert path_scores.scores == (4.0, 3.0, 2.0, 1.0) and all(isinstance(s, float) for s in path_scores.scores)
    assert not math.isnan(sum(path_scores.scores))
