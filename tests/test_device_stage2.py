"""Stage2 decided on the device (rollout_workers/device_stage2.py) against the host act path.

The decision must be the host path's for the same features and uniforms: the same indices, log-probs
within float32 round-off, the spent fraction from the clock stamps and the charged time. On CPU the
maths and the request path's plumbing run uncompiled without graphs; on a GPU (marked `gpu`) with the
clock stamped in the stream, the decision captured as a CUDA graph, compiled or not, and the spent
fraction compared with the timer's CUDA events.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rollout_workers.device_stage2 import S_MASK, DeviceStage2, stage2_decide
from shared.controller import Stage2Features, TwoStageController, _draw
from shared.knobs import KnobSpace


def _space() -> KnobSpace:
    """The default knob space's shape (5 positions, top_k 4..8, 12..16 blocks; a real num_blocks mask)."""
    return KnobSpace(("low", "medium", "high"), (3, 6, 12), (1, 2, 3, 4, 5), (4, 5, 6, 7, 8), (12, 13, 14, 15, 16),
                     16, 64, 8)


def _controller(d_model: int, seed: int, sharpen: float = 4.0, stage: int = 2) -> TwoStageController:
    """A random controller with larger head weights in `stage`, so that every head of it has unequal, non-flat
    probabilities (also used by tests/test_device_stage1.py)."""
    torch.manual_seed(seed)
    ctl = TwoStageController(_space(), d_model)
    heads = (ctl.stage2.top_k_head, ctl.stage2.nb_head) if stage == 2 else (ctl.stage1.tier_head, ctl.stage1.p_head)
    with torch.no_grad():
        for head in heads:
            head.weight.mul_(sharpen)
            head.bias.normal_()
    return ctl


def _host_decision(ctl, budget_ms, f2: Stage2Features, uniforms):
    """The host act path's decision for the same features and uniforms (None = greedy)."""
    lk, ln = ctl.act_arrays(2).stage2(budget_ms, f2)
    if uniforms is None:
        return [max(range(len(v)), key=v.__getitem__) for v in (lk, ln)], (lk, ln)
    return [_draw(lk, uniforms[0]).index, _draw(ln, uniforms[1]).index], (lk, ln)


def _check_against_host(ds: DeviceStage2, ctl, rng, n: int, device: str, dtype=torch.float32) -> int:
    """Random requests through prepare/start/queue/result; returns how many sampled decisions differed
    from the greedy ones (the draws must actually draw)."""
    space = ctl.space
    not_argmax = 0
    for i in range(n):
        budget = float(rng.choice([90.0, 180.0, 333.0]))          # repeated budgets: the kept term is reused
        ds.prepare(ctl, budget)
        p_idx = int(rng.integers(0, len(space.positions)))
        p = space.positions[p_idx]
        state = torch.tensor(rng.standard_normal(ctl.d_model) * rng.uniform(0.1, 30) + rng.normal(),
                             dtype=torch.float32, device=device).to(dtype)
        vision = int(rng.integers(0, 3000))
        charged = float(rng.uniform(0, 40))
        uniforms = None if i % 4 == 0 else [float(u) for u in rng.random(2)]
        ds.start()
        ds.queue(state, p_idx=p_idx, vision_tokens=vision, charged_ms=charged, budget_ms=budget, uniforms=uniforms,
                 nb_mask=space.num_blocks_feasible(p))
        k, lp_k, nb, lp_nb, spent, elapsed = ds.result()
        ds.queue_state_copy()
        if device == "cuda":
            torch.cuda.synchronize()
        recorded = ds.latency_state()
        np.testing.assert_array_equal(recorded, state.float().cpu().numpy())
        assert elapsed >= charged and spent == pytest.approx(elapsed / budget, rel=1e-5)
        f2 = Stage2Features(latency_state=recorded, p_idx=p_idx, vision_tokens=vision, spent_frac=spent,
                            nb_mask=space.num_blocks_feasible(p))
        (hk, hnb), (lk, ln) = _host_decision(ctl, budget, f2, uniforms)
        assert (k, nb) == (hk, hnb), (i, uniforms, lk, ln)
        assert space.num_blocks_feasible(p)[nb]
        assert lp_k == pytest.approx(lk[k], abs=1e-5) and lp_nb == pytest.approx(ln[nb], abs=1e-5)
        if uniforms is not None:
            greedy = _host_decision(ctl, budget, f2, None)[0]
            not_argmax += (k, nb) != tuple(greedy)
    return not_argmax


def test_decision_equals_the_host_act_path_on_cpu():
    ctl = _controller(d_model=64, seed=1)
    ds = DeviceStage2(torch.device("cpu"), ctl.space, torch.float32, 64)
    assert not ds.use_graph
    assert _check_against_host(ds, ctl, np.random.default_rng(0), 60, "cpu") > 5


