"""The request path on a tiny random MolmoE (float32, CPU): budget token invisible to the answer,
KV cache correct with skipped blocks, fixed knobs equal to the model's own forward, timers."""
from __future__ import annotations

import copy
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_workers.molmoe.loader import load_molmoe
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
from rollout_workers.request_path import SEGMENT_ORDER, RequestEngine
from rollout_workers.timers import SegmentTimer, timer_overhead_us
from shared.backend import SampleError
from shared.controller import TwoStageController
from shared.knobs import ImportanceScores, KnobChoice, KnobError, KnobSpace, select_blocks

QUESTION = "what colour is the small circle"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)
    m = load_molmoe(folder)
    cfg = m.model.config
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                      tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    importance = ImportanceScores(tuple(float(x) for x in np.random.default_rng(0).random(L)))
    engine = RequestEngine(m.model, m.preprocessor, space, importance)
    torch.manual_seed(0)
    ctl = TwoStageController(space, cfg.d_model, token_rms=engine.token_rms())
    return m, engine, ctl


def _png(w=160, h=120, seed=0) -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _all_choices(space: KnobSpace):
    for t, p, k, nb in itertools.product(range(space.num_tiers), space.positions, space.top_ks, space.num_blocks):
        if p < nb:
            yield KnobChoice(space.tier_names[t], space.tier_max_crops[t], p, k, nb)


def test_budget_token_does_not_change_any_step(tiny):
    """For random knob settings at every p: every generated step's logits equal the plain path's."""
    m, engine, ctl = tiny
    rng = np.random.default_rng(1)
    choices = list(_all_choices(engine.space))
    image = _png()
    for p in engine.space.positions:
        at_p = [c for c in choices if c.p == p]
        for idx in rng.choice(len(at_p), size=min(3, len(at_p)), replace=False):
            fixed = at_p[idx]
            a = engine.serve(image, QUESTION, 300.0, ctl, fixed=fixed, return_logits=True, max_new_tokens=5)
            b = engine.serve(image, QUESTION, 300.0, None, fixed=fixed, return_logits=True, max_new_tokens=5)
            assert a.answer_ids == b.answer_ids
            assert len(a.step_logits) == len(b.step_logits) >= 1
            diff = max(float((x - y).abs().max()) for x, y in zip(a.step_logits, b.step_logits))
            assert diff < 1e-4, (fixed, diff)


def test_fixed_knobs_match_model_forward(tiny):
    """Fixed knobs give the same tokens as the model's own cached greedy decode with the same settings."""
    m, engine, ctl = tiny
    image = _png(200, 100, seed=2)
    for fixed in (KnobChoice("high", 4, 1, engine.space.top_ks[-1], engine.space.num_blocks[-1]),
                  KnobChoice("low", 1, 2, 1, 3)):
        got = engine.serve(image, QUESTION, 300.0, ctl, fixed=fixed, max_new_tokens=6)
        inp = m.preprocessor.preprocess(QUESTION, m.preprocessor.load_image(image), max_crops=fixed.max_crops)
        ids = select_blocks(fixed.p, fixed.num_blocks, engine.importance.scores)
        ref = m.model.greedy_generate(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx,
                                      max_new_tokens=6, block_ids=ids,
                                      top_k={b: fixed.top_k for b in ids if b >= fixed.p})
        assert got.answer_ids == ref
        assert got.block_ids == ids


def test_full_compute_answer_equals_plain_model(tiny):
    """With all knobs at maximum the answer equals the unmodified model's answer."""
    m, engine, ctl = tiny
    image = _png(seed=4)
    full = engine.space.full_compute()
    got = engine.serve(image, QUESTION, 300.0, ctl, fixed=full, max_new_tokens=8)
    inp = m.preprocessor.preprocess(QUESTION, m.preprocessor.load_image(image), max_crops=full.max_crops)
    ref = m.model.greedy_generate(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx, max_new_tokens=8)
    assert got.answer_ids == ref


@pytest.mark.parametrize("block_ids", [[1, 2, 3], [0, 2], [2, 3], [0, 1, 2, 3]])
def test_cached_decode_equals_full_recompute(tiny, block_ids):
    """KV cache with skipped blocks (block 0 included) equals recomputing the whole sequence each step."""
    m, _, _ = tiny
    model = m.model
    inp = m.preprocessor.preprocess(QUESTION, m.preprocessor.load_image(_png(seed=5)), max_crops=2)
    cached = model.greedy_generate(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx,
                                   max_new_tokens=5, block_ids=block_ids, top_k=1)
    ids = inp.input_ids.clone()
    recomputed = []
    with torch.no_grad():
        for _ in range(len(cached)):
            logits = model(ids, inp.images, inp.image_masks, inp.image_input_idx, block_ids=block_ids, top_k=1)
            nxt = int(logits[0, -1].argmax())
            recomputed.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
    assert cached == recomputed


