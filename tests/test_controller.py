"""The two-stage controller (shared/controller.py): size, the fixed budget token, masks, greedy/sampled
acting, log-probs recomputed from recorded features after a trip through the record schema and Parquet,
weights as numpy, budget validation, and the act-path caches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.local import train_local
from learner.trainer import GRPOTrainer
from rollout_workers.synthetic_backend import SyntheticBackend, SyntheticTables, synthetic_samples
from shared.backend import run_group
from shared.config import load_config
from shared.controller import (HEADS, Stage1Features, Stage2Features, TwoStageController, check_budget_ms,
                               collate_features, sinusoidal_code)
from shared.knobs import KnobSpace
from shared.records import make_record, read_records, records_to_table, write_parquet_atomic
from shared.rewards import reward_fn_from_config


def default_space() -> KnobSpace:
    cfg = load_config(None)
    return KnobSpace.from_config(cfg.knobs, cfg.model)


def small_space() -> KnobSpace:
    """4-layer model where the num_blocks mask is real: options [2, 3, 4], positions [1, 2, 3]."""
    return KnobSpace(tier_names=("low", "medium", "high"), tier_max_crops=(3, 6, 12), positions=(1, 2, 3),
                     top_ks=(1, 2), num_blocks=(2, 3, 4), num_layers=4, num_experts=4, native_top_k=2)


def controller(space=None, d_model=16, seed=0, **kw) -> TwoStageController:
    torch.manual_seed(seed)
    return TwoStageController(space or default_space(), d_model, **kw)


def features(ctl: TwoStageController, rng, budget=230.0, tier_mask=None, p_idx=0, scale=1.0):
    s = ctl.space
    f1 = Stage1Features(lang_feat=(rng.standard_normal(ctl.d_model) * scale).astype(np.float32), budget_ms=budget,
                        tier_tokens=[412, 740, 1196], tier_mask=tier_mask or [True] * s.num_tiers,
                        p_mask=[True] * len(s.positions))
    f2 = Stage2Features(latency_state=(rng.standard_normal(ctl.d_model) * scale).astype(np.float32), p_idx=p_idx,
                        vision_tokens=740, spent_frac=0.31, nb_mask=ctl.nb_mask_for(p_idx))
    return f1, f2


def synthetic_setup(d_model=64, seed=0):
    cfg = load_config(None, ["model.backend=synthetic", f"model.d_model={d_model}", "budget.min_ms=100",
                             "budget.max_ms=380", "budget.norm_min_ms=80", "budget.norm_max_ms=400"])
    space = KnobSpace.from_config(cfg.knobs, cfg.model)
    tables = SyntheticTables(space, 4, 0.02, 0, d_model)
    torch.manual_seed(seed)
    return cfg, tables, SyntheticBackend(tables, seed=seed), TwoStageController.from_config(cfg, space)


# ----------------------------------------------------------------------------------------------
# Size
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [[], ["controller.stage1_hidden=24", "controller.stage2_hidden=32"]],
                         ids=["default", "bandit-widths"])
def test_stage1_plus_stage2_under_250k_parameters_at_d_model_2048(overrides):
    cfg = load_config(None, overrides)
    assert cfg.model.d_model == 2048
    ctl = TwoStageController.from_config(cfg, KnobSpace.from_config(cfg.knobs, cfg.model))
    n = ctl.num_policy_params()
    assert n == sum(p.numel() for m in (ctl.stage1, ctl.stage2) for p in m.parameters())
    assert 100_000 < n < 250_000, n
    # the budget encoder is DESIGN.md's 256 -> d_model -> d_model MLP, counted separately
    assert ctl.num_budget_encoder_params() == (256 * 2048 + 2048) + 2 * 2048 + (2048 * 2048 + 2048) + 2 * 2048
    assert all(p.dtype == torch.float32 for p in ctl.parameters())


# ----------------------------------------------------------------------------------------------
# The fixed budget token
# ----------------------------------------------------------------------------------------------
def test_budget_token_has_the_target_rms_for_every_budget():
    ctl = controller(d_model=2048, token_rms=0.0173, token_seed=3)
    for b in (1.0, 100.0, 170.0, 233.3, 380.0, 500.0, 10_000.0):
        tok = ctl.budget_token_embedding(b)
        assert tok.shape == (2048,) and tok.dtype == torch.float32
        assert float(tok.pow(2).mean().sqrt()) == pytest.approx(0.0173, rel=1e-5)
    assert not torch.allclose(ctl.budget_token_embedding(170.0), ctl.budget_token_embedding(380.0))
    # the same seed gives the same map (workers and learner agree); another seed another map
    assert torch.equal(controller(d_model=2048, token_rms=0.0173, token_seed=3).budget_token_embedding(200.0),
                       ctl.budget_token_embedding(200.0))
    assert not torch.equal(controller(d_model=2048, token_rms=0.0173, token_seed=4).budget_token_embedding(200.0),
                           ctl.budget_token_embedding(200.0))


def test_budget_token_is_fixed_saved_and_untouched_by_training():
    cfg, tables, backend, ctl = synthetic_setup()
    names = {n for n, _ in ctl.named_parameters()}
    assert not any(n.startswith("budget_token") for n in names)      # buffers, not parameters
    assert {"budget_token.proj", "budget_token.target_rms"} <= set(ctl.state_dict())
    assert not ctl.budget_token.proj.requires_grad
    before = {k: v.clone() for k, v in ctl.budget_token.state_dict().items()}
    tok_before = ctl.budget_token_embedding(250.0)
    trainer = GRPOTrainer(ctl, cfg.grpo, seed=0)
    enc_before = [p.detach().clone() for p in ctl.budget_encoder.parameters()]
    train_local(cfg, backend, trainer, synthetic_samples(tables, 16), updates=2, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(enc_before, ctl.budget_encoder.parameters()))  # it trained
    for k, v in ctl.budget_token.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(ctl.budget_token_embedding(250.0), tok_before)
    assert ctl.budget_token.proj.grad is None


# ----------------------------------------------------------------------------------------------
# Masks, greedy, sampling
# ----------------------------------------------------------------------------------------------
def test_masked_options_are_never_sampled():
    ctl = controller(small_space())
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    seen_tier, seen_nb = set(), {0: set(), 1: set(), 2: set()}
    for i in range(600):
        f1, _ = features(ctl, rng, budget=100 + i, tier_mask=[True, False, True])
        t, p = ctl.act_stage1(f1, generator=gen)
        seen_tier.add(t.index)
        _, f2 = features(ctl, rng, p_idx=p.index)
        k, nb = ctl.act_stage2(100 + i, f2, generator=gen)
        assert f2.nb_mask[nb.index], (p.index, nb.index)
        assert math.isfinite(t.log_prob) and math.isfinite(nb.log_prob)
        seen_nb[p.index].add(nb.index)
    assert seen_tier == {0, 2}
    assert seen_nb[0] == {0, 1, 2} and seen_nb[1] == {1, 2} and seen_nb[2] == {2}


def test_single_option_head_has_log_prob_zero_and_no_gradient():
    ctl = controller(small_space())
    rng = np.random.default_rng(1)
    f1, _ = features(ctl, rng, tier_mask=[True, False, False])        # a tiny image: one crop whatever the tier
    t, _ = ctl.act_stage1(f1, generator=torch.Generator().manual_seed(0))
    assert t.index == 0 and t.log_prob == 0.0
    _, f2 = features(ctl, rng, p_idx=2)                                  # p=3 on 4 layers: num_blocks must be 4
    _, nb = ctl.act_stage2(f1.budget_ms, f2, greedy=False, generator=torch.Generator().manual_seed(0))
    assert nb.index == 2 and nb.log_prob == 0.0
    # the learner's path: zero log-prob, zero entropy, zero gradient for those heads
    row = {"lang_feat": f1.lang_feat, "budget_ms": f1.budget_ms, "tier_tokens": f1.tier_tokens,
           "tier_mask": f1.tier_mask, "p_mask": f1.p_mask, "latency_state": f2.latency_state,
           "vision_tokens": f2.vision_tokens, "spent_frac": f2.spent_frac, "nb_mask": f2.nb_mask, "tier_idx": 0,
           "p_idx": 2, "top_k_idx": 1, "nb_idx": 2}
    total, per_head, ent = ctl.log_prob(collate_features([row]))
    assert float(per_head["tier"].detach()) == 0.0 and float(per_head["num_blocks"].detach()) == 0.0
    assert float(ent["tier"]) == 0.0 and float(ent["num_blocks"]) == 0.0
    ctl.zero_grad()
    (per_head["tier"] + per_head["num_blocks"]).sum().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in ctl.parameters())


def test_greedy_is_the_argmax_and_deterministic():
    ctl = controller(d_model=32)
    rng = np.random.default_rng(2)
    for i in range(20):
        f1, f2 = features(ctl, rng, budget=120 + 13 * i, p_idx=i % 5, tier_mask=[True, i % 3 > 0, True])
        t, p = ctl.act_stage1(f1, greedy=True)
        emb = ctl.budget_embedding(torch.tensor([f1.budget_ms]))
        lt, lp = ctl.stage1_log_probs(torch.tensor(f1.lang_feat)[None], emb, torch.tensor([f1.tier_tokens]),
                                      torch.tensor([f1.tier_mask]), torch.tensor([f1.p_mask]))
        assert (t.index, p.index) == (int(lt.argmax()), int(lp.argmax()))
        assert t.log_prob == pytest.approx(float(lt.max()), abs=1e-6)
        k, nb = ctl.act_stage2(f1.budget_ms, f2, greedy=True)
        lk, ln = ctl.stage2_log_probs(torch.tensor(f2.latency_state)[None], emb, torch.tensor([f2.p_idx]),
                                      torch.tensor([float(f2.vision_tokens)]), torch.tensor([f2.spent_frac]),
                                      torch.tensor([f2.nb_mask]))
        assert (k.index, nb.index) == (int(lk.argmax()), int(ln.argmax()))
        assert ctl.act_stage2(f1.budget_ms, f2, greedy=True) == (k, nb)


def test_ties_break_to_the_first_option_when_greedy():
    logp = torch.log(torch.tensor([0.25, 0.375, 0.375]))
    assert TwoStageController._pick(logp, True, None).index == 1


def test_sampling_follows_the_probabilities_and_the_generator():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logp = torch.log(probs)
    gen = torch.Generator().manual_seed(0)
    counts = np.bincount([TwoStageController._pick(logp, False, gen).index for _ in range(20_000)], minlength=4)
    assert counts[1] == 0
    np.testing.assert_allclose(counts / counts.sum(), probs.numpy(), atol=0.015)
    a = [TwoStageController._pick(logp, False, torch.Generator().manual_seed(7)).index for _ in range(5)]
    b = [TwoStageController._pick(logp, False, torch.Generator().manual_seed(7)).index for _ in range(5)]
    assert a == b
    d = TwoStageController._pick(logp, False, gen)
    assert d.log_prob == pytest.approx(float(logp[d.index]))


# ----------------------------------------------------------------------------------------------
# Recomputed log-probs equal the behaviour log-probs after the record's trip through Parquet
# ----------------------------------------------------------------------------------------------
def _roundtrip_rows(records, tmp_path, name):
    path = tmp_path / f"{name}.parquet"
    write_parquet_atomic(records_to_table(records), path)
    return [r.to_row() for r in read_records(path)]


def _check_recomputed(ctl, rows):
    with torch.no_grad():
        total, per_head, _ = ctl.log_prob(collate_features(rows))
    behaviour = torch.tensor([r["behavior_logp"] for r in rows], dtype=torch.float64)
    assert float((total.double() - behaviour).abs().max()) < 1e-5
    for head, col in zip(HEADS, ("logp_tier", "logp_p", "logp_top_k", "logp_nb")):
        rec = torch.tensor([r[col] for r in rows], dtype=torch.float64)
        assert float((per_head[head].double() - rec).abs().max()) < 1e-5, head
    ratio = torch.exp(total.double() - behaviour)
    assert float((ratio - 1).abs().max()) < 1e-5


@pytest.mark.parametrize("d_model", [64, 2048])
def test_log_prob_from_recorded_features_equals_behaviour_after_parquet(tmp_path, d_model):
    cfg, tables, backend, ctl = synthetic_setup(d_model=d_model)
    rf = reward_fn_from_config(cfg.reward)
    gen = torch.Generator().manual_seed(0)
    records = []
    for i, sample in enumerate(synthetic_samples(tables, 12, seed=3)):
        res = run_group(backend, sample, 100.0 + 23.7 * i, ctl, rf, group_size=4, group_id=f"g{i}", generator=gen)
        records.extend(res.records)
    assert len(records) == 48 and len({r.tier_idx for r in records}) > 1
    assert len(records[0].latency_state) == d_model
    _check_recomputed(ctl, _roundtrip_rows(records, tmp_path, f"syn{d_model}"))


def test_log_prob_equals_behaviour_with_large_d_model_2048_features(tmp_path):
    """Features at the real model's width and scale (hidden states with large entries), acted on one by one."""
    ctl = controller(default_space(), d_model=2048, norm_min_ms=100, norm_max_ms=500)
    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(1)
    records = []
    for i in range(24):
        f1, _ = features(ctl, rng, budget=float(rng.uniform(120, 480)), scale=0.02,
                         tier_mask=[True, True, i % 4 != 0])
        t, p = ctl.act_stage1(f1, generator=gen)
        _, f2 = features(ctl, rng, p_idx=p.index, scale=40.0)
        f2.spent_frac = float(rng.uniform(0.05, 0.9))
        k, nb = ctl.act_stage2(f1.budget_ms, f2, generator=gen)
        knobs = ctl.knob_choice(t.index, p.index, k.index, nb.index)
        records.append(make_record(
            sample_id=f"s{i}", group_id=f"s{i}/0", rollout_index=0, worker_id=0, policy_version=0, source="x",
            question_type="q", metric="vqa", budget_ms=f1.budget_ms, lang_feat=f1.lang_feat,
            tier_tokens=f1.tier_tokens, tier_mask=f1.tier_mask, p_mask=f1.p_mask, latency_state=f2.latency_state,
            spent_frac=f2.spent_frac, nb_mask=f2.nb_mask, tier_idx=t.index, p_idx=p.index, top_k_idx=k.index,
            nb_idx=nb.index, logp_tier=t.log_prob, logp_p=p.log_prob, logp_top_k=k.log_prob, logp_nb=nb.log_prob,
            behavior_logp=t.log_prob + p.log_prob + k.log_prob + nb.log_prob, tier=knobs.tier,
            max_crops=knobs.max_crops, p=knobs.p, top_k=knobs.top_k, num_blocks=knobs.num_blocks, num_crops=7,
            vision_tokens=f2.vision_tokens, prompt_tokens=760, answer_tokens=3, latency_ms=200.0,
            **{s: 1.0 for s in ("preprocess_ms", "stage1_ms", "vision_ms", "prefix_ms", "stage2_ms",
                                "prefill_rest_ms", "decode_ms", "decode_ms_per_token", "postprocess_ms")},
            answer="a", accuracy=1.0, reward=1.0, within_budget=True, t_start=1.0, t_end=2.0))
    _check_recomputed(ctl, _roundtrip_rows(records, tmp_path, "wide"))