def test_spent_fraction_comes_from_the_stamps_and_the_charged_time():
    """Explicit stamps: spent = ((t1 - t0) ns + charged ms) / budget; the same maths as the host path at that
    spent fraction, also at the top of the draw (u close to 1) and with masked num_blocks options."""
    ctl = _controller(d_model=32, seed=2)
    ds = DeviceStage2(torch.device("cpu"), ctl.space, torch.float32, 32)
    budget = 120.0
    ds.prepare(ctl, budget)
    act = ctl.act_arrays(2)
    state = torch.randn(32)
    for p_idx, elapsed_ns, charged, u in ((3, 7_250_000, 31.5, (0.2, 0.7)), (4, 55_000_000, 0.0, (0.999999, 0.0)),
                                          (0, 1_000, 2.0, (0.5, 0.999999))):
        scal = torch.zeros(S_MASK + 5)
        nb_mask = ctl.space.num_blocks_feasible(ctl.space.positions[p_idx])
        scal[:7] = torch.tensor([p_idx, 900, charged, budget, u[0], u[1], 0.0])
        scal[S_MASK:] = torch.tensor(nb_mask, dtype=torch.float32)
        w = ds._weights.w
        out = stage2_decide(state, scal, torch.tensor([10, 10 + elapsed_ns]), w["w_in"], w["base"], w["later1"],
                            w["heads"], ds.freqs, *ds._weights.consts, 5).tolist()
        spent = (elapsed_ns * 1e-6 + charged) / budget
        assert out[4] == pytest.approx(spent, rel=1e-6) and out[5] == pytest.approx(elapsed_ns * 1e-6 + charged)
        f2 = Stage2Features(state.numpy(), p_idx, 900, float(out[4]), nb_mask)
        (hk, hnb), (lk, ln) = _host_decision(ctl, budget, f2, list(u))
        assert (int(out[0]), int(out[2])) == (hk, hnb)
        assert out[1] == pytest.approx(lk[hk], abs=1e-5) and out[3] == pytest.approx(ln[hnb], abs=1e-5)
        assert act is ctl.act_arrays(2)


def test_new_weights_and_budgets_reach_the_device_copies():
    """set_weights (a new policy version) and an in-place optimizer-like edit are uploaded at the next
    prepare; a new budget changes the kept first-layer term; queue() before prepare() is refused."""
    ctl = _controller(d_model=32, seed=3)
    other = _controller(d_model=32, seed=4)
    ds = DeviceStage2(torch.device("cpu"), ctl.space, torch.float32, 32)
    with pytest.raises(RuntimeError, match="prepare"):
        ds.queue(torch.zeros(32), p_idx=0, vision_tokens=1, charged_ms=0.0, budget_ms=100.0, uniforms=None,
                 nb_mask=[True] * 5)
    ds.prepare(ctl, 100.0)
    with pytest.raises(RuntimeError, match="set_inputs"):
        ds.queue(torch.zeros(32))
    rng = np.random.default_rng(5)
    _check_against_host(ds, ctl, rng, 8, "cpu")
    ctl.set_weights(other.get_weights())
    _check_against_host(ds, ctl, rng, 8, "cpu")
    with torch.no_grad():
        ctl.stage2.inp.weight.add_(0.3)
        ctl.budget_encoder.net[0].bias.add_(1.0)
    _check_against_host(ds, ctl, rng, 8, "cpu")