def test_controller_path_records_features_and_timings(tiny):
    m, engine, ctl = tiny
    gen = torch.Generator().manual_seed(0)
    r = engine.serve(_png(seed=6), QUESTION, 250.0, ctl, generator=gen, max_new_tokens=4)
    assert set(SEGMENT_ORDER) <= set(r.segments_ms)
    assert all(v >= 0 for v in r.segments_ms.values())
    assert abs(sum(r.segments_ms.values()) - r.latency_ms) < 1e-6 * max(1.0, r.latency_ms) + 1e-3
    assert r.latency_ms <= r.host_latency_ms + 1.0
    assert r.stage2.latency_state.shape == (m.model.config.d_model,)
    assert 0 < r.stage2.spent_frac < r.latency_ms / 250.0 + 1e-9
    assert r.num_crops >= 2 and r.vision_tokens > 0
    assert r.tier.log_prob <= 0 and r.top_k.log_prob <= 0
    # the recorded behaviour log-prob is what the controller recomputes from the recorded features
    batch = {"lang_feat": torch.tensor(r.stage1.lang_feat)[None], "budget_ms": torch.tensor([250.0]),
             "tier_tokens": torch.tensor([r.stage1.tier_tokens], dtype=torch.float32),
             "tier_mask": torch.tensor([r.stage1.tier_mask]), "p_mask": torch.tensor([r.stage1.p_mask]),
             "latency_state": torch.tensor(r.stage2.latency_state)[None],
             "vision_tokens": torch.tensor([float(r.stage2.vision_tokens)]),
             "spent_frac": torch.tensor([r.stage2.spent_frac]), "nb_mask": torch.tensor([r.stage2.nb_mask]),
             "tier_idx": torch.tensor([r.tier.index]), "p_idx": torch.tensor([r.p.index]),
             "top_k_idx": torch.tensor([r.top_k.index]), "nb_idx": torch.tensor([r.num_blocks.index])}
    logp = ctl.log_prob(batch)[0]
    total = r.tier.log_prob + r.p.log_prob + r.top_k.log_prob + r.num_blocks.log_prob
    assert abs(float(logp[0]) - total) < 1e-5


def test_bad_inputs_are_sample_errors(tiny):
    _, engine, ctl = tiny
    with pytest.raises(SampleError, match="bad image"):
        engine.serve(b"not an image", QUESTION, 200.0, ctl)
    with pytest.raises(SampleError, match="empty question"):
        engine.serve(_png(), "   ", 200.0, ctl)
    for bad in (float("nan"), float("inf"), -5.0, 0.0):
        with pytest.raises(ValueError, match="budget_ms"):
            engine.serve(_png(), QUESTION, bad, ctl)


def test_timer_segments_and_overhead():
    t = SegmentTimer("cpu")
    t.mark("a")
    t.mark("b")
    t.mark("a")
    seg = t.finish()
    assert set(seg) == {"a", "b"} and abs(sum(seg.values()) - t.total_ms()) < 1e-9
    assert 0 < timer_overhead_us("cpu", 200) < 1000


def test_budget_token_kept_on_the_device_per_budget_and_weights(tiny):
    """The last budget token is reused for the same budget and controller weights (a group shares its
    budget) and recomputed when either changes."""
    m, engine, ctl = tiny
    ctl = copy.deepcopy(ctl)
    a = engine._budget_token_on_device(ctl, 200.0)
    assert engine._budget_token_on_device(ctl, 200.0) is a
    torch.testing.assert_close(a, ctl.budget_token_embedding(200.0).to(a.dtype))
    b = engine._budget_token_on_device(ctl, 260.0)
    assert b is not a
    torch.testing.assert_close(b, ctl.budget_token_embedding(260.0).to(b.dtype))
    w = ctl.get_weights()
    w["budget_token.target_rms"] = w["budget_token.target_rms"] * 2
    ctl.set_weights(w)                                  # new weights: the kept token is stale
    c = engine._budget_token_on_device(ctl, 260.0)
    torch.testing.assert_close(c, 2 * b)
    other = copy.deepcopy(ctl)                          # another controller, same budget: not reused
    assert engine._budget_token_on_device(other, 260.0) is not c