def test_act_caches_follow_weight_changes(tmp_path):
    """The act path reuses the budget embedding and Stage1 log-probs within a group; an optimizer step or
    set_weights must invalidate them (behaviour log-probs stay exact at zero policy lag)."""
    cfg, tables, backend, ctl = synthetic_setup()
    rf = reward_fn_from_config(cfg.reward)
    samples = synthetic_samples(tables, 8, seed=4)
    trainer = GRPOTrainer(ctl, cfg.grpo, seed=0)
    gen = torch.Generator().manual_seed(0)
    train_local(cfg, backend, trainer, samples, updates=2, seed=0)
    # same sample and budget as a group of the last update: the caches saw the old weights
    res = run_group(backend, samples[0], 150.0, ctl, rf, group_size=4, group_id="a", generator=gen)
    trainer.update([r.to_row() for r in res.records])
    res = run_group(backend, samples[0], 150.0, ctl, rf, group_size=4, group_id="b", generator=gen)
    _check_recomputed(ctl, _roundtrip_rows(res.records, tmp_path, "after_step"))
    # set_weights from another controller
    other = controller(ctl.space, d_model=64, seed=9, norm_min_ms=80, norm_max_ms=400)
    ctl.set_weights(other.get_weights())
    res = run_group(backend, samples[0], 150.0, ctl, rf, group_size=4, group_id="c", generator=gen)
    rows = _roundtrip_rows(res.records, tmp_path, "after_set")
    _check_recomputed(ctl, rows)
    _check_recomputed(other, rows)