def test_request_path_decides_stage2_on_the_device_on_cpu(tmp_path):
    """RequestEngine(device_stage2=True) on the tiny model: the decisions are the host act path's for the
    recorded features and the generator's draws, the recorded state is the eager path's for the same knobs."""
    from rollout_workers.molmoe.loader import load_molmoe
    from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
    from rollout_workers.request_path import RequestEngine
    from shared.knobs import ImportanceScores
    from tests.test_fast_engine import QUESTION, _png

    bundle = load_molmoe(make_tiny_checkpoint(tmp_path / "tiny", seed=3), torch.device("cpu"))
    cfg = bundle.model.config
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                      tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    importance = ImportanceScores(tuple(float(x) for x in np.random.default_rng(0).random(L)))
    dev = RequestEngine(bundle.model, bundle.preprocessor, space, importance, device_stage2=True)
    host = RequestEngine(bundle.model, bundle.preprocessor, space, importance, device_stage2=False)
    assert dev.stage2_on_device is not None and host.stage2_on_device is None
    torch.manual_seed(0)
    ctl = TwoStageController(space, cfg.d_model, token_rms=dev.token_rms())
    image = _png(200, 100, seed=2)
    seen = set()
    for seed in range(8):
        r = dev.serve(image, QUESTION, 40.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=3)
        gen = torch.Generator().manual_seed(seed)
        torch.rand(2, generator=gen)                                        # Stage1's draws
        uniforms = torch.rand(2, generator=gen).tolist()
        (hk, hnb), (lk, ln) = _host_decision(ctl, 40.0, r.stage2, uniforms)
        assert (r.top_k.index, r.num_blocks.index) == (hk, hnb)
        assert r.top_k.log_prob == pytest.approx(lk[hk], abs=1e-5)
        assert r.num_blocks.log_prob == pytest.approx(ln[hnb], abs=1e-5)
        assert 0 < r.stage2.spent_frac * 40.0 <= r.latency_ms
        ref = host.serve(image, QUESTION, 40.0, ctl, fixed=r.knobs, max_new_tokens=3)
        np.testing.assert_allclose(r.stage2.latency_state, ref.stage2.latency_state, atol=1e-5)
        assert r.answer_ids == ref.answer_ids
        seen.add((r.top_k.index, r.num_blocks.index))
    assert len(seen) > 1
    g = dev.serve(image, QUESTION, 40.0, ctl, greedy=True, max_new_tokens=2)
    (gk, gnb), _ = _host_decision(ctl, 40.0, g.stage2, None)
    assert (g.top_k.index, g.num_blocks.index) == (gk, gnb)


gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                              reason="needs a CUDA GPU with Triton")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("compile", [False, True])
def test_decision_equals_the_host_act_path_on_cuda_graph(compile):
    """The captured decision (clock stamp, MLP, draw) at d_model 2048 in bf16 state, as the request path runs it."""
    ctl = _controller(d_model=2048, seed=1)
    ds = DeviceStage2(torch.device("cuda"), ctl.space, torch.bfloat16, 2048, compile=compile)
    assert ds.use_graph
    assert _check_against_host(ds, ctl, np.random.default_rng(0), 40, "cuda", torch.bfloat16) > 3
    assert ds.captured == 2           # the start stamp and the decision, once each


@pytest.mark.gpu
@gpu_only
def test_request_path_on_cuda_spent_fraction_matches_the_events(tmp_path):
    """On CUDA the request path decides Stage2 on the device by default; its elapsed time (GPU clock stamps,
    taken after the prefix and before the decision) lies between the timer's CUDA-event time up to the end of
    the prefix and up to the end of Stage2 (within 0.05 ms: the start stamp follows the first event), and the
    decisions are the host path's for the recorded features and draws. (With the tiny model the GPU finishes
    the prefix before the host has queued the decision, so the stamp also counts that host time, as the
    budget's clock should.)"""
    from rollout_workers.molmoe.loader import load_molmoe
    from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
    from rollout_workers.request_path import RequestEngine
    from shared.knobs import ImportanceScores
    from tests.test_fast_engine import QUESTION, _png

    bundle = load_molmoe(make_tiny_checkpoint(tmp_path / "tiny", seed=3), torch.device("cuda"))
    cfg = bundle.model.config
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                      tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    eng = RequestEngine(bundle.model, bundle.preprocessor, space, ImportanceScores.by_index(L))
    assert eng.stage2_on_device is not None
    torch.manual_seed(0)
    ctl = TwoStageController(space, cfg.d_model, token_rms=eng.token_rms())
    image = _png(200, 100, seed=2)
    eng.serve(image, QUESTION, 40.0, ctl, max_new_tokens=2)                                    # capture
    worst = 0.0
    for seed in range(6):
        r = eng.serve(image, QUESTION, 40.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=3)
        to_prefix = sum(r.segments_ms[s] for s in ("preprocess_ms", "stage1_ms", "vision_ms", "prefix_ms"))
        elapsed = r.stage2.spent_frac * 40.0
        outside = max(to_prefix - elapsed, elapsed - (to_prefix + r.segments_ms["stage2_ms"]), 0.0)
        print(f"elapsed {elapsed:.4f} ms; events: to the prefix {to_prefix:.4f}, + stage2 "
              f"{r.segments_ms['stage2_ms']:.4f}")
        worst = max(worst, outside)
        gen = torch.Generator().manual_seed(seed)
        torch.rand(2, generator=gen)
        (hk, hnb), (lk, _) = _host_decision(ctl, 40.0, r.stage2, torch.rand(2, generator=gen).tolist())
        assert (r.top_k.index, r.num_blocks.index) == (hk, hnb)
        assert r.top_k.log_prob == pytest.approx(lk[hk], abs=1e-5)
    print(f"elapsed outside [events to the prefix, events to the end of stage2]: worst {worst * 1e3:.1f} us")
    assert worst < 0.05
