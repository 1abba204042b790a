"""Triton kernels for the fast engine's batch-1 requests (issue 8).

One decoded token needs, per block, the router's top-k, a few expert GEMVs and attention over the
cache. The generic path (``fast_engine.moe`` / ``F.scaled_dot_product_attention``) spends most of a
block's time in small sort/offset kernels, a grouped GEMM built for many rows, and attention over the
whole preallocated cache. These kernels do the same maths for one token:

* :func:`route` — softmax over the router logits, top ``k_max``, ranks >= top_k sent to the sentinel
  expert E, slots sorted by expert id (ascending, so the routed outputs are summed in the order
  transformers' eager loop adds them). One program.
* :func:`expert_gemv` — ``out[s] = w[idx[s]] @ x[s]`` for every slot s whose expert is real; a
  sentinel slot reads no weights and yields zeros. One kernel serves the gate/up and the down
  projections; bytes moved scale with the request's top_k.
* :func:`decode_attention` — one query per head against cached keys/values at positions <= pos
  (split over position chunks, then combined); chunks beyond ``pos`` read nothing, so the cost follows
  the sequence length rather than the cache size.

and for the prefill:

* :func:`qkv_rope_cache` — the attention's input epilogue: q/k RMS norms (over all heads, as OLMoE),
  optional clipping, RoPE, q written head-major for attention, k and v written straight into the
  cache. One pass over the projection instead of the four the compiler generates for it.

Each is a ``torch.library.triton_op``, so ``torch.compile`` fuses the surrounding elementwise work and
CUDA graphs capture it. Numerics: float32 accumulation, outputs in the input dtype (as cuBLAS/SDPA in
bf16); softmax and attention statistics in float32.

Shapes (batch 1): E experts, k_max slots, hidden D, expert width I, H query heads, KV key/value heads,
L cache positions, hd head size.
"""
from __future__ import annotations

import os

import torch