def _torch_log_probs(ctl, f1, f2):
    """The learner's torch forward for one request: (tier, p, top_k, nb) log-probs [C] each."""
    with torch.no_grad():
        emb = ctl.budget_embedding(torch.tensor([f1.budget_ms]))
        lt, lp = ctl.stage1_log_probs(torch.from_numpy(f1.lang_feat)[None], emb, torch.tensor([f1.tier_tokens]),
                                      torch.tensor([f1.tier_mask]), torch.tensor([f1.p_mask]))
        lk, ln = ctl.stage2_log_probs(torch.from_numpy(f2.latency_state)[None], emb, torch.tensor([f2.p_idx]),
                                      torch.tensor([f2.vision_tokens]), torch.tensor([f2.spent_frac]),
                                      torch.tensor([f2.nb_mask]))
    return lt[0], lp[0], lk[0], ln[0]


def _numpy_log_probs(ctl, f1, f2):
    """The numpy act path's log-probs (tier, p, top_k, nb) as lists."""
    act = ctl._numpy_act()
    return (*act.sync(ctl, 1).stage1(f1.budget_ms, f1), *act.sync(ctl, 2).stage2(f1.budget_ms, f2))


@pytest.mark.parametrize("d_model", [16, 2048])
def test_numpy_act_path_equals_the_torch_forward(d_model):
    """act_stage1/act_stage2 run numpy mirrors of the stages (the default act path); the log-probs of every
    option equal the torch forward (the learner's recomputation) within 1e-5 for random features, budgets
    (inside and outside the normalisation range), masks, positions, token counts and spent fractions;
    masked options get -inf; greedy = argmax; and the decisions equal the torch act path's draw for draw."""
    ctl = controller(d_model=d_model, seed=3)
    assert ctl.act_impl == "numpy"
    rng = np.random.default_rng(0)
    for i in range(16):
        p_idx = i % len(ctl.space.positions)
        f1, f2 = features(ctl, rng, budget=float(rng.uniform(60, 560)), tier_mask=[True, bool(i % 2), True],
                          p_idx=p_idx, scale=float(rng.uniform(0.01, 40.0)))
        f1.lang_feat += np.float32(rng.normal() * 3)          # an offset: the layer norm must remove it
        f2.vision_tokens, f2.spent_frac = int(rng.integers(0, 3000)), float(rng.uniform(0.0, 1.5))
        refs = _torch_log_probs(ctl, f1, f2)
        for got, ref in zip(_numpy_log_probs(ctl, f1, f2), refs):
            ref = ref.tolist()
            assert len(got) == len(ref)
            for g, r in zip(got, ref):
                assert (g == r == -math.inf) or abs(g - r) < 1e-5, (got, ref)
        for greedy in (True, False):
            decisions = {}
            for impl in ("numpy", "torch"):
                ctl.act_impl = impl
                gen = torch.Generator().manual_seed(i)
                decisions[impl] = (*ctl.act_stage1(f1, greedy=greedy, generator=gen),
                                   *ctl.act_stage2(f1.budget_ms, f2, greedy=greedy, generator=gen))
            ctl.act_impl = "numpy"
            for d, dt, ref in zip(decisions["numpy"], decisions["torch"], refs):
                assert d.index == dt.index and abs(d.log_prob - dt.log_prob) < 1e-5
                assert abs(d.log_prob - float(ref[d.index])) < 1e-5
            if greedy:
                assert [d.index for d in decisions["numpy"]] == [int(r.argmax()) for r in refs]