def test_select_blocks_memo_returns_fresh_lists():
    scores = (0.1, 0.9, 0.5, 0.7, 0.2)
    a = select_blocks(1, 3, scores)
    a.append(99)
    assert select_blocks(1, 3, scores) == [0, 1, 3]
    assert select_blocks(1, 3, [0.1, 0.9, 0.5, 0.7, 0.2]) == [0, 1, 3]       # a list of the same scores
    with pytest.raises(KnobError):
        select_blocks(3, 3, scores)


def test_engine_refuses_mismatched_space(tiny):
    m, engine, _ = tiny
    cfg = m.model.config
    wrong = KnobSpace(("low",), (1,), (1,), (1,), (cfg.n_layers - 1,), cfg.n_layers - 1, cfg.num_experts, cfg.top_k)
    with pytest.raises(ValueError, match="blocks"):
        RequestEngine(m.model, m.preprocessor, wrong, ImportanceScores.by_index(cfg.n_layers))


def test_timer_charge_counts_in_segments_total_and_elapsed():
    t = SegmentTimer("cpu")
    t.charge("a", 5.0)
    t.mark("a")
    assert t.elapsed_ms() >= 5.0
    t.mark("b")
    seg = t.finish()
    assert seg["a"] >= 5.0 and abs(sum(seg.values()) - t.total_ms()) < 1e-9
    assert [name for name, _ in t.deltas] == ["a", "b"] and t.deltas[0][1] < 5.0


def test_group_preprocess_reuse_same_answers_and_charged_latency(tiny):
    """A group's later requests on the same bytes object reuse the first one's preprocessing: the same
    tokens and logits as fresh preprocessing, and its measured time is charged to each of them."""
    m, engine, ctl = tiny
    shared = RequestEngine(m.model, m.preprocessor, engine.space, engine.importance, reuse_preprocess=True)
    image = _png(200, 140, seed=9)
    fixed = [KnobChoice("high", engine.space.tier_max_crops[2], 1, 2, 3),
             KnobChoice("low", engine.space.tier_max_crops[0], 2, 1, 4)]
    first = shared.serve(image, QUESTION, 250.0, None, fixed=fixed[0], max_new_tokens=3, return_logits=True)
    assert shared.preprocess_reused == 0
    for knobs in fixed + fixed:
        again = shared.serve(image, QUESTION, 250.0, None, fixed=knobs, max_new_tokens=3, return_logits=True)
        fresh = engine.serve(image, QUESTION, 250.0, None, fixed=knobs, max_new_tokens=3, return_logits=True)
        assert again.answer_ids == fresh.answer_ids
        assert all(torch.equal(a, b) for a, b in zip(again.step_logits, fresh.step_logits))
        assert again.stage1.tier_tokens == fresh.stage1.tier_tokens
        np.testing.assert_array_equal(again.stage1.lang_feat, fresh.stage1.lang_feat)
        assert abs(sum(again.segments_ms.values()) - again.latency_ms) < 1e-6 * again.latency_ms + 1e-3
    assert shared.preprocess_reused == 4
    # the charged preprocessing is what the first request measured for the same tier
    memo = shared._memo
    high = memo.crops[engine.space.tier_max_crops[2]][1]
    assert first.segments_ms["preprocess_ms"] == pytest.approx(memo.part1_ms + high, rel=1e-9)
    assert first.preprocess_parts_ms == pytest.approx((memo.part1_ms, high), rel=1e-9)
    again = shared.serve(image, QUESTION, 250.0, None, fixed=fixed[0], max_new_tokens=3)
    assert again.segments_ms["preprocess_ms"] >= memo.part1_ms + high
    # the parts carry the charged times, and add up to the segment
    assert again.preprocess_parts_ms[0] >= memo.part1_ms and again.preprocess_parts_ms[1] >= high
    assert sum(again.preprocess_parts_ms) == pytest.approx(again.segments_ms["preprocess_ms"], rel=1e-9)
    # an equal copy of the bytes, another question, or the controlled path with a new image: no reuse
    n = shared.preprocess_reused
    shared.serve(bytes(bytearray(image)), QUESTION, 250.0, None, fixed=fixed[0], max_new_tokens=2)
    shared.serve(image, QUESTION + " now", 250.0, None, fixed=fixed[0], max_new_tokens=2)
    assert shared.preprocess_reused == n
    gen = torch.Generator().manual_seed(0)
    other = _png(seed=10)
    a = shared.serve(other, QUESTION, 250.0, ctl, generator=gen, max_new_tokens=2)
    b = shared.serve(other, QUESTION, 250.0, ctl, generator=gen, max_new_tokens=2)
    assert shared.preprocess_reused == n + 1
    assert b.stage2.spent_frac * 250.0 >= shared._memo.part1_ms
    assert a.stage1.tier_tokens == b.stage1.tier_tokens
