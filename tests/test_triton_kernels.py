"""The Triton decode kernels (rollout_workers/triton_kernels.py) against plain torch references.

On a CUDA GPU: each kernel at the full-size MolmoE shapes in bf16 and float32, and the fast engine's
decode steps with the kernels against the generic path (grouped GEMM + SDPA over the cache) for random
knobs. Without a GPU, the same kernel checks run in Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, float32, small shapes) when Triton is installed; CPU builds of torch do not ship it.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def reference_route(logits: torch.Tensor, top_k: int, k_max: int):
    """fast_engine.moe's routing for one token: (ascending expert ids with sentinel E, float32 weights)."""
    E = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k_max)
    active = torch.arange(k_max, device=logits.device) < top_k
    idx = torch.where(active, idx, E)
    idx, order = idx.sort()
    w = torch.where(idx < E, w.gather(0, order), torch.zeros((), device=logits.device))
    return idx, w


def rope_tables(T: int, hd: int, device: str, dtype: torch.dtype):
    """cos, sin [T, hd] as the fast engine builds them (default RoPE, theta 10000)."""
    from rollout_workers.fast_engine import rope_cos_sin
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    cos, sin = rope_cos_sin(torch.arange(T, device=device), inv_freq, 1.0, dtype)
    return cos[0, 0], sin[0, 0]