def test_numpy_act_path_keeps_budgets_and_follows_in_place_changes():
    """More budgets than the act path keeps, revisited in another order, give the same log-probs as a fresh
    controller; in-place weight changes (load_state_dict, a direct edit under no_grad) and `.to()` are seen."""
    ctl = controller(d_model=32, seed=4)
    rng = np.random.default_rng(1)
    reqs = [features(ctl, rng, budget=float(b), p_idx=int(j) % 5) for j, b in enumerate(rng.uniform(90, 510, 150))]

    def run(c, order):
        return {i: _numpy_log_probs(c, *reqs[i]) for i in order}

    first = run(ctl, range(150))
    again = run(ctl, rng.permutation(150))
    assert all(first[i] == again[i] for i in range(150))
    fresh = controller(d_model=32, seed=4)
    assert run(fresh, range(150)) == first
    other = controller(d_model=32, seed=5)
    ctl.load_state_dict(other.state_dict())
    assert run(ctl, range(20)) == run(other, range(20))
    with torch.no_grad():
        ctl.budget_encoder.net[3].bias.add_(0.5)
        ctl.stage2.nb_head.weight.mul_(2.0)
    f1, f2 = reqs[3]

    def check():
        for got, ref in zip(_numpy_log_probs(ctl, f1, f2), _torch_log_probs(ctl, f1, f2)):
            assert max(abs(g - r) for g, r in zip(got, ref.tolist()) if math.isfinite(r)) < 1e-5

    check()
    with torch.no_grad():                                    # the encoder alone, then Stage1 alone
        ctl.budget_encoder.net[0].weight.mul_(1.5)
    check()
    with torch.no_grad():
        ctl.stage1.p_head.bias.add_(torch.arange(5.0))
    check()
    ctl.to(torch.float64).to(torch.float32)                  # new storage for every tensor
    check()
    with torch.no_grad():                                    # a replaced tensor (same version, new storage)
        ctl.stage2.inp.weight.data = ctl.stage2.inp.weight.data * 0.5
    check()
    ctl.load_state_dict(other.state_dict(), assign=True)     # new parameter objects
    assert run(ctl, range(20)) == run(other, range(20))


