"""The fast engine (static KV cache, grouped expert GEMMs, CUDA-graph decode) against the eager engine.

On CPU (float32 tiny random MolmoE) the fast engine runs the same maths without graphs: every
generated step's logits must equal the eager engine's for random knob settings at every p, on both
the controlled (budget token) and the plain path. The GPU test repeats this with graphs captured at
warm-up, and checks that switching settings never captures again."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rollout_workers.fast_engine import BlockWeights, FastEngine, Shape, expert_mm, grouped_mm_supported, moe
from rollout_workers.molmoe.skip import top_k_override
from rollout_workers.molmoe.loader import load_molmoe
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
from rollout_workers.request_path import RequestEngine
from shared.backend import SampleError
from shared.controller import TwoStageController
from shared.knobs import ImportanceScores, KnobChoice, KnobSpace, select_blocks

QUESTION = "what colour is the small circle"


def _png(w=160, h=120, seed=0) -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _setup(device: str, tmp_path, **fast_kwargs):
    folder = make_tiny_checkpoint(tmp_path / "tiny", seed=3)
    eager_m = load_molmoe(folder, torch.device(device))
    fast_m = load_molmoe(folder, torch.device(device))
    cfg = eager_m.model.config
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                      tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    importance = ImportanceScores(tuple(float(x) for x in np.random.default_rng(0).random(L)))
    eager = RequestEngine(eager_m.model, eager_m.preprocessor, space, importance)
    fast_exec = FastEngine(fast_m.model, **fast_kwargs)
    fast = RequestEngine(fast_m.model, fast_m.preprocessor, space, importance, executor=fast_exec)
    torch.manual_seed(0)
    ctl = TwoStageController(space, cfg.d_model, token_rms=eager.token_rms())
    return eager, fast, fast_exec, space, ctl


def _choices(space: KnobSpace, per_p: int, seed: int):
    rng = np.random.default_rng(seed)
    allc = [KnobChoice(space.tier_names[t], space.tier_max_crops[t], p, k, nb)
            for t, p, k, nb in itertools.product(range(space.num_tiers), space.positions, space.top_ks,
                                                 space.num_blocks) if p < nb]
    out = []
    for p in space.positions:
        at_p = [c for c in allc if c.p == p]
        out += [at_p[i] for i in rng.choice(len(at_p), size=min(per_p, len(at_p)), replace=False)]
    return out


def _compare(eager, fast, ctl, choices, atol):
    image = _png(200, 100, seed=2)
    worst = 0.0
    for fixed in choices:
        for controller in (ctl, None):
            a = eager.serve(image, QUESTION, 300.0, controller, fixed=fixed, return_logits=True, max_new_tokens=6,
                            stop_at_eos=False)
            b = fast.serve(image, QUESTION, 300.0, controller, fixed=fixed, return_logits=True, max_new_tokens=6,
                           stop_at_eos=False)
            assert a.answer_ids == b.answer_ids, fixed
            assert a.block_ids == b.block_ids
            diff = max(float((x - y).abs().max()) for x, y in zip(a.step_logits, b.step_logits))
            worst = max(worst, diff)
            assert diff < atol, (fixed, controller is not None, diff)
    return worst


@pytest.fixture(scope="module")
def cpu_engines(tmp_path_factory):
    return _setup("cpu", tmp_path_factory.mktemp("fast"), max_len=256)


def test_fast_equals_eager_on_cpu_every_p(cpu_engines):
    eager, fast, fast_exec, space, ctl = cpu_engines
    assert fast_exec.shape.grouped == grouped_mm_supported(torch.device("cpu"), torch.float32)
    assert not fast_exec.use_graphs and not fast_exec.compile
    _compare(eager, fast, ctl, _choices(space, 3, seed=1), atol=1e-4)


def test_padded_prefill_equals_eager_on_cpu(tmp_path):
    """Prompts padded to the length bucket (what the prefill graphs run) give the eager engine's logits."""
    eager, fast, fast_exec, space, ctl = _setup("cpu", tmp_path, max_len=256, prefill_bucket=48, pad_prefill=True)
    assert fast_exec.pad_prefill and not fast_exec.use_graphs
    _compare(eager, fast, ctl, _choices(space, 2, seed=5), atol=1e-4)
    # the Stage2 features recorded for training are the latency token's state at decision time, even
    # though the padded engine continues the prefill in place in the buffer that state was read from
    image = _png(seed=7)
    a = eager.serve(image, QUESTION, 250.0, ctl, generator=torch.Generator().manual_seed(0), max_new_tokens=2)
    b = fast.serve(image, QUESTION, 250.0, ctl, generator=torch.Generator().manual_seed(0), max_new_tokens=2)
    np.testing.assert_allclose(a.stage2.latency_state, b.stage2.latency_state, atol=1e-4)