def rope_cache_reference(proj, q_norm, k_norm, cos, sin, H: int, KV: int, clip: float, eps: float = 1e-5):
    """fast_engine.qkv's maths after the projection: proj [T, (H + 2 KV) hd] -> q [H, T, hd], k, v [KV, T, hd]."""
    from rollout_workers.fast_engine import rms_norm, rotate_half
    T, hd = proj.shape[0], cos.shape[-1]
    q, k, v = proj.split([H * hd, KV * hd, KV * hd], dim=-1)
    q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    if clip:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = (t.reshape(T, -1, hd).transpose(0, 1) for t in (q, k, v))
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def check_kernels(device: str, dtype: torch.dtype, E: int, k_max: int, D: int, I: int, H: int, KV: int, L: int,
                  hd: int, tol: float) -> dict:
    """Runs every kernel against its reference; returns the worst differences (asserts inside)."""
    from rollout_workers import triton_kernels as dk
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)   # noqa: E731
    worst = {}
    for top_k in sorted({1, k_max // 2, k_max} - {0}):
        logits = rnd(E)
        idx, w = dk.route(logits, torch.tensor(top_k, device=device), k_max)
        ridx, rw = reference_route(logits, top_k, k_max)
        assert idx.tolist() == ridx.tolist(), (top_k, idx.tolist(), ridx.tolist())
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
        wgu, wd = rnd(E, 2 * I, D) * D ** -0.5, rnd(E, D, I) * I ** -0.5
        x, h = rnd(1, D), rnd(k_max, I)
        gu = dk.expert_gemv(wgu, idx, x)
        down = dk.expert_gemv(wd, idx, h)
        zero_gu, zero_d = torch.zeros(2 * I, device=device), torch.zeros(D, device=device)
        ref_gu = torch.stack([wgu[e].float() @ x[0].float() if e < E else zero_gu for e in idx.tolist()])
        ref_d = torch.stack([wd[e].float() @ h[s].float() if e < E else zero_d for s, e in enumerate(idx.tolist())])
        worst["gemv"] = max(worst.get("gemv", 0.0), float((gu.float() - ref_gu).abs().max()),
                            float((down.float() - ref_d).abs().max()))
        torch.testing.assert_close(gu.float(), ref_gu, atol=tol, rtol=tol)
        torch.testing.assert_close(down.float(), ref_d, atol=tol, rtol=tol)
        assert not gu[top_k:].any() and not down[top_k:].any()     # sentinel slots are zeros
    # prefill epilogue against fast_engine.qkv (norms over all heads, RoPE) and its cache writes
    T = min(L - 1, 37)
    proj = rnd(T, (H + 2 * KV) * hd)
    qn, kn = 1 + 0.1 * rnd(H * hd), 1 + 0.1 * rnd(KV * hd)
    for clip in (0.0, 0.5):
        kc, vc = rnd(1, KV, L, hd), rnd(1, KV, L, hd)
        untouched = kc[:, :, T:].clone()
        cos, sin = rope_tables(T, hd, device, dtype)
        q_ref, k_ref, v_ref = rope_cache_reference(proj, qn, kn, cos, sin, H, KV, clip)
        q = dk.qkv_rope_cache(proj, qn, kn, cos, sin, kc, vc, 1e-5, clip)
        for got, want in ((q, q_ref), (kc[0, :, :T], k_ref), (vc[0, :, :T], v_ref)):
            worst["qkv_rope_cache"] = max(worst.get("qkv_rope_cache", 0.0), float((got.float() - want.float()).abs().max()))
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        assert torch.equal(kc[:, :, T:], untouched)
    q, kc, vc = rnd(H, hd), rnd(KV, L, hd), rnd(KV, L, hd)
    for pos in sorted({0, 1, 63, 64, L // 2, L - 1}):
        o = dk.decode_attention(q, kc, vc, torch.tensor([pos], device=device), hd ** -0.5)
        mask = (torch.arange(L, device=device) <= pos).view(1, 1, 1, -1)
        ref = F.scaled_dot_product_attention(q.float()[None, :, None], kc.float()[None], vc.float()[None],
                                             attn_mask=mask, scale=hd ** -0.5, enable_gqa=KV != H)[0, :, 0]
        worst["attention"] = max(worst.get("attention", 0.0), float((o.float() - ref).abs().max()))
        torch.testing.assert_close(o.float(), ref, atol=tol, rtol=tol)
    return worst


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU torch)")
def test_kernels_in_the_triton_interpreter():
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from tests.test_triton_kernels import check_kernels
        print(check_kernels("cpu", torch.float32, E=12, k_max=4, D=48, I=24, H=4, KV=2, L=150, hd=16, tol=1e-4))
    """ % str(ROOT))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                              reason="needs a CUDA GPU with Triton")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_kernels_at_full_size_shapes_on_cuda(dtype, tol):
    worst = check_kernels("cuda", dtype, E=64, k_max=8, D=2048, I=1024, H=16, KV=16, L=2048, hd=128, tol=tol)
    print(f"{dtype}: worst |diff| {worst}")


@pytest.mark.gpu
@gpu_only
def test_fast_engine_decode_with_kernels_equals_generic_path(tmp_path):
    """Tiny float32 model on CUDA: every decode step's logits with the Triton kernels equal the generic
    path's (graphs and compilation on both; whole-step graphs for some block lists, per-block graphs for
    the rest) for random knobs, top_k and block subsets."""
    import numpy as np

    from rollout_workers.fast_engine import FastEngine
    from rollout_workers.molmoe.loader import load_molmoe
    from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
    folder = make_tiny_checkpoint(tmp_path / "tiny", seed=3)
    dev = torch.device("cuda")
    engines = {flag: FastEngine(load_molmoe(folder, dev).model, max_len=256, triton=flag)
               for flag in (False, True)}
    assert engines[True].triton and not engines[False].triton
    cfg = engines[True].cfg
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(6):
        blocks = sorted(rng.choice(cfg.n_layers, size=int(rng.integers(2, cfg.n_layers + 1)), replace=False).tolist())
        trials.append((int(rng.integers(5, 150)), blocks, {b: int(rng.integers(1, cfg.top_k + 1)) for b in blocks}))
    engines[False].warmup(None, crop_counts=[])       # per-block decode graphs
    info = engines[True].warmup(None, crop_counts=[], block_lists=[b for _, b, _ in trials[:4]])   # whole steps
    assert info["step_graphs"] == len({tuple(b) for _, b, _ in trials[:4]})
    worst = 0.0
    for trial, (T, blocks, top_k) in enumerate(trials):
        x = torch.randn(1, T, cfg.d_model, device=dev, generator=torch.Generator(device=dev).manual_seed(trial))
        logits = {}
        for flag, e in engines.items():
            e.prefill(x, blocks, top_k)
            logits[flag] = [e.decode_step(7 + s, T + s, blocks, top_k).clone() for s in range(5)]
        diff = max(float((a - b).abs().max()) for a, b in zip(logits[True], logits[False]))
        worst = max(worst, diff)
        assert diff < 1e-4, (trial, blocks, top_k, diff)
    assert all(e.captures_after_warmup == 0 for e in engines.values())
    print(f"max |logit diff| Triton decode vs generic (float32 tiny, CUDA graphs): {worst:.2e}")