def test_numpy_act_path_rejects_malformed_features():
    ctl = controller(d_model=16)
    rng = np.random.default_rng(0)
    f1, f2 = features(ctl, rng)
    with pytest.raises(ValueError, match="lang_feat"):
        ctl.act_stage1(Stage1Features(np.zeros(15, np.float32), 200.0, f1.tier_tokens, f1.tier_mask, f1.p_mask))
    with pytest.raises(ValueError, match="tier_tokens"):
        ctl.act_stage1(Stage1Features(f1.lang_feat, 200.0, [412, 740], f1.tier_mask, f1.p_mask))
    with pytest.raises(ValueError, match="no feasible option"):
        ctl.act_stage1(Stage1Features(f1.lang_feat, 200.0, f1.tier_tokens, [False] * 3, f1.p_mask))
    with pytest.raises(ValueError, match="latency_state"):
        ctl.act_stage2(200.0, Stage2Features(np.zeros(1, np.float32), 0, 740, 0.3, f2.nb_mask))
    with pytest.raises(ValueError, match="p_idx"):
        ctl.act_stage2(200.0, Stage2Features(f2.latency_state, 5, 740, 0.3, f2.nb_mask))
    with pytest.raises(ValueError, match="mask"):
        ctl.act_stage2(200.0, Stage2Features(f2.latency_state, 0, 740, 0.3, f2.nb_mask[:-1]))


