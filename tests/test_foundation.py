"""Foundation: config loading, knob spaces, the two-stage controller, records (issue 2 points 2-5)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shared.config import ConfigError, dump_config, load_config
from shared.controller import (Stage1Features, TwoStageController, check_budget_ms,
                               collate_features)
from shared.knobs import ImportanceScores, KnobError, KnobSpace, select_blocks
from shared.records import SCHEMA, SCHEMA_VERSION, read_records, records_to_table, write_parquet_atomic


# ----------------------------------------------------------------------------------------------- config
def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("grpo:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*'grpo\.lrr'"):
        load_config(bad)
    bad.write_text("grpo:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*'grpo\.lr' must be a number"):
        load_config(bad)
    bad.write_text("grpo:\n  clip_low: 3.0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*'grpo\.clip_low' = 3\.0 is above its maximum"):
        load_config(bad)
    bad.write_text("model:\n  backend: tpu\n")
    with pytest.raises(ConfigError, match=r"'model\.backend' must be one of"):
        load_config(bad)
    bad.write_text("budget:\n  min_ms: 300\n  max_ms: 200\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*'budget\.max_ms'"):
        load_config(bad)
    bad.write_text("data:\n  sources:\n    - name: shapes\n      weigth: 2\n")
    with pytest.raises(ConfigError, match=r"'data\.sources\[0\]\.weigth'"):
        load_config(bad)


def test_config_overrides_yaml_floats_and_round_trip(tmp_path):
    cfg = load_config(None, ["grpo.lr=1e-3", "knobs.top_k_options=[4,8]", "system.num_workers=3",
                             "grpo.scale_by_std=false"])
    assert cfg.grpo.lr == pytest.approx(1e-3) and isinstance(cfg.grpo.lr, float)
    assert cfg.knobs.top_k_options == [4, 8] and cfg.system.num_workers == 3 and cfg.grpo.scale_by_std is False
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["grpo.lr"])
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg


# ------------------------------------------------------------------------------------------------ knobs
def _space(**kw):
    base = dict(tier_names=("low", "medium", "high"), tier_max_crops=(3, 6, 12), positions=(1, 2, 3, 4, 5),
                top_ks=(4, 5, 6, 7, 8), num_blocks=(12, 13, 14, 15, 16), num_layers=16, num_experts=64,
                native_top_k=8)
    base.update(kw)
    return KnobSpace(**base)


def test_num_blocks_mask_is_real_when_options_are_infeasible():
    space = _space(positions=(1, 2, 3), num_blocks=(2, 3, 4), num_layers=4, top_ks=(1, 2), num_experts=8,
                   native_top_k=2)
    assert space.num_blocks_feasible(1) == [True, True, True]
    assert space.num_blocks_feasible(2) == [False, True, True]
    assert space.num_blocks_feasible(3) == [False, False, True]
    with pytest.raises(KnobError, match="infeasible"):
        space.choice(0, 2, 0, 0)
    assert all(c.p < c.num_blocks for c in space.static_choices(2))


def test_block_selection_prefix_importance_and_ties():
    imp = [9.0, 0.1, 5.0, 5.0, 0.2, 7.0]
    assert select_blocks(1, 4, imp) == [0, 2, 3, 5]
    assert select_blocks(2, 4, imp) == [0, 1, 2, 5]      # prefix 0..1 always; then 5 (7.0), 2 (tie 5.0 -> lower)
    assert select_blocks(1, 3, imp) == [0, 2, 5]
    assert select_blocks(3, 6, imp) == list(range(6))
    with pytest.raises(KnobError):
        select_blocks(3, 3, imp)


def test_knob_space_validation_against_model_shape():
    with pytest.raises(KnobError, match="experts"):
        _space(top_ks=(4, 128))
    with pytest.raises(KnobError, match="exceed"):
        _space(num_blocks=(12, 17))
    with pytest.raises(KnobError, match="no feasible num_blocks"):
        _space(positions=(1, 16))
    with pytest.raises(KnobError, match="increasing"):
        _space(top_ks=(8, 4))


def test_tier_mask_keeps_only_the_cheapest_of_equal_tiers():
    space = _space()
    assert space.tier_mask([412, 740, 1196]) == [True, True, True]
    assert space.tier_mask([412, 740, 740]) == [True, True, False]
    assert space.tier_mask([316, 316, 316]) == [True, False, False]


def test_importance_file_errors(tmp_path):
    f = tmp_path / "imp.json"
    ImportanceScores(tuple(float(i) for i in range(8))).save(f)
    assert ImportanceScores.load(f, 8).scores[3] == 3.0
    with pytest.raises(KnobError, match="8 block scores but the model has 16"):
        ImportanceScores.load(f, 16)
    f.write_text("{not json")
    with pytest.raises(KnobError, match="not readable JSON"):
        ImportanceScores.load(f, 8)
    with pytest.raises(KnobError, match="not found"):
        ImportanceScores.load(tmp_path / "missing.json", 8)


# ------------------------------------------------------------------------------------------- controller
def _controller(d_model=2048, space=None, seed=0):
    torch.manual_seed(seed)
    return TwoStageController(space or _space(), d_model, token_rms=0.7)


def test_policy_params_under_250k_at_d_model_2048_with_default_config():
    cfg = load_config(None)
    ctl = TwoStageController.from_config(cfg, KnobSpace.from_config(cfg.knobs, cfg.model))
    assert ctl.num_policy_params() < 250_000
    assert ctl.num_budget_encoder_params() > 0          # counted separately


def test_budget_token_is_fixed_and_scaled():
    ctl = _controller(d_model=256)
    tok = ctl.budget_token_embedding(250.0)
    assert tok.shape == (256,)
    assert float(tok.pow(2).mean().sqrt()) == pytest.approx(0.7, rel=1e-5)
    assert all(not p.requires_grad for p in ctl.budget_token.buffers())
    assert not any(n.startswith("budget_token") for n, _ in ctl.named_parameters())
    assert "budget_token.proj" in ctl.state_dict()
    assert not torch.allclose(tok, ctl.budget_token_embedding(300.0))


def test_masked_options_are_never_sampled_and_single_option_has_logp_zero():
    ctl = _controller(d_model=32)
    gen = torch.Generator().manual_seed(0)
    f1 = Stage1Features(np.random.default_rng(0).standard_normal(32).astype(np.float32), 200.0,
                        [316, 316, 740], [True, False, True], [True, False, False, False, False])
    for _ in range(200):
        tier, p = ctl.act_stage1(f1, generator=gen)
        assert tier.index in (0, 2)
        assert p.index == 0 and p.log_prob == 0.0
    greedy = ctl.act_stage1(f1, greedy=True)
    emb = ctl.budget_embedding(torch.tensor([200.0]))
    lt, _ = ctl.stage1_log_probs(torch.tensor(f1.lang_feat)[None], emb, torch.tensor([f1.tier_tokens]),
                                 torch.tensor([f1.tier_mask]), torch.tensor([f1.p_mask]))
    assert greedy[0].index == int(lt[0].argmax())


def test_logprob_recomputed_after_parquet_round_trip_equals_sampled(tmp_path):
    """The learner's log-prob from recorded features equals the worker's within 1e-5 (d_model 2048)."""
    from rollout_workers.synthetic_backend import SyntheticBackend, SyntheticTables, synthetic_samples
    from shared.backend import run_group
    from shared.rewards import make_reward_fn
    space = _space()
    for d_model in (64, 2048):
        tables = SyntheticTables(space, 4, 0.02, 0, d_model)
        backend = SyntheticBackend(tables, seed=1)
        ctl = _controller(d_model=d_model, space=space)
        gen = torch.Generator().manual_seed(0)
        records = []
        for i, sample in enumerate(synthetic_samples(tables, 6, seed=2)):
            res = run_group(backend, sample, 150.0 + 40 * i, ctl, make_reward_fn("default"), group_size=4,
                            group_id=f"g{i}", generator=gen)
            records.extend(res.records)
        path = tmp_path / f"part-{d_model}.parquet"
        write_parquet_atomic(records_to_table(records), path)
        back = read_records(path)
        rows = [r.to_row() for r in back]
        with torch.no_grad():
            logp = ctl.log_prob(collate_features(rows))[0]
        recorded = torch.tensor([r["behavior_logp"] for r in rows])
        assert float((logp - recorded).abs().max()) < 1e-5
        assert float((torch.exp(logp - recorded) - 1).abs().max()) < 1e-5


def test_weights_round_trip_and_mismatch():
    a, b = _controller(d_model=32, seed=0), _controller(d_model=32, seed=1)
    b.set_weights(a.get_weights())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    w = a.get_weights()
    assert all(isinstance(v, np.ndarray) for v in w.values())
    w.pop(next(iter(w)))
    with pytest.raises(ValueError, match="missing"):
        b.set_weights(w)
    with pytest.raises(ValueError, match="wrong shapes"):
        _controller(d_model=16).set_weights(a.get_weights())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0, "soon", None])
def test_check_budget_rejects_bad_budgets(bad):
    with pytest.raises(ValueError, match="budget_ms"):
        check_budget_ms(bad)


# ---------------------------------------------------------------------------------------------- records
def test_record_schema_round_trip(tmp_path):
    from rollout_workers.synthetic_backend import SyntheticBackend, SyntheticTables, synthetic_samples
    from shared.backend import run_group
    from shared.rewards import make_reward_fn
    tables = SyntheticTables(_space(), 4, 0.02, 0, 16)
    ctl = _controller(d_model=16)
    res = run_group(SyntheticBackend(tables), synthetic_samples(tables, 1)[0], 200.0, ctl,
                    make_reward_fn("default"), group_size=3, group_id="g")
    table = records_to_table(res.records)
    assert table.schema.equals(SCHEMA, check_metadata=True)
    assert int(table.schema.metadata[b"schema_version"]) == SCHEMA_VERSION
    path = tmp_path / "part-000000.parquet"
    write_parquet_atomic(table, path)
    assert [p.name for p in tmp_path.iterdir()] == ["part-000000.parquet"]     # no temp file left
    back = read_records(path)
    assert len(back) == 3
    for a, b in zip(res.records, back):
        ra, rb = a.to_row(), b.to_row()
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float) and math.isnan(ra[k]):
                assert math.isnan(rb[k])
            elif k in ("lang_feat", "latency_state"):
                assert np.allclose(ra[k], rb[k])          # stored as float32
            else:
                assert ra[k] == rb[k], k
    assert pq.read_schema(path).field("lang_feat").type.value_type == SCHEMA.field("lang_feat").type.value_type
