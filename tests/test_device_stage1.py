"""Stage1 and the language feature decided on the device (rollout_workers/device_stage1.py) against the host.

The decision must be the host act path's for the recorded language feature and the same uniforms: the same
indices, log-probs within float32 round-off, masked options never drawn; the language feature must be the
mean of the question's embedding rows. On CPU the maths and the request path's plumbing run uncompiled
without graphs; on a GPU (marked `gpu`) as one CUDA graph, compiled or not, at full width.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout_workers.device_stage1 import DeviceStage1
from shared.controller import Stage1Features, TwoStageController, _draw
from shared.knobs import KnobSpace
from tests.test_device_stage2 import _controller as _stage_controller


def _controller(d_model: int, seed: int) -> TwoStageController:
    return _stage_controller(d_model, seed, stage=1)


class _Table:
    """A word-embedding table standing in for the model's `embed_tokens`: ids [L] -> [1, L, d]."""

    def __init__(self, vocab: int, d: int, device: str, dtype=torch.float32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = (torch.randn(vocab, d, generator=g) * 0.05 + 0.01).to(device=device, dtype=dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)[None]

    def mean(self, ids: list[int]) -> np.ndarray:
        """What `RequestEngine.language_feature` computes for these ids."""
        return self(torch.tensor(ids, device=self.weight.device))[0].float().mean(0).cpu().numpy()


def _host_decision(ctl, f1: Stage1Features, uniforms):
    lt, lp = ctl.act_arrays(1).stage1(f1.budget_ms, f1)
    if uniforms is None:
        return [max(range(len(v)), key=v.__getitem__) for v in (lt, lp)], (lt, lp)
    return [_draw(lt, uniforms[0]).index, _draw(lp, uniforms[1]).index], (lt, lp)


def _check_against_host(ds: DeviceStage1, ctl, table: _Table, rng, n: int, vocab: int) -> int:
    """Random requests through prepare/queue/result; returns how many sampled decisions differed from the
    greedy ones (the draws must actually draw)."""
    space = ctl.space
    T, P = len(space.tier_names), len(space.positions)
    not_argmax = 0
    for i in range(n):
        budget = float(rng.choice([90.0, 180.0, 333.0]))
        ds.prepare(ctl, budget)
        ids = [int(v) for v in rng.integers(0, vocab, int(rng.integers(1, ds.max_ids + 1)))]
        tier_tokens = sorted(int(v) for v in rng.integers(50, 3000, T))
        if i % 3 == 0:                     # a collapsed tier: masked
            tier_tokens[1] = tier_tokens[0]
        tier_mask = space.tier_mask(tier_tokens)
        p_mask = [True] * P if i % 5 else [bool(v) for v in rng.integers(0, 2, P)]
        if not any(p_mask):
            p_mask[-1] = True
        uniforms = None if i % 4 == 0 else [float(u) for u in rng.random(2)]
        if i % 7 == 1:
            uniforms = [0.999999, 0.0]     # the top of the draw, and its bottom
        ds.queue(ids, tier_tokens, tier_mask, p_mask, uniforms)
        t, lp_t, p, lp_p = ds.result()
        if ds.cuda:
            torch.cuda.synchronize()
        lang = ds.lang_feat()
        np.testing.assert_allclose(lang, table.mean(ids), rtol=1e-5, atol=1e-6)
        f1 = Stage1Features(lang_feat=lang, budget_ms=budget, tier_tokens=tier_tokens, tier_mask=tier_mask,
                            p_mask=p_mask)
        (ht, hp), (lt, lpp) = _host_decision(ctl, f1, uniforms)
        assert (t, p) == (ht, hp), (i, uniforms, lt, lpp)
        assert tier_mask[t] and p_mask[p]
        assert lp_t == pytest.approx(lt[t], abs=1e-5) and lp_p == pytest.approx(lpp[p], abs=1e-5)
        if uniforms is not None:
            not_argmax += (t, p) != tuple(_host_decision(ctl, f1, None)[0])
    return not_argmax


def test_decision_and_language_feature_equal_the_host_path_on_cpu():
    ctl = _controller(d_model=64, seed=1)
    table = _Table(500, 64, "cpu")
    ds = DeviceStage1(torch.device("cpu"), ctl.space, table, 64, max_question_tokens=24)
    assert not ds.use_graph
    assert _check_against_host(ds, ctl, table, np.random.default_rng(0), 60, 500) > 5


def test_new_weights_and_budgets_reach_the_device_copies_and_misuse_is_refused():
    ctl = _controller(d_model=32, seed=3)
    other = _controller(d_model=32, seed=4)
    table = _Table(100, 32, "cpu", seed=1)
    ds = DeviceStage1(torch.device("cpu"), ctl.space, table, 32, max_question_tokens=8)
    with pytest.raises(RuntimeError, match="prepare"):
        ds.queue([1, 2], [10, 20, 30], [True] * 3, [True] * 5, None)
    ds.prepare(ctl, 100.0)
    assert ds.fits(8) and not ds.fits(9) and not ds.fits(0)
    with pytest.raises(ValueError, match="do not fit"):
        ds.queue(list(range(9)), [10, 20, 30], [True] * 3, [True] * 5, None)
    with pytest.raises(ValueError, match="tiers"):
        ds.queue([1], [10, 20], [True] * 2, [True] * 5, None)
    rng = np.random.default_rng(5)
    _check_against_host(ds, ctl, table, rng, 8, 100)
    ctl.set_weights(other.get_weights())
    _check_against_host(ds, ctl, table, rng, 8, 100)
    with torch.no_grad():
        ctl.stage1.inp.weight.add_(0.3)
        ctl.budget_encoder.net[0].bias.add_(1.0)
    _check_against_host(ds, ctl, table, rng, 8, 100)
    with pytest.raises(ValueError, match="at least 1"):
        DeviceStage1(torch.device("cpu"), ctl.space, table, 32, max_question_tokens=0)


def _tiny_engines(tmp_path, device: str, **kwargs):
    from rollout_workers.molmoe.loader import load_molmoe
    from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
    from rollout_workers.request_path import RequestEngine
    from shared.knobs import ImportanceScores

    bundle = load_molmoe(make_tiny_checkpoint(tmp_path / "tiny", seed=3), torch.device(device))
    cfg = bundle.model.config
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                      tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    importance = ImportanceScores(tuple(float(x) for x in np.random.default_rng(0).random(L)))
    dev = RequestEngine(bundle.model, bundle.preprocessor, space, importance, device_stage1=True, **kwargs)
    host = RequestEngine(bundle.model, bundle.preprocessor, space, importance, device_stage1=False,
                         device_stage2=False)
    torch.manual_seed(0)
    ctl = TwoStageController(space, cfg.d_model, token_rms=dev.token_rms())
    with torch.no_grad():
        ctl.stage1.tier_head.weight.mul_(8.0)
        ctl.stage1.p_head.weight.mul_(8.0)
    return dev, host, ctl


def _compare_paths(dev, host, ctl, image, question: str, seeds) -> set:
    """The same requests with the same generator seeds on both engines: the same Stage1 decisions (and so the
    same Stage2 draws), log-probs within round-off, the same language feature and answer."""
    seen = set()
    for seed in seeds:
        r = dev.serve(image, question, 40.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=3)
        h = host.serve(image, question, 40.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=3)
        assert (r.tier.index, r.p.index) == (h.tier.index, h.p.index)
        assert r.tier.log_prob == pytest.approx(h.tier.log_prob, abs=1e-5)
        assert r.p.log_prob == pytest.approx(h.p.log_prob, abs=1e-5)
        np.testing.assert_allclose(r.stage1.lang_feat, h.stage1.lang_feat, rtol=1e-5, atol=1e-6)
        assert r.knobs == h.knobs and r.answer_ids == h.answer_ids
        assert r.segments_ms["stage1_ms"] >= 0.0
        seen.add((r.tier.index, r.p.index))
    return seen


def test_request_path_decides_stage1_on_the_device_on_cpu(tmp_path):
    """RequestEngine(device_stage1=True) on the tiny model: decisions and recorded language features are the
    host path's; with shared preprocessing the kept question ids serve later requests; a question longer than
    the device buffer takes the host path; the plain path still records the language feature."""
    from tests.test_fast_engine import QUESTION, _png

    dev, host, ctl = _tiny_engines(tmp_path, "cpu", reuse_preprocess=True)
    assert dev.stage1_on_device is not None and host.stage1_on_device is None
    image = _png(200, 100, seed=2)
    seen = _compare_paths(dev, host, ctl, image, QUESTION, range(10))
    assert len(seen) > 1 and dev.preprocess_reused == 9 and dev.stage1_on_device.decided == 10
    g = dev.serve(image, QUESTION, 40.0, ctl, greedy=True, max_new_tokens=2)
    gh = host.serve(image, QUESTION, 40.0, ctl, greedy=True, max_new_tokens=2)
    assert (g.tier.index, g.p.index) == (gh.tier.index, gh.p.index)
    long_question = " ".join([QUESTION] * 80)
    n_ids = len(dev.question_ids(long_question))
    assert not dev.stage1_on_device.fits(n_ids)
    _compare_paths(dev, host, ctl, image, long_question, range(2))
    assert dev.stage1_on_device.decided == 11          # the long question took the host path
    plain = dev.serve(image, QUESTION, 40.0, None, fixed=g.knobs, max_new_tokens=2)
    np.testing.assert_allclose(plain.stage1.lang_feat, g.stage1.lang_feat, rtol=1e-5, atol=1e-6)
    assert plain.answer_ids == g.answer_ids


def _png_with_late_exif_rotation(png: bytes) -> bytes:
    """The PNG with an eXIf chunk (orientation 6) inserted just before IEND, after the pixel data."""
    import struct
    import zlib

    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6
    tiff = exif.tobytes()
    tiff = tiff[6:] if tiff.startswith(b"Exif\x00\x00") else tiff
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def test_stage1_window_under_the_image_decode(tmp_path):
    """overlap_decode (on with the device Stage1 path): the window queued from the helper thread while the image
    decodes gives the sequential path's decisions, log-probs and answers; a corrupt image is a SampleError naming
    it (from the header, before any window), a truncated one too (during the decode, the queued decision waited
    for), and the engine serves on; the overlap needs the device path."""
    from shared.backend import SampleError
    from tests.test_fast_engine import QUESTION, _png

    dev, host, ctl = _tiny_engines(tmp_path, "cpu")
    assert dev.overlap_decode
    image = _png(200, 100, seed=2)
    assert len(_compare_paths(dev, host, ctl, image, QUESTION, range(8))) > 1
    assert dev.decode_overlapped == 8 and dev.stage1_on_device.decided == 8
    assert dev.stage1_read_in_helper and dev.stage1_read_by_helper == 8      # the helper read each decision too
    dev.stage1_read_in_helper = False           # the request thread reads it after the decode
    assert len(_compare_paths(dev, host, ctl, image, QUESTION, range(8, 14))) > 1
    assert dev.stage1_read_by_helper == 8 and dev.decode_overlapped == 14
    dev.stage1_read_in_helper = True
    dev.decode_overlapped, dev.stage1_on_device.decided = 8, 8       # the counts below go on from the first 8
    dev.overlap_decode = False
    _compare_paths(dev, host, ctl, image, QUESTION, range(2))
    assert dev.decode_overlapped == 8 and dev.stage1_on_device.decided == 10
    dev.overlap_decode = True
    with pytest.raises(SampleError, match="bad image"):
        dev.serve(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, QUESTION, 40.0, ctl, max_new_tokens=2)
    assert dev.stage1_on_device.decided == 10                   # refused at the header
    with pytest.raises(SampleError, match="bad image"):
        dev.serve(image[: len(image) * 2 // 3], QUESTION, 40.0, ctl, max_new_tokens=2)
    assert dev.stage1_on_device.decided == 11                   # the window had run; its decision was read
    _compare_paths(dev, host, ctl, image, QUESTION, range(2))
    assert dev.decode_overlapped == 10
    # a question too long for the device path: the helper queues nothing, Stage1 takes the host path after the
    # decode, with the host engine's result
    long_question = " ".join([QUESTION] * 80)
    assert not dev.stage1_on_device.fits(len(dev.question_ids(long_question)))
    decided = dev.stage1_on_device.decided
    _compare_paths(dev, host, ctl, image, long_question, range(2))
    assert dev.stage1_on_device.decided == decided and dev.decode_overlapped == 10
    # a PNG whose EXIF rotation (orientation 6: width and height swap) sits after its pixels: the header shows
    # no rotation, so the queued decision saw the wrong tier counts; it is dropped and Stage1 runs again after
    # the decode, with the sequential path's result
    late = _png_with_late_exif_rotation(image)
    from rollout_workers.molmoe.preprocessing import decode_image, probe_image_size
    assert probe_image_size(late) == (100, 200) and decode_image(late).shape[:2] == (200, 100)
    assert probe_image_size(late, exif_before_pixels_only=True) == (200, 100)
    before = dev.stage1_on_device.decided
    r = dev.serve(late, QUESTION, 40.0, ctl, generator=torch.Generator().manual_seed(5), max_new_tokens=2)
    h = host.serve(late, QUESTION, 40.0, ctl, generator=torch.Generator().manual_seed(5), max_new_tokens=2)
    assert r.stage1.tier_tokens == h.stage1.tier_tokens and r.knobs == h.knobs and r.answer_ids == h.answer_ids
    assert dev.stage1_on_device.decided == before + 2 and dev.decode_overlapped == 10
    from rollout_workers.request_path import RequestEngine
    with pytest.raises(ValueError, match="overlap_decode needs the device Stage1"):
        RequestEngine(host.model, host.pre, host.space, host.importance, device_stage1=False, overlap_decode=True)
    with pytest.raises(ValueError, match="stage1_read_in_helper needs the decode overlap"):
        RequestEngine(host.model, host.pre, host.space, host.importance, device_stage1=False,
                      stage1_read_in_helper=True)


gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("compile", [False, True])
def test_decision_equals_the_host_act_path_on_cuda_graph(compile):
    """The captured graph (embedding rows in bf16, mean, MLP, draw) at d_model 2048, as the request path runs it."""
    ctl = _controller(d_model=2048, seed=1)
    table = _Table(4000, 2048, "cuda", torch.bfloat16)
    ds = DeviceStage1(torch.device("cuda"), ctl.space, table, 2048, compile=compile)
    assert ds.use_graph
    assert _check_against_host(ds, ctl, table, np.random.default_rng(0), 40, 4000) > 3
    assert ds.captured == 1


@pytest.mark.gpu
@gpu_only
def test_request_path_on_cuda_equals_the_host_path(tmp_path):
    """On CUDA the request path decides Stage1 (and Stage2) on the device by default: the same decisions,
    log-probs and language features as the host act path for the same generator seeds."""
    from tests.test_fast_engine import QUESTION, _png

    dev, host, ctl = _tiny_engines(tmp_path, "cuda")
    assert dev.stage1_on_device is not None
    image = _png(200, 100, seed=2)
    assert len(_compare_paths(dev, host, ctl, image, QUESTION, range(8))) > 1
    assert dev.stage1_on_device.decided == 8 and dev.stage1_on_device.captured == 1
    assert dev.decode_overlapped == 8           # each window ran in the helper thread, on this thread's stream
    assert dev.stage1_read_by_helper == 8       # the helper waited for each decision on the GPU and read it
    dev.stage1_read_in_helper = False
    assert len(_compare_paths(dev, host, ctl, image, QUESTION, range(8, 14))) > 1
    assert dev.stage1_read_by_helper == 8 and dev.decode_overlapped == 14