def test_fast_engine_sampled_controller_path_matches(cpu_engines):
    """Controller decisions (sampled with the same generator) and answers agree between engines."""
    eager, fast, _, _, ctl = cpu_engines
    image = _png(seed=7)
    for seed in range(3):
        a = eager.serve(image, QUESTION, 250.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=4)
        b = fast.serve(image, QUESTION, 250.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=4)
        assert a.knobs == b.knobs and a.answer_ids == b.answer_ids
        np.testing.assert_allclose(a.stage2.latency_state, b.stage2.latency_state, atol=1e-4)


def test_grouped_and_gathered_expert_products_agree():
    """Rows sorted by expert, a sentinel row (expert id E) at the end that the product may leave unset."""
    torch.manual_seed(0)
    w = torch.randn(5, 12, 8)
    experts = torch.tensor([0, 0, 2, 3, 3, 3, 5])
    rows = torch.randn(7, 8)
    offs = torch.cumsum(torch.bincount(experts, minlength=6)[:5], 0).to(torch.int32)
    want = torch.stack([w[e] @ r for e, r in zip(experts[:6].tolist(), rows[:6])])
    for grouped in ({True, False} if grouped_mm_supported(torch.device("cpu"), torch.float32) else {False}):
        got = expert_mm(rows, w, experts, offs, grouped)[:6]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_masked_top_k_moe_equals_the_transformers_block(tmp_path, k):
    """top_k as data (top k_max, ranks >= k sent to a skipped sentinel) == transformers' block at top_k = k."""
    fast_exec = FastEngine(load_molmoe(make_tiny_checkpoint(tmp_path / "t", seed=3)).model, max_len=32, top_k_max=3)
    assert fast_exec.shape.k_max == 3
    layer = fast_exec.model.llm.model.layers[1]
    x = torch.randn(1, 9, fast_exec.cfg.d_model)
    with top_k_override(fast_exec.model.llm.model.layers, {1: k}):
        want = layer.mlp(x)
    got = moe(fast_exec.weights[1], fast_exec.shape, x.view(9, -1), torch.tensor(k))
    torch.testing.assert_close(got.view(1, 9, -1), want, atol=1e-6, rtol=1e-5)