def test_budget_token_numpy_equals_torch():
    ctl = controller(d_model=2048, token_rms=0.0173, token_seed=3)
    for b in (1.0, 120.0, 233.3, 499.0, 10_000.0):
        tok = ctl.budget_token_embedding(b)
        ctl.act_impl = "torch"
        ref = ctl.budget_token_embedding(b)
        ctl.act_impl = "numpy"
        assert tok.dtype == torch.float32 and tok.shape == (2048,)
        assert float((tok - ref).abs().max()) < 1e-5 * 0.0173 * 10
        tok.add_(1.0)                                       # a fresh tensor: the kept token is untouched
        assert torch.equal(ctl.budget_token_embedding(b), ctl.budget_token_embedding(b))
        assert float((ctl.budget_token_embedding(b) - ref).abs().max()) < 1e-5


# ----------------------------------------------------------------------------------------------
# Weights as numpy
# ----------------------------------------------------------------------------------------------
def test_get_set_weights_round_trip():
    a, b = controller(seed=1), controller(seed=2)
    w = a.get_weights()
    assert all(isinstance(v, np.ndarray) for v in w.values())
    assert "budget_token.proj" in w and "budget_encoder.net.0.weight" in w
    rng = np.random.default_rng(0)
    f1, f2 = features(a, rng)
    assert a.act_stage1(f1, greedy=True) != b.act_stage1(f1, greedy=True) or \
        a.act_stage2(200.0, f2, greedy=True) != b.act_stage2(200.0, f2, greedy=True)
    b.set_weights(w)
    for k, v in b.state_dict().items():
        assert np.array_equal(v.numpy(), w[k]), k
    assert a.act_stage1(f1, greedy=True) == b.act_stage1(f1, greedy=True)
    assert a.act_stage2(200.0, f2, greedy=True) == b.act_stage2(200.0, f2, greedy=True)
    w["stage1.inp.weight"][:] = 0.0                       # a copy: mutating it leaves the controller alone
    assert float(a.stage1.inp.weight.abs().sum()) > 0