try:    # Triton ships with CUDA builds of torch; CPU builds (CI) run the generic path
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    HAVE_TRITON = True
except ImportError:          # pragma: no cover - depends on the install
    HAVE_TRITON = False


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (CUDA with Triton)."""
    return HAVE_TRITON and device.type == "cuda"


def shapes_supported(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """The kernels tile heads and head dimensions with power-of-two ranges."""
    return all(n > 0 and n & (n - 1) == 0 for n in (n_heads, n_kv_heads, head_dim))


if HAVE_TRITON:
    @triton.jit
    def _route_kernel(logits_ptr, top_k_ptr, idx_ptr, w_ptr, E: tl.constexpr, E_P2: tl.constexpr,
                      K_MAX: tl.constexpr):
        e = tl.arange(0, E_P2)
        logit = tl.load(logits_ptr + e, mask=e < E, other=float("-inf")).to(tl.float32)
        p = tl.exp(logit - tl.max(logit, axis=0))
        p = p / tl.sum(p, axis=0)
        top_k = tl.load(top_k_ptr)
        slot = tl.arange(0, K_MAX)
        sel_idx = tl.zeros([K_MAX], dtype=tl.int32)
        sel_w = tl.zeros([K_MAX], dtype=tl.float32)
        rest = tl.where(e < E, p, -1.0)
        for j in tl.static_range(K_MAX):         # j-th largest probability (lowest index on ties)
            best = tl.max(rest, axis=0)
            arg = tl.min(tl.where(rest == best, e, E_P2), axis=0)
            sel_idx = tl.where(slot == j, arg, sel_idx)
            sel_w = tl.where(slot == j, best, sel_w)
            rest = tl.where(e == arg, -2.0, rest)
        active = slot < top_k
        sel_idx = tl.where(active, sel_idx, E)
        sel_w = tl.where(active, sel_w, 0.0)
        # ascending expert id; the sentinels (all E) keep their slot order after the real experts
        a_idx = sel_idx[:, None]
        b_idx = sel_idx[None, :]
        before = (b_idx < a_idx) | ((b_idx == a_idx) & (slot[None, :] < slot[:, None]))
        dest = tl.sum(before.to(tl.int32), axis=1)
        tl.store(idx_ptr + dest, sel_idx)
        tl.store(w_ptr + dest, sel_w)

    @triton.jit
    def _globaltimer_kernel(out_ptr, slot):
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(out_ptr + slot, t)

    def stamp_ns(out: torch.Tensor, slot: int) -> None:
        """``out[slot]`` <- the GPU's global nanosecond timer (PTX ``%globaltimer``) when the stream reaches
        this launch; ``out`` an int64 CUDA tensor. Differences of two stamps are elapsed GPU time (the
        device-side Stage2 reads the spent fraction of the budget from them). Capturable in a CUDA graph."""
        _globaltimer_kernel[(1,)](out, slot)

    # (BLOCK_N, BLOCK_K, warps, stages): a short list for the autotuner (first call per (N, K), at the
    # engine's warm-up); bench/triton_kernels_tune.py sweeps a wider grid
    GEMV_CONFIGS = [(16, 256, 4, 1), (16, 512, 4, 1), (8, 512, 4, 1), (32, 256, 8, 1), (16, 1024, 8, 1),
                    (8, 256, 4, 3), (4, 1024, 4, 1), (64, 128, 8, 1), (32, 512, 8, 1), (8, 1024, 4, 1)]

    @triton.jit
    def _expert_gemv_body(w_ptr, idx_ptr, x_ptr, out_ptr, x_slot_stride, N: tl.constexpr, K: tl.constexpr,
                          E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        pid_n = tl.program_id(0)
        slot = tl.program_id(1)
        expert = tl.load(idx_ptr + slot)
        active = expert < E
        expert = tl.minimum(expert, E - 1).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + expert * (N * K) + rows[:, None] * K
        x_row = x_ptr + slot * x_slot_stride
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            if EVEN:
                x = tl.load(x_row + k).to(tl.float32)
                w = tl.load(w_rows + k[None, :], mask=active, other=0.0)
            else:
                x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
                w = tl.load(w_rows + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < K) & active, other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        if EVEN:
            tl.store(out_ptr + slot * N + rows, out.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + slot * N + rows, out.to(out_ptr.dtype.element_ty), mask=rows < N)

    # a fixed (BLOCK_N, BLOCK_K, warps, stages) instead of the autotuner: Triton's interpreter (no GPU to
    # time on) and bench/triton_kernels_tune.py
    GEMV_FIXED = (16, 256, 4, 1) if os.environ.get("TRITON_INTERPRET") == "1" else None

    _expert_gemv_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
                 for bn, bk, nw, ns in GEMV_CONFIGS],
        key=["N", "K"])(triton.heuristics(
            {"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0})(_expert_gemv_body))

    @triton.jit
    def _attn_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr, scale, L, n_splits,
                           GROUP: tl.constexpr, HD: tl.constexpr, CHUNK: tl.constexpr):
        h = tl.program_id(0)
        s = tl.program_id(1)
        kvh = (h // GROUP).to(tl.int64)
        pos = tl.load(pos_ptr)
        t = s * CHUNK + tl.arange(0, CHUNK)
        valid = t <= pos
        d = tl.arange(0, HD)
        base = kvh * L * HD + t[:, None].to(tl.int64) * HD + d[None, :]
        k = tl.load(k_ptr + base, mask=valid[:, None], other=0.0)      # both loads issued before any maths
        v = tl.load(v_ptr + base, mask=valid[:, None], other=0.0)
        q = tl.load(q_ptr + h * HD + d).to(tl.float32)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        scores = tl.where(valid, scores, float("-inf"))
        m = tl.max(scores, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.where(valid, tl.exp(scores - m_safe), 0.0)
        o = tl.sum(v.to(tl.float32) * p[:, None], axis=0)
        out = h * n_splits + s
        tl.store(acc_ptr + out * HD + d, o)
        tl.store(m_ptr + out, m)
        tl.store(l_ptr + out, tl.sum(p, axis=0))

    @triton.jit
    def _attn_combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, n_splits, S_P2: tl.constexpr, HD: tl.constexpr):
        h = tl.program_id(0)
        s = tl.arange(0, S_P2)
        s_ok = s < n_splits
        m = tl.load(m_ptr + h * n_splits + s, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + h * n_splits + s, mask=s_ok, other=0.0)
        m_all = tl.max(m, axis=0)
        scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
        d = tl.arange(0, HD)
        acc = tl.load(acc_ptr + (h * n_splits + s)[:, None] * HD + d[None, :], mask=s_ok[:, None], other=0.0)
        o = tl.sum(acc * scale[:, None], axis=0) / tl.sum(l * scale, axis=0)
        tl.store(out_ptr + h * HD + d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _norm_rope(x_ptr, x_rot_off, w_ptr, cos, sin, sign, eps, clip, WIDTH: tl.constexpr, off,
                   HAS_CLIP: tl.constexpr):
        """RMS norm over the whole row (float32 statistics, cast, times the weight), clip, RoPE."""
        x = tl.load(x_ptr + off).to(tl.float32)
        x_rot = tl.load(x_ptr + x_rot_off).to(tl.float32)
        inv = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / WIDTH + eps)
        dt = w_ptr.dtype.element_ty
        xn = ((x * inv).to(dt) * tl.load(w_ptr + off)).to(tl.float32)
        xn_rot = ((x_rot * inv).to(dt) * tl.load(w_ptr + x_rot_off)).to(tl.float32)
        if HAS_CLIP:
            xn = tl.minimum(tl.maximum(xn, -clip), clip)
            xn_rot = tl.minimum(tl.maximum(xn_rot, -clip), clip)
        return xn * cos + sign * xn_rot * sin

    @triton.jit
    def _qkv_rope_cache_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                               T, L, eps, clip, H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr,
                               HAS_CLIP: tl.constexpr):
        t = tl.program_id(0)
        row = qkv_ptr + t.to(tl.int64) * ((H + 2 * KV) * HD)
        d = tl.arange(0, HD)[None, :]
        half: tl.constexpr = HD // 2
        d_rot = (d + half) % HD
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + t * HD + d).to(tl.float32)
        sin = tl.load(sin_ptr + t * HD + d).to(tl.float32)
        hq = tl.arange(0, H)[:, None]
        q = _norm_rope(row, hq * HD + d_rot, qn_ptr, cos, sin, sign, eps, clip, H * HD, hq * HD + d, HAS_CLIP)
        tl.store(q_out_ptr + (hq * T + t).to(tl.int64) * HD + d, q.to(q_out_ptr.dtype.element_ty))
        hk = tl.arange(0, KV)[:, None]
        k = _norm_rope(row + H * HD, hk * HD + d_rot, kn_ptr, cos, sin, sign, eps, clip, KV * HD, hk * HD + d,
                       HAS_CLIP)
        cache = (hk * L + t).to(tl.int64) * HD + d
        tl.store(k_cache_ptr + cache, k.to(k_cache_ptr.dtype.element_ty))
        v = tl.load(row + (H + KV) * HD + hk * HD + d)
        if HAS_CLIP:
            v = tl.minimum(tl.maximum(v.to(tl.float32), -clip), clip)
        tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty))

    @triton_op("budget_ctl::route", mutates_args=())
    def route(logits: torch.Tensor, top_k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [E] (any float dtype), top_k a 0-d integer tensor -> (expert ids [k_max] int32, ascending,
        ranks >= top_k replaced by E and placed last; routing probabilities [k_max] float32, 0 for those)."""
        E = logits.shape[-1]
        idx = torch.empty(k_max, dtype=torch.int32, device=logits.device)
        w = torch.empty(k_max, dtype=torch.float32, device=logits.device)
        wrap_triton(_route_kernel)[(1,)](logits, top_k, idx, w, E=E, E_P2=triton.next_power_of_2(E),
                                         K_MAX=k_max)
        return idx, w

    @triton_op("budget_ctl::expert_gemv", mutates_args=())
    def expert_gemv(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """w [E, N, K] (contiguous), idx [S] int32 (E = no expert), x [S, K] or [1, K] (shared by every
        slot) -> [S, N] in w's dtype: row s is w[idx[s]] @ x[s], zeros where idx[s] == E."""
        if not w.is_contiguous():
            raise ValueError("expert_gemv needs contiguous expert weights [E, N, K]")
        E, N, K = w.shape
        S = idx.shape[0]
        x = x.contiguous()
        out = torch.empty(S, N, dtype=w.dtype, device=w.device)
        stride = 0 if x.shape[0] == 1 else x.stride(0)
        if GEMV_FIXED is None:
            wrap_triton(_expert_gemv_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S)](
                w, idx, x, out, stride, N=N, K=K, E=E)
        else:
            bn, bk, nw, ns = GEMV_FIXED
            wrap_triton(_expert_gemv_body)[(triton.cdiv(N, bn), S)](
                w, idx, x, out, stride, N=N, K=K, E=E, BLOCK_N=bn, BLOCK_K=bk, EVEN=N % bn == 0 and K % bk == 0,
                num_warps=nw, num_stages=ns)
        return out

    ATTN_CHUNK = 32         # positions per split program (bench/triton_kernels_tune.py)

    @triton_op("budget_ctl::decode_attention", mutates_args=())
    def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """q [H, hd], caches [KV, L, hd] (contiguous), pos [1] long -> [H, hd]: softmax(q k^T * scale) v
        over positions 0..pos of each head's key/value head (H / KV query heads share one)."""
        H, hd = q.shape
        KV, L, _ = k_cache.shape
        q = q.contiguous()
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode_attention needs contiguous caches [KV, L, hd]")
        n_splits = triton.cdiv(L, ATTN_CHUNK)
        acc = torch.empty(H, n_splits, hd, dtype=torch.float32, device=q.device)
        m = torch.empty(H, n_splits, dtype=torch.float32, device=q.device)
        l = torch.empty(H, n_splits, dtype=torch.float32, device=q.device)
        wrap_triton(_attn_split_kernel)[(H, n_splits)](q, k_cache, v_cache, pos, acc, m, l, scale, L, n_splits,
                                                       GROUP=H // KV, HD=hd, CHUNK=ATTN_CHUNK, num_warps=4)
        out = torch.empty(H, hd, dtype=q.dtype, device=q.device)
        wrap_triton(_attn_combine_kernel)[(H,)](acc, m, l, out, n_splits, S_P2=triton.next_power_of_2(n_splits),
                                                HD=hd, num_warps=4)
        return out

    @triton_op("budget_ctl::qkv_rope_cache", mutates_args=("k_cache", "v_cache"))
    def qkv_rope_cache(qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float,
                       clip: float) -> torch.Tensor:
        """qkv [T, (H + 2 KV) hd] (the stacked projection of positions 0..T-1), norms [H hd] / [KV hd],
        cos/sin [T, hd], caches [1, KV, L, hd] or [KV, L, hd] -> q [H, T, hd] (normed, clipped when clip > 0, rotated);
        writes the rotated keys and the values to cache positions 0..T-1."""
        T = qkv.shape[0]
        KV, L, hd = k_cache.shape[-3:]
        H = q_norm.shape[0] // hd
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("qkv_rope_cache needs contiguous caches [KV, L, hd]")
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        q = torch.empty(H, T, hd, dtype=qkv.dtype, device=qkv.device)
        wrap_triton(_qkv_rope_cache_kernel)[(T,)](qkv, q_norm, k_norm, cos, sin, q, k_cache, v_cache, T, L, eps,
                                                  clip, H=H, KV=KV, HD=hd, HAS_CLIP=clip > 0, num_warps=4)
        return q
