"""RequestEngine(early_rest_prefill=True): with Stage2 on the device and the fast engine (top_k as device data),
Stage2's top_k is written into the blocks' device memory and the blocks that run under every num_blocks option
are queued before the host reads the decision. The tokens and logits of the plain path with the knobs it chose
(CPU, tiny model, unpadded and padded prefill; CUDA graphs with `-m gpu`); the engine's record of the device
top_k stays right for later requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout_workers.fast_engine import FastEngine
from rollout_workers.molmoe.loader import load_molmoe
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
from rollout_workers.request_path import RequestEngine
from shared.controller import TwoStageController
from shared.knobs import ImportanceScores, KnobChoice, KnobSpace
from tests.test_fast_engine import QUESTION, _png


def _tiny(tmp_path, device: str = "cpu"):
    """The tiny model and a knob space covering every p, top_k and num_blocks."""
    bundle = load_molmoe(make_tiny_checkpoint(tmp_path / "tiny", seed=3), torch.device(device))
    cfg = bundle.model.config
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                      tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    return bundle, cfg, space


def _engines(tmp_path, importance_kind: str, **fast_kwargs):
    bundle, cfg, space = _tiny(tmp_path)
    L = cfg.n_layers
    importance = (ImportanceScores.by_index(L) if importance_kind == "by_index"
                  else ImportanceScores(tuple(float(x) for x in np.random.default_rng(0).random(L))))

    def engine(early: bool) -> RequestEngine:
        return RequestEngine(bundle.model, bundle.preprocessor, space, importance, device_stage2=True,
                             executor=FastEngine(bundle.model, max_len=256, **fast_kwargs), early_rest_prefill=early)

    torch.manual_seed(0)
    ctl = TwoStageController(space, cfg.d_model, token_rms=engine(False).token_rms())
    return engine(True), engine(False), ctl, space


@pytest.mark.parametrize("importance_kind,padded", [("by_index", False), ("random", False), ("by_index", True)])
def test_same_decisions_tokens_and_logits(tmp_path, importance_kind, padded):
    """`padded`: prompts padded to the length bucket and the prefill continued in place, as the CUDA graphs run."""
    early, ref, ctl, space = _engines(tmp_path, importance_kind,
                                      **(dict(prefill_bucket=48, pad_prefill=True) if padded else {}))
    image = _png(200, 100, seed=2)
    seen = set()
    for seed in range(10):
        # the decision depends on the measured spent fraction, so the reference is the plain path with the knobs
        # the early path chose (the budget-token path gives the plain path's logits: tests/test_request_path.py)
        a = early.serve(image, QUESTION, 40.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=4,
                        return_logits=True, stop_at_eos=False)
        b = ref.serve(image, QUESTION, 40.0, None, fixed=a.knobs, max_new_tokens=4, return_logits=True,
                      stop_at_eos=False)
        assert a.block_ids == b.block_ids and a.answer_ids == b.answer_ids
        assert max(float((x - y).abs().max()) for x, y in zip(a.step_logits, b.step_logits)) < 1e-4
        assert abs(sum(a.segments_ms.values()) - a.latency_ms) < 1e-6 * a.latency_ms + 1e-3
        assert a.segments_ms["stage2_ms"] >= 0.0
        seen.add((a.knobs.p, a.knobs.top_k, a.knobs.num_blocks))
        # the engine's record of each block's device top_k is the device's value (or unknown: -1)
        fast = early.executor
        assert all(h in (-1, int(t)) for h, t in zip(fast._top_k_host, fast._top_k)), (fast._top_k_host, a.knobs)
    assert len(seen) > 2
    if importance_kind == "by_index":            # the most important block after p is p itself
        assert early.early_blocks_queued >= 10
    assert ref.early_blocks_queued == 0
    c = ref.serve(image, QUESTION, 40.0, ctl, generator=torch.Generator().manual_seed(0), max_new_tokens=2)
    assert ref.early_blocks_queued == 0 and c.answer_ids            # off when asked
    # the device top_k the early path wrote is what the engine records: a later plain request with other knobs
    # gives a fresh engine's logits
    for fixed in (KnobChoice("low", space.tier_max_crops[0], 1, 1, 3),
                  KnobChoice("high", space.tier_max_crops[2], 2, space.top_ks[-1], space.num_layers)):
        a = early.serve(image, QUESTION, 40.0, None, fixed=fixed, max_new_tokens=3, return_logits=True)
        b = ref.serve(image, QUESTION, 40.0, None, fixed=fixed, max_new_tokens=3, return_logits=True)
        assert a.answer_ids == b.answer_ids
        assert max(float((x - y).abs().max()) for x, y in zip(a.step_logits, b.step_logits)) < 1e-5


def test_needs_an_engine_with_device_top_k(tmp_path):
    bundle, cfg, space = _tiny(tmp_path)
    L = cfg.n_layers
    imp = ImportanceScores.by_index(L)
    # by default on exactly when it can act: the fast engine (device top_k) and Stage2 on the device
    on = RequestEngine(bundle.model, bundle.preprocessor, space, imp, device_stage2=True,
                       executor=FastEngine(bundle.model, max_len=64))
    assert on.early_rest_prefill
    assert not RequestEngine(bundle.model, bundle.preprocessor, space, imp, device_stage2=False,
                             executor=FastEngine(bundle.model, max_len=64)).early_rest_prefill
    assert not RequestEngine(bundle.model, bundle.preprocessor, space, imp, device_stage2=True).early_rest_prefill
    with pytest.raises(ValueError, match="early_rest_prefill needs an engine whose top_k is device data"):
        RequestEngine(bundle.model, bundle.preprocessor, space, ImportanceScores.by_index(L), device_stage2=True,
                      early_rest_prefill=True)


def test_write_top_k_on_device_refuses_options_beyond_the_engine(tmp_path):
    bundle, _, _ = _tiny(tmp_path)
    fast = FastEngine(bundle.model, max_len=64)
    with pytest.raises(ValueError, match="top_k options"):
        fast.write_top_k_on_device(1, torch.tensor(0.0), (1, fast.shape.k_max + 1))
    fast.write_top_k_on_device(2, torch.tensor(1.0), (1, 2))
    assert [int(t) for t in fast._top_k[2:]] == [2] * (fast.n_layers - 2)
    assert [int(t) for t in fast._top_k[:2]] == [fast.native_k] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_tokens_and_logits_with_cuda_graphs(tmp_path):
    bundle, cfg, space = _tiny(tmp_path, "cuda")
    L = cfg.n_layers
    importance = ImportanceScores.by_index(L)
    fast = FastEngine(bundle.model, max_len=512)
    assert fast.use_graphs
    early = RequestEngine(bundle.model, bundle.preprocessor, space, importance, executor=fast, early_rest_prefill=True)
    assert early.stage2_on_device is not None
    torch.manual_seed(0)
    ctl = TwoStageController(space, cfg.d_model, token_rms=early.token_rms())
    image = _png(200, 100, seed=2)
    for seed in range(6):
        a = early.serve(image, QUESTION, 40.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=4,
                        return_logits=True, stop_at_eos=False)
        b = early.serve(image, QUESTION, 40.0, None, fixed=a.knobs, max_new_tokens=4, return_logits=True,
                        stop_at_eos=False)
        assert a.answer_ids == b.answer_ids
        assert max(float((x - y).abs().max()) for x, y in zip(a.step_logits, b.step_logits)) < 2e-3
        assert all(h in (-1, int(t)) for h, t in zip(fast._top_k_host, fast._top_k))
    assert early.early_blocks_queued >= 6
    # the top_k write queues without waiting for the decision (a sync here made the early path pointless)
    k_index = torch.tensor(1.0, device="cuda")
    fast.write_top_k_on_device(1, k_index, space.top_ks)        # the option table uploaded once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast.write_top_k_on_device(1, k_index, space.top_ks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