def test_set_weights_mismatch_errors():
    ctl = controller()
    w = ctl.get_weights()
    missing = {k: v for k, v in w.items() if k != "stage2.nb_head.bias"}
    with pytest.raises(ValueError, match="missing.*stage2.nb_head.bias"):
        ctl.set_weights(missing)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        ctl.set_weights({**w, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="wrong shapes.*stage1.inp.weight"):
        ctl.set_weights({**w, "stage1.inp.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError):                       # another d_model
        ctl.set_weights(controller(d_model=32).get_weights())


# ----------------------------------------------------------------------------------------------
# Budgets and the sinusoidal code
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 0, None, "abc", [1.0]])
def test_check_budget_ms_rejects_invalid_budgets(bad):
    with pytest.raises(ValueError, match="budget_ms"):
        check_budget_ms(bad)


def test_invalid_budgets_are_refused_by_every_entry_point():
    ctl = controller()
    rng = np.random.default_rng(0)
    for bad in (float("nan"), 0.0, -5.0, float("inf")):
        f1, f2 = features(ctl, rng, budget=bad)
        with pytest.raises(ValueError, match="budget_ms"):
            ctl.act_stage1(f1)
        with pytest.raises(ValueError, match="budget_ms"):
            ctl.act_stage2(bad, f2)
        with pytest.raises(ValueError, match="budget_ms"):
            ctl.budget_token_embedding(bad)


def test_check_budget_ms_accepts_positive_numbers():
    assert check_budget_ms(250) == 250.0 and isinstance(check_budget_ms(250), float)
    assert check_budget_ms(np.float32(0.5)) == 0.5
    assert check_budget_ms("120.5") == 120.5


def test_sinusoidal_code_shape_range_and_act_path_equality():
    b = torch.linspace(0, 1, 101)
    code = sinusoidal_code(b, 256)
    assert code.shape == (101, 256) and float(code.abs().max()) <= 1.0
    assert torch.cdist(code, code).add(torch.eye(101) * 10).min() > 0.05   # distinct budgets, distinct codes
    # one request at a time (chunked on the act path) gives the same values as a batch
    for i in (0, 37, 100):
        assert torch.equal(sinusoidal_code(b[i:i + 1], 256), code[i:i + 1])
    with pytest.raises(ValueError, match="even"):
        sinusoidal_code(b, 7)


def test_uniform_stream_draws_blocks_from_its_generator():
    """A UniformStream hands out the generator's uniforms a block at a time (one torch call per block),
    deterministically by seed; the act path samples with them exactly as with explicit draws."""
    from shared.controller import UniformStream, _draw

    ref = torch.rand(8, generator=torch.Generator().manual_seed(4)).tolist()
    s = UniformStream(torch.Generator().manual_seed(4), block=4)
    got = [s.pair() for _ in range(4)]
    assert got == [(ref[3], ref[2]), (ref[1], ref[0]), (ref[7], ref[6]), (ref[5], ref[4])]
    with pytest.raises(ValueError, match="block"):
        UniformStream(block=1)
    ctl = controller(seed=2)
    rng = np.random.default_rng(1)
    for i in range(6):
        f1, f2 = features(ctl, rng, p_idx=i % len(ctl.space.positions))
        stream = UniformStream(torch.Generator().manual_seed(i), block=6)
        mirror = UniformStream(torch.Generator().manual_seed(i), block=6)
        d = (*ctl.act_stage1(f1, generator=stream), *ctl.act_stage2(f1.budget_ms, f2, generator=stream))
        lt, lp = ctl.act_arrays(1).stage1(f1.budget_ms, f1)
        lk, ln = ctl.act_arrays(2).stage2(f1.budget_ms, f2)
        u = [*mirror.pair(), *mirror.pair()]
        want = [_draw(lt, u[0]), _draw(lp, u[1]), _draw(lk, u[2]), _draw(ln, u[3])]
        assert [x.index for x in d] == [w.index for w in want]