def moe_onehot_reference(w: BlockWeights, s: Shape, x: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """fast_engine.moe before the sort-free prefill routing (verbatim): per-token sort of the slots, then a
    one-hot cumsum counting sort of the (token, slot) pairs, rows by repeat_interleave + index_copy_."""
    n, E, kmax = x.shape[0], w.router.shape[0], s.k_max
    logits = F.linear(x, w.router)                                          # [N, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = torch.topk(probs, kmax, dim=-1)                          # [N, kmax], descending
    rank = torch.arange(kmax, device=x.device)
    idx = torch.where(rank < top_k, idx, E)                                  # ranks >= top_k -> sentinel
    idx, order = idx.sort(dim=-1)                                           # ascending expert per token
    weights = weights.gather(-1, order).to(logits.dtype)
    if n == 1:     # decode: the token's slots are already grouped by expert
        expert_of_row, dest = idx[0], None
        rows = x.expand(kmax, -1).contiguous()
    else:          # counting sort of the (token, slot) pairs by expert, stable in token order
        flat = idx.reshape(-1)                                              # [N*kmax]
        onehot = F.one_hot(flat, E + 1)                                     # [N*kmax, E+1]
        rank = (onehot.cumsum(0) - onehot).gather(1, flat[:, None])[:, 0]  # earlier pairs of the same expert
        start = onehot.sum(0).cumsum(0) - onehot.sum(0)                     # [E+1] first row of each expert
        dest = start[flat] + rank                                           # grouped position of each pair
        expert_of_row = torch.empty_like(flat).index_copy_(0, dest, flat)
        rows = torch.empty(n * kmax, x.shape[1], dtype=x.dtype, device=x.device).index_copy_(
            0, dest, x.repeat_interleave(kmax, dim=0))
    counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, expert_of_row, torch.ones_like(expert_of_row, dtype=torch.int32))
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)                  # the sentinel group is left out
    gate, up = expert_mm(rows, w.gate_up, expert_of_row, offs, s.grouped).chunk(2, dim=-1)
    out = expert_mm(F.silu(gate) * up, w.down, expert_of_row, offs, s.grouped)   # [N*kmax, D]
    out = torch.where((expert_of_row < E)[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    if dest is not None:
        out = out[dest]                                                     # back to (token, slot) order
    routed = out.view(n, kmax, -1) * weights[..., None]
    acc = routed[:, 0]
    for j in range(1, kmax):               # eager's per-expert index_add_ order; inactive slots add 0
        acc = acc + routed[:, j]
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,kmax", [(8, 3), (16, 8), (5, 5)])
def test_sort_free_moe_routing_equals_the_one_hot_counting_sort(dtype, E, kmax):
    """moe()'s prefill routing (no sort: cumsum over tokens, k_max^2 compares, gathered rows, fused
    gather-weight-sum) is bit-identical, uncompiled, to the one-hot counting sort it replaced, for every
    top_k up to k_max (ranks >= top_k inactive), the grouped and the per-row expert products, prefill
    lengths from 2 rows and the one-token decode path."""
    torch.manual_seed(E * 10 + kmax)
    D, I = 32, 16
    w = BlockWeights(*([None] * 6), torch.randn(E, D, dtype=dtype) * 0.5,
                     torch.randn(E, 2 * I, D, dtype=dtype) * D ** -0.5, torch.randn(E, D, I, dtype=dtype) * I ** -0.5)
    grouped_options = [False] + ([True] if grouped_mm_supported(torch.device("cpu"), dtype) else [])
    for grouped in grouped_options:
        s = Shape(2, 2, D // 2, 1e-5, None, kmax, 1.0, grouped)
        for n in (1, 2, 9, 37):
            x = torch.randn(n, D, dtype=dtype)
            for k in range(1, kmax + 1):
                top_k = torch.tensor(k)
                want, got = moe_onehot_reference(w, s, x, top_k), moe(w, s, x, top_k)
                assert got.shape == (n, D) and got.dtype == dtype
                assert torch.equal(got, want), (grouped, n, k, float((got.float() - want.float()).abs().max()))


def check_vision_layer(device: str, dtype: torch.dtype, n: int, S: int, width: int, heads: int, mlp: int,
                       tol: float, mlp_row_chunks: int = 1) -> float:
    """fast_engine.vision_layer (stacked q/k/v) against transformers' CLIPEncoderLayer with the same
    weights; returns the worst |diff|."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from rollout_workers.fast_engine import vision_layer, vision_layer_weights
    from rollout_workers.molmoe.config import MolmoeConfig
    from rollout_workers.molmoe.modeling import clip_vision_config
    vc = clip_vision_config(MolmoeConfig.tiny())
    vc.hidden_size, vc.num_attention_heads, vc.intermediate_size = width, heads, mlp
    vc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(vc).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02 if p.dim() > 1 else 0.1)
        x = torch.randn(n, S, width, device=device, dtype=dtype)
        ref = layer(x, None)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = vision_layer(vision_layer_weights(layer), x, heads, vc.layer_norm_eps, mlp_row_chunks=mlp_row_chunks)
        # the stacked q/k/v are views: the transformers layer still computes the same
        again = layer(x, None)
    torch.testing.assert_close(again[0] if isinstance(again, tuple) else again, ref)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    return float((got.float() - ref.float()).abs().max())


@pytest.mark.parametrize("mlp_row_chunks", [1, 4])
def test_vision_layer_equals_the_transformers_clip_layer(mlp_row_chunks):
    # 4 slices of 51 rows: unequal slices (13, 13, 13, 12) are covered too
    assert check_vision_layer("cpu", torch.float32, n=3, S=17, width=32, heads=2, mlp=64, tol=1e-5,
                              mlp_row_chunks=mlp_row_chunks) < 1e-5


def test_top_k_above_the_engines_maximum_is_refused(cpu_engines):
    _, _, fast_exec, _, _ = cpu_engines
    with pytest.raises(ValueError, match="top_k_max"):
        fast_exec.prefill(torch.zeros(1, 4, fast_exec.cfg.d_model), [0, 1], {1: fast_exec.shape.k_max + 1})


def test_prompt_longer_than_the_cache_is_a_clear_error(tmp_path):
    _, fast, _, space, ctl = _setup("cpu", tmp_path, max_len=16)
    with pytest.raises((SampleError, ValueError), match="cache of 16 positions"):
        fast.serve(_png(), QUESTION, 300.0, ctl, fixed=space.full_compute(), max_new_tokens=2)


def _check_device_greedy_loop(eager, fast, fast_exec, ctl, choices):
    """The fast engine's device-side greedy loop (argmax and position on the device, one token read per
    step) gives the tokens of the host loop over decode_step and of the eager engine, and stops at EOS."""
    image = _png(180, 120, seed=4)
    for fixed in choices:
        for controller in (ctl, None):
            kw = dict(fixed=fixed, max_new_tokens=7, stop_at_eos=False)
            host = fast.serve(image, QUESTION, 300.0, controller, return_logits=True, **kw)
            dev = fast.serve(image, QUESTION, 300.0, controller, **kw)
            ref = eager.serve(image, QUESTION, 300.0, controller, **kw)
            assert dev.answer_ids == host.answer_ids == ref.answer_ids, fixed
            assert len(dev.answer_ids) == 7 and dev.segments_ms["decode_ms"] > 0
    # EOS: any token of the answer as the end-of-sequence id stops the loop right after its first occurrence
    x = fast_exec.model.embed_tokens(torch.tensor([[1, 2, 3]], device=fast_exec.device))
    blocks = list(range(fast_exec.n_layers))
    fast_exec.begin()
    logits = fast_exec.head(fast_exec.prefill(x, blocks, {})[:, -1:])
    loop = fast_exec.greedy_decode(logits, 3, blocks, {}, 7, None)
    fast_exec.begin()
    logits = fast_exec.head(fast_exec.prefill(x, blocks, {})[:, -1:])
    stopped = fast_exec.greedy_decode(logits, 3, blocks, {}, 7, loop[2])
    assert len(loop) == 7 and stopped == loop[:loop.index(loop[2]) + 1]


def test_device_greedy_loop_equals_host_loop_on_cpu(cpu_engines):
    eager, fast, fast_exec, space, ctl = cpu_engines
    _check_device_greedy_loop(eager, fast, fast_exec, ctl, _choices(space, 1, seed=8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_engine_with_cuda_graphs_equals_eager(tmp_path):
    eager, fast, fast_exec, space, ctl = _setup("cuda", tmp_path, max_len=512)
    info = fast_exec.warmup(space, importance=fast.importance)
    L, buckets = space.num_layers, 512 // fast_exec.prefill_bucket
    steps = len({tuple(select_blocks(p, nb, fast.importance.scores)) for p in space.positions
                 for nb in space.num_blocks if p < nb})
    assert info["step_graphs"] == steps > 1
    # decode pieces, whole decode steps per block list, prefill per block and bucket, vision per crop count
    assert info["graphs"] == 2 + L + steps + L * buckets + max(space.tier_max_crops) + 1
    worst = _compare(eager, fast, ctl, _choices(space, 4, seed=3), atol=2e-3)
    _check_device_greedy_loop(eager, fast, fast_exec, ctl, _choices(space, 1, seed=8))
    assert fast_exec.captures_after_warmup == 0
    print(f"max |logit diff| fast (graphs) vs eager on CUDA, float32 tiny: {worst:.2e}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_captured_in_the_middle_of_a_request_equal_eager(tmp_path):
    """No warm-up: each graph is captured the first time a request needs it. A capture runs its body on the live
    buffers (twice), so without restoring them a block's hidden state went through it three times."""
    eager, fast, fast_exec, space, ctl = _setup("cuda", tmp_path, max_len=512)
    assert fast_exec.use_graphs and not fast_exec._graphs
    worst = _compare(eager, fast, ctl, _choices(space, 2, seed=5), atol=2e-3)
    assert fast_exec.captured > 0
    print(f"max |logit diff| fast (graphs captured on first use) vs eager, float32 tiny: {worst:.2e}")


def _check_latency_token_path(device: str, tmp_path) -> None:
    """Sampled controller path: the recorded latency state equals the eager engine's for the same knobs,
    the Stage2 decisions carry the controller's log-probs for the recorded features, and the answer and
    state equal those of the same knobs fixed. On CUDA the state comes back through pinned memory behind
    the timer's event, polled (spin_wait) or waited on. Timing-independent: the spent fraction, hence the
    sampled knobs, differ from run to run."""
    eager, fast, fast_exec, space, ctl = _setup(device, tmp_path, max_len=512, use_graphs=False, compile=False)
    image = _png(200, 100, seed=2)
    fast.serve(image, QUESTION, 250.0, ctl, generator=torch.Generator().manual_seed(0), max_new_tokens=2)   # warm
    for seed, spin in ((0, True), (1, False), (2, True)):
        fast.spin_wait = spin
        r = fast.serve(image, QUESTION, 250.0, ctl, generator=torch.Generator().manual_seed(seed), max_new_tokens=4)
        lk, ln = ctl._numpy_act().sync(ctl, 2).stage2(250.0, r.stage2)
        assert r.top_k.log_prob == pytest.approx(lk[r.top_k.index], abs=1e-5)
        assert r.num_blocks.log_prob == pytest.approx(ln[r.num_blocks.index], abs=1e-5)
        ref = eager.serve(image, QUESTION, 250.0, ctl, fixed=r.knobs, max_new_tokens=4)
        np.testing.assert_allclose(r.stage2.latency_state, ref.stage2.latency_state, atol=1e-4)
        again = fast.serve(image, QUESTION, 250.0, ctl, fixed=r.knobs, max_new_tokens=4)
        assert again.answer_ids == r.answer_ids
        np.testing.assert_allclose(again.stage2.latency_state, r.stage2.latency_state, atol=1e-5)


def test_latency_token_path_on_cpu(tmp_path):
    _check_latency_token_path("cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_latency_token_path_on_cuda_pinned_copy_polled_or_waited(tmp_path):
    _check_latency_token_path("cuda", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_vision_layer_at_full_size_on_cuda(dtype, tol):
    worst = check_vision_layer("cuda", dtype, n=13, S=577, width=1024, heads=16, mlp=4096, tol=tol)
    print(f"vision layer {dtype}: max |diff| vs transformers {worst:.2e}")


def test_backend_with_the_fast_engine_serves_the_embedded_default():
    """model.engine=fast through the config and the rollout backend (CPU: no graphs), same answers and
    knobs as the eager engine for fixed knobs; the engine name reaches the backend info (bundles)."""
    from pathlib import Path

    from rollout_workers.backends import make_backend
    from shared.config import load_config
    from shared.datasets import load_samples

    default = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.yaml"
    backends = {engine: make_backend(load_config(default, [f"model.engine={engine}"])) for engine in ("eager", "fast")}
    assert backends["fast"].info().engine == "fast" and backends["eager"].info().engine == "eager"
    assert type(backends["fast"].engine.executor).__name__ == "FastEngine"
    cfg = load_config(default, [])
    samples = load_samples(cfg, "train")[:3]
    space = backends["eager"].space
    torch.manual_seed(0)
    ctl = TwoStageController.from_config(cfg, space, token_rms=backends["eager"].info().token_rms)
    for backend in backends.values():
        backend.warmup(1, ctl)
    for sample in samples:
        for fixed in (space.full_compute(), space.choice(0, 0, 0, 0)):
            a = backends["eager"].run(sample, 300.0, ctl, fixed=fixed)
            b = backends["fast"].run(sample, 300.0, ctl, fixed=fixed)
            assert (a.answer, a.knobs, a.prompt_tokens) == (b.answer, b.knobs, b.prompt_tokens)
