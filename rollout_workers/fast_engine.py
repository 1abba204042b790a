"""The fast batch-1 engine (issue 8): static KV cache, grouped expert GEMMs, fused layer functions and
CUDA graphs.

Same model, same weights (the transformers modules' parameters are read in place, nothing is
copied), same knob semantics as :class:`rollout_workers.executors.EagerEngine`; what changes is how
the blocks run:

* **Static KV cache**: one preallocated [1, kv_heads, max_len, head_dim] pair per block. Prefill
  writes positions 0..T-1; a decode step writes its own position and attends to positions <= it, so
  the budget token's entry (position T) needs no removal: the first decode step overwrites it.
* **top_k is data, not shape**: the router always takes the top ``k_max`` experts and the ranks
  >= the block's top_k are sent to a sentinel expert that the grouped GEMM skips (its rows lie past
  the last offset), so one captured graph serves every top_k and no weights of unused experts move.
* **Experts as grouped GEMMs** (``torch.nn.functional.grouped_mm``): (token, expert) pairs sorted by
  expert, each selected expert's weights read once. The routed outputs are summed per token in
  ascending expert order in the model dtype, as transformers' eager loop does (its ``index_add_``).
* **Fused layer functions**: one block's decode step and one block's prefill are plain functions of
  tensors; on CUDA they are compiled with ``torch.compile`` (elementwise work fused into a few
  kernels; one compilation serves every block and every top_k; prefill is compiled with a dynamic
  length). Without a compiler (or ``compile=False``) the same functions run eagerly.
* **CUDA graphs**: one decode graph per block (every top_k and position: they are tensors), one for
  the embedding and one for the head; one prefill graph per block and prompt-length bucket (the
  prompt is padded at the end, where causal attention keeps padding away from real positions, and
  the padded keys/values lie beyond the decode mask until overwritten); one vision graph per crop
  count (the vision tower runs in the LLM's dtype). :meth:`FastEngine.warmup` captures all of them,
  so switching knob settings between requests never captures or compiles.

On CPU the same functions run without graphs or compilation (tests compare them with the eager
engine there).
"""
from __future__ import annotations

import logging
import time
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from rollout_workers import triton_kernels
from shared.knobs import select_blocks

log = logging.getLogger(__name__)


# ================================================================================ layer maths (pure)
class BlockWeights(NamedTuple):
    """One LLM block's parameters (views of the transformers modules' tensors)."""
    ln1: torch.Tensor          # [D]
    wqkv: torch.Tensor         # [(H + 2 KV) * hd, D]: q, k, v projections stacked (one GEMM)
    q_norm: torch.Tensor       # [H*hd]
    k_norm: torch.Tensor       # [KV*hd]
    wo: torch.Tensor           # [D, H*hd]
    ln2: torch.Tensor          # [D]
    router: torch.Tensor       # [E, D]
    gate_up: torch.Tensor      # [E, 2I, D]
    down: torch.Tensor         # [E, D, I]


class Shape(NamedTuple):
    """Static sizes and constants of the LLM blocks (Python numbers: specialised by the compiler)."""
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    clip_qkv: Optional[float]
    k_max: int
    scaling: float
    grouped: bool
    triton: bool = False    # rollout_workers.triton_kernels for decode steps and the prefill epilogue


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' OlmoeRMSNorm: float32 statistics, result cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype):
    """pos [T] (long) -> cos, sin [1, 1, T, head_dim] in ``dtype`` (transformers' default RoPE)."""
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype)[None, None], (emb.sin() * scale).to(dtype)[None, None]


def qkv(w: BlockWeights, s: Shape, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """xn [1, T, D] (normed) -> q [1, H, T, hd], k, v [1, KV, T, hd]: q/k norms, clipping, RoPE."""
    T = xn.shape[1]
    q, k, v = F.linear(xn, w.wqkv).split([s.n_heads * s.head_dim, s.n_kv * s.head_dim, s.n_kv * s.head_dim], dim=-1)
    q = rms_norm(q, w.q_norm, s.eps)
    k = rms_norm(k, w.k_norm, s.eps)
    if s.clip_qkv is not None:
        q, k, v = q.clamp(-s.clip_qkv, s.clip_qkv), k.clamp(-s.clip_qkv, s.clip_qkv), v.clamp(-s.clip_qkv, s.clip_qkv)
    q = q.view(1, T, s.n_heads, s.head_dim).transpose(1, 2)
    k = k.view(1, T, s.n_kv, s.head_dim).transpose(1, 2)
    v = v.view(1, T, s.n_kv, s.head_dim).transpose(1, 2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def expert_mm(rows: torch.Tensor, w: torch.Tensor, expert_of_row: torch.Tensor, offs: torch.Tensor,
              grouped: bool) -> torch.Tensor:
    """rows [R, in] sorted by expert (sentinel rows, expert id E, last), w [E, out, in] ->
    rows @ w[expert].T [R, out]; rows past ``offs[-1]`` are unspecified (callers mask them)."""
    if grouped:
        return F.grouped_mm(rows, w.transpose(1, 2), offs=offs)
    e = expert_of_row.clamp(max=w.shape[0] - 1)
    return torch.bmm(rows[:, None, :], w[e].transpose(1, 2))[:, 0]    # reads weights per row (tests, old GPUs)


def moe(w: BlockWeights, s: Shape, x: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """x [N, D], top_k a 0-d long tensor -> routed expert output [N, D] (softmax router, top_k of the
    probabilities without renormalisation, as OLMoE)."""
    n, E, kmax = x.shape[0], w.router.shape[0], s.k_max
    logits = F.linear(x, w.router)                                          # [N, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = torch.topk(probs, kmax, dim=-1)                          # [N, kmax], descending
    rank = torch.arange(kmax, device=x.device)
    if n > 1:
        return _moe_grouped(w, s, x, top_k, weights, idx)
    # decode: one token, whose slots (sorted by expert) are already grouped
    idx = torch.where(rank < top_k, idx, E)                                  # ranks >= top_k -> sentinel
    idx, order = idx.sort(dim=-1)                                           # ascending expert per token
    weights = weights.gather(-1, order).to(logits.dtype)
    expert_of_row = idx[0]
    rows = x.expand(kmax, -1).contiguous()
    counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, expert_of_row, torch.ones_like(expert_of_row, dtype=torch.int32))
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)                  # the sentinel group is left out
    gate, up = expert_mm(rows, w.gate_up, expert_of_row, offs, s.grouped).chunk(2, dim=-1)
    out = expert_mm(F.silu(gate) * up, w.down, expert_of_row, offs, s.grouped)   # [kmax, D]
    out = torch.where((expert_of_row < E)[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    routed = out.view(n, kmax, -1) * weights[..., None]
    acc = routed[:, 0]
    for j in range(1, kmax):               # eager's per-expert index_add_ order; inactive slots add 0
        acc = acc + routed[:, j]
    return acc


def _moe_grouped(w: BlockWeights, s: Shape, x: torch.Tensor, top_k: torch.Tensor, weights: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
    """:func:`moe` for N > 1 tokens, from the router's top k_max (``weights``, ``idx`` [N, kmax], descending).

    The (token, expert) pairs are grouped by expert, in token order within a group, active pairs
    (ranks < top_k) first and the inactive ones after the last group (the grouped GEMMs skip them), with
    no sort: a pair's place in its group is the number of earlier tokens that chose the same expert (a
    cumulative sum over the tokens of an [N, E] selection), and its slot among the token's experts in
    ascending expert order is the number of its active pairs with a smaller expert id (k_max^2 compares
    per token). The rows are gathered from ``x`` in grouped order; the expert outputs are gathered back
    per token and slot, weighted and summed over the slots in ascending expert order (inactive slots add
    0): one pass over the expert outputs when compiled. Same pairs, same grouped rows and the same sum
    order as the one-hot counting sort of the per-token sorted slots that it replaced (kept as the
    reference in tests/test_fast_engine.py and bench/moe_prefill_probe.py): bit-identical uncompiled;
    compiled, the weighted outputs now stay float32 up to the sum (they were stored in bf16 first), so
    bf16 results may differ by round-off."""
    n, E, kmax, dev = x.shape[0], w.router.shape[0], s.k_max, x.device
    rank = torch.arange(kmax, device=dev)
    active = rank < top_k                                                   # [kmax]
    experts = torch.arange(E, device=dev)
    sel = ((idx[:, :, None] == experts) & active[:, None]).sum(1, dtype=torch.int32)   # [N, E] 0/1
    csum = torch.cumsum(sel, 0, dtype=torch.int32)                          # [N, E] tokens <= t choosing e
    counts = csum[-1]                                                       # [E] pairs per expert
    offs = torch.cumsum(counts, 0, dtype=torch.int32)                       # ends of the groups
    before = (csum - sel).gather(1, idx)                                    # [N, kmax] earlier tokens, same expert
    tok = torch.arange(n, device=dev)[:, None]
    dest = torch.where(active, (offs - counts)[idx] + before,               # grouped position of each pair
                       offs[-1] + tok * (kmax - top_k) + (rank - top_k)).long()   # inactive: past the groups
    lower = ((idx[:, None, :] < idx[:, :, None]) & active).sum(-1)          # [N, kmax] active pairs, smaller id
    slot = torch.where(active, lower, rank)                                 # place in ascending expert order
    hit = slot[:, :, None] == rank                                          # [N, pair, slot] one-hot
    g = torch.where(hit, dest[:, :, None], 0).sum(1)                        # [N, kmax] grouped row per slot
    ws = torch.where(hit, weights[:, :, None], 0.0).sum(1).to(x.dtype)      # [N, kmax] its weight (exact)
    token_of_row = torch.empty(n * kmax, dtype=torch.long, device=dev).index_copy_(
        0, dest.view(-1), tok.expand(n, kmax).reshape(-1))
    expert_of_row = torch.empty(n * kmax, dtype=torch.long, device=dev).index_copy_(
        0, dest.view(-1), torch.where(active, idx, E).view(-1))
    rows = x[token_of_row]                                                  # [N*kmax, D] grouped by expert
    gate, up = expert_mm(rows, w.gate_up, expert_of_row, offs, s.grouped).chunk(2, dim=-1)
    out = expert_mm(F.silu(gate) * up, w.down, expert_of_row, offs, s.grouped)   # [N*kmax, D]
    routed = out[g] * ws[..., None]                                         # [N, kmax, D] per token and slot
    zero = torch.zeros((), dtype=out.dtype, device=dev)
    acc = torch.where(top_k > 0, routed[:, 0], zero)
    for j in range(1, kmax):               # eager's per-expert index_add_ order; inactive slots add 0
        acc = acc + torch.where(top_k > j, routed[:, j], zero)
    return acc


def block_prefill(w: BlockWeights, s: Shape, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """x [1, T, D] at positions 0..T-1 -> [1, T, D]; writes keys/values [1, KV, :T, hd] of this block."""
    T = x.shape[1]
    if s.triton:      # one epilogue pass: norms, RoPE, q head-major, k/v straight into the cache
        proj = F.linear(rms_norm(x, w.ln1, s.eps), w.wqkv).view(T, -1)
        q = triton_kernels.qkv_rope_cache(proj, w.q_norm, w.k_norm, cos.view(T, -1), sin.view(T, -1), k_cache,
                                          v_cache, s.eps, s.clip_qkv or 0.0)[None]
        k, v = k_cache[:, :, :T], v_cache[:, :, :T]
    else:
        q, k, v = qkv(w, s, rms_norm(x, w.ln1, s.eps), cos, sin)
        k_cache[:, :, :T] = k
        v_cache[:, :, :T] = v
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s.scaling, enable_gqa=s.n_kv != s.n_heads)
    x = x + F.linear(o.transpose(1, 2).reshape(1, T, -1), w.wo)
    y = moe(w, s, rms_norm(x, w.ln2, s.eps).view(T, -1), top_k)
    return x + y.view(1, T, -1)


def moe_decode(w: BlockWeights, s: Shape, x: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """One token's routed expert output with the Triton decode kernels: x [1, D] -> [1, D]. Same maths
    as :func:`moe` (softmax router, top_k without renormalisation, outputs summed in ascending expert
    order); only the selected experts' weights are read, with no sort or grouping step."""
    logits = F.linear(x, w.router)[0]                                       # [E]
    idx, probs = triton_kernels.route(logits, top_k, s.k_max)               # [kmax] ascending, sentinel E
    weights = probs.to(logits.dtype)
    gate, up = triton_kernels.expert_gemv(w.gate_up, idx, x).chunk(2, dim=-1)   # [kmax, I] each
    routed = triton_kernels.expert_gemv(w.down, idx, F.silu(gate) * up) * weights[:, None]   # [kmax, D]
    acc = routed[0]
    for j in range(1, s.k_max):            # ascending expert order; inactive slots are zeros
        acc = acc + routed[j]
    return acc[None]


def block_decode(w: BlockWeights, s: Shape, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 top_k: torch.Tensor) -> torch.Tensor:
    """x [1, 1, D] at position ``pos`` [1] -> [1, 1, D]; writes this position's keys/values and attends
    to the cache under ``mask`` [max_len] (True at positions <= pos)."""
    q, k, v = qkv(w, s, rms_norm(x, w.ln1, s.eps), cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    if s.triton:     # reads only positions <= pos
        o = triton_kernels.decode_attention(q.reshape(s.n_heads, s.head_dim), k_cache[0], v_cache[0], pos,
                                            s.scaling)
        x = x + F.linear(o.reshape(1, 1, -1), w.wo)
        y = moe_decode(w, s, rms_norm(x, w.ln2, s.eps).view(1, -1), top_k)
        return x + y.view(1, 1, -1)
    o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask.view(1, 1, 1, -1), scale=s.scaling,
                                       enable_gqa=s.n_kv != s.n_heads)
    x = x + F.linear(o.transpose(1, 2).reshape(1, 1, -1), w.wo)
    y = moe(w, s, rms_norm(x, w.ln2, s.eps).view(1, -1), top_k)
    return x + y.view(1, 1, -1)


def capture_graph(fn, pool=None) -> "torch.cuda.CUDAGraph":
    """Capture ``fn`` (which reads and writes only static buffers) as a CUDA graph on the current stream.
    It runs twice on a side stream first, outside the capture (allocator, compilation, lazy init)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    return g


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` runs for this device/dtype (bf16 on recent CUDA cards; CPU in torch >= 2.10)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, device=device, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype)
        F.grouped_mm(x, w, offs=torch.tensor([2, 4], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def block_weights(layer) -> BlockWeights:
    """The block's parameters; q/k/v projections are re-stored as views of one stacked tensor, so the
    fast engine runs one GEMM where transformers runs three, and no memory is duplicated."""
    a, mlp = layer.self_attn, layer.mlp
    wqkv = _stack_params(a, ("q_proj", "k_proj", "v_proj"), "_fast_wqkv", "weight")
    return BlockWeights(layer.input_layernorm.weight, wqkv, a.q_norm.weight, a.k_norm.weight, a.o_proj.weight,
                        layer.post_attention_layernorm.weight, mlp.gate.weight, mlp.experts.gate_up_proj,
                        mlp.experts.down_proj)


class VisionLayerWeights(NamedTuple):
    """One CLIP encoder layer's parameters; q/k/v stacked (as views, like the LLM blocks)."""
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wqkv: torch.Tensor          # [3 width, width]
    bqkv: torch.Tensor          # [3 width]
    wo: torch.Tensor
    bo: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w1: torch.Tensor            # [mlp, width]
    b1: torch.Tensor
    w2: torch.Tensor            # [width, mlp]
    b2: torch.Tensor


def _stack_params(module, names: Sequence[str], attr: str, tensor: str) -> torch.Tensor:
    """The ``tensor`` ("weight"/"bias") of ``module``'s linear layers ``names`` as one stacked tensor;
    the layers' own parameters become views of it (no memory duplicated), cached on ``module.<attr>``."""
    projs = [getattr(module, n) for n in names]
    stacked = getattr(module, attr, None)
    views = None if stacked is None else stacked.split([getattr(p, tensor).shape[0] for p in projs], dim=0)
    if views is None or any(getattr(p, tensor).data_ptr() != v.data_ptr() for p, v in zip(projs, views)):
        with torch.no_grad():
            stacked = torch.cat([getattr(p, tensor) for p in projs], dim=0)
        for p, view in zip(projs, stacked.split([getattr(p, tensor).shape[0] for p in projs], dim=0)):
            setattr(p, tensor, torch.nn.Parameter(view, requires_grad=False))
        setattr(module, attr, stacked)
    return stacked


def vision_layer_weights(layer) -> VisionLayerWeights:
    a, mlp = layer.self_attn, layer.mlp
    wqkv = _stack_params(a, ("q_proj", "k_proj", "v_proj"), "_fast_wqkv", "weight")
    bqkv = _stack_params(a, ("q_proj", "k_proj", "v_proj"), "_fast_bqkv", "bias")
    return VisionLayerWeights(layer.layer_norm1.weight, layer.layer_norm1.bias, wqkv, bqkv, a.out_proj.weight,
                              a.out_proj.bias, layer.layer_norm2.weight, layer.layer_norm2.bias, mlp.fc1.weight,
                              mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


def vision_layer(w: VisionLayerWeights, x: torch.Tensor, heads: int, eps: float,
                 mlp_row_chunks: int = 1) -> torch.Tensor:
    """CLIP's pre-LayerNorm encoder layer (no mask, non-causal, quick-GELU MLP), as transformers runs
    it but with one stacked q/k/v GEMM. x [n_crops, S, width] -> [n_crops, S, width].

    mlp_row_chunks > 1 runs the MLP over that many slices of the n_crops * S rows, so that one slice's
    [rows, mlp] activation can stay in the GPU's L2 cache between the up-projection, the activation and
    the down-projection (same maths, row by row). Measured on an H100 it did not pay (docs/PERFORMANCE.md):
    the engine uses 1; bench/vision_speed.py keeps the variants."""
    n, S, width = x.shape
    h = F.layer_norm(x, (width,), w.ln1_w, w.ln1_b, eps)
    q, k, v = F.linear(h, w.wqkv, w.bqkv).view(n, S, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v)          # scale head_dim^-0.5, CLIP's
    x = x + F.linear(a.transpose(1, 2).reshape(n, S, width), w.wo, w.bo)
    h = F.layer_norm(x, (width,), w.ln2_w, w.ln2_b, eps)
    if mlp_row_chunks <= 1:
        u = F.linear(h, w.w1, w.b1)
        return x + F.linear(u * torch.sigmoid(1.702 * u), w.w2, w.b2)
    outs = []
    for part in h.reshape(n * S, width).chunk(mlp_row_chunks, dim=0):
        u = F.linear(part, w.w1, w.b1)
        outs.append(F.linear(u * torch.sigmoid(1.702 * u), w.w2, w.b2))
    return x + torch.cat(outs, dim=0).view(n, S, width)


# ================================================================================ the engine
class FastEngine:
    """Batch-1 engine over a loaded ``MolmoeModel`` (eval mode, on its device).

    Args:
        model: the model; its vision tower and connector are cast to the LLM dtype.
        max_len: positions the static cache holds (prompt + budget token + answer); decode attends to
            all of them under a mask, so a smaller cache reads fewer bytes per token.
        prefill_bucket: with graphs, prompts are padded to a multiple of this many positions (one
            prefill graph per block and length bucket).
        pad_prefill: pad prompts to the bucket without graphs too (default: with graphs; tests).
        use_graphs: capture decode steps and the vision tower as CUDA graphs (default: on CUDA).
        compile: fuse the layer functions with ``torch.compile`` (default: on CUDA).
        top_k_max: the largest top_k a request may ask for (default: the model's native top_k).
        triton: run the Triton kernels of ``triton_kernels``: decode steps with fused routing, expert
            GEMVs over the selected experts only and attention up to the current position; the
            prefill's q/k-norm + RoPE + cache-write epilogue. Default: on CUDA when Triton is installed
            and head counts and size are powers of two.
    """

    name = "fast"
    device_top_k = True       # top_k is device data: `write_top_k_on_device`, `prefill(..., top_k=None)`

    def __init__(self, model, *, max_len: int = 2048, prefill_bucket: int = 64, use_graphs: Optional[bool] = None,
                 compile: Optional[bool] = None, top_k_max: Optional[int] = None, pad_prefill: Optional[bool] = None,
                 triton: Optional[bool] = None):
        self.model = model.eval()
        cfg = model.config
        self.cfg = cfg
        dev, dt = model.device, model.dtype
        if model.vision_dtype != dt:
            model.vision.to(dt)
            model.connector.to(dt)
        self.device, self.dtype = dev, dt
        cuda = dev.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else bool(use_graphs)
        if self.use_graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.compile = cuda if compile is None else bool(compile)
        self.n_layers = cfg.n_layers
        self.native_k = cfg.top_k
        self.max_len = int(max_len)
        self.prefill_bucket = max(1, int(prefill_bucket))
        self.pad_prefill = self.use_graphs if pad_prefill is None else bool(pad_prefill)
        layers = model.llm.model.layers
        self.weights = [block_weights(layer) for layer in layers]
        # grouped GEMMs in bf16 on CUDA when compiled (the compiled kernel supports nothing else), any dtype on CPU
        # (uncompiled, other dtypes run through torch's own grouped-GEMM fallback where it has one)
        grouped = grouped_mm_supported(dev, dt) and (dt == torch.bfloat16 or not cuda or not self.compile)
        self.shape = Shape(cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, float(cfg.layer_norm_eps),
                           None if cfg.clip_qkv is None else float(cfg.clip_qkv),
                           max(self.native_k, int(top_k_max or 0)), float(layers[0].self_attn.scaling), grouped)
        kernels_ok = (triton_kernels.available(dev)
                      and triton_kernels.shapes_supported(cfg.n_heads, cfg.n_kv_heads, self.shape.head_dim))
        if triton and not kernels_ok:
            raise ValueError("the Triton kernels need a CUDA device, Triton, and power-of-two head counts and "
                             f"head size (device {dev}, heads {cfg.n_heads}/{cfg.n_kv_heads}, head size "
                             f"{self.shape.head_dim})")
        self.shape = self.shape._replace(triton=kernels_ok if triton is None else bool(triton))
        self.triton = self.shape.triton
        rot = model.llm.model.rotary_emb
        self.inv_freq = rot.inv_freq.to(device=dev, dtype=torch.float32)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        hd = self.shape.head_dim
        # one tensor per block (not views of one: compiled code then sees identical inputs for every block)
        shape = (1, cfg.n_kv_heads, self.max_len, hd)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(self.n_layers)]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(self.n_layers)]
        # per-block top_k as device data (changed only when a request changes it), static decode buffers
        self._top_k = [torch.full((), self.native_k, dtype=torch.long, device=dev) for _ in range(self.n_layers)]
        self._top_k_host: list[int] = [self.native_k] * self.n_layers
        self._k_values = [torch.tensor(k, dtype=torch.long, device=dev) for k in range(self.shape.k_max + 1)]
        self._top_k_tables: dict[tuple, torch.Tensor] = {}     # a knob space's top_k options on the device
        self._tok = torch.zeros(1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._x = torch.zeros(1, 1, cfg.d_model, device=dev, dtype=dt)
        self._cos = torch.zeros(1, 1, 1, hd, device=dev, dtype=dt)
        self._sin = torch.zeros(1, 1, 1, hd, device=dev, dtype=dt)
        self._mask = torch.zeros(self.max_len, dtype=torch.bool, device=dev)
        self._arange = torch.arange(self.max_len, device=dev)
        self._logits = torch.zeros(1, 1, cfg.embedding_size, device=dev, dtype=dt)
        self._tok_host = torch.zeros(1, dtype=torch.long, pin_memory=cuda)    # greedy_decode's EOS check
        self.preprocess_device = dev if cuda else None     # crops are cut on the GPU (MolmoPreprocessor)
        vit = model.vision.encoder.layers[: max(cfg.vit_block_indices) + 1]
        self.vision_weights = [vision_layer_weights(layer) for layer in vit]
        self._decode_fn = block_decode
        self._prefill_fn = block_prefill
        self._vision_fn = self._vision_eager
        if self.compile:
            self._decode_fn = torch.compile(block_decode, dynamic=False)
            self._prefill_fn = torch.compile(block_prefill, dynamic=True)
            self._vision_fn = torch.compile(self._vision_eager, dynamic=True)
        self._graphs: dict = {}
        self._prefill_bufs: dict = {}
        self._vision: dict = {}
        self._pool = None
        self.captured = 0
        self.captures_after_warmup = 0
        self._warm = False

    # ------------------------------------------------------------------ request API
    def begin(self) -> None:
        """Nothing to reset: prefill overwrites positions 0..T-1 and decode masks what lies beyond."""

    @torch.no_grad()
    def encode(self, inputs) -> torch.Tensor:
        """MolmoInputs (on the device) -> input embeddings [1, T, d_model]."""
        feats = None
        if inputs.images is not None:
            feats = self._encode_images(inputs.images, inputs.image_masks)
        return self.model.embed(inputs.input_ids, image_features=feats, image_input_idx=inputs.image_input_idx)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, block_ids: Sequence[int],
                top_k: Optional[Mapping[int, int]]) -> torch.Tensor:
        """x [1, T, D] at positions 0..T-1 through ``block_ids`` -> [1, T, D]; K/V written to 0..T-1.
        ``top_k=None``: the blocks run at the top_k already in device memory (`write_top_k_on_device`)."""
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"a prompt of {T} tokens exceeds the fast engine's cache of {self.max_len} "
                             f"positions (model.fast_max_len)")
        if top_k is not None:
            self._set_top_k(block_ids, top_k)
        if self.use_graphs or self.pad_prefill:   # padded to the length bucket, after every real position
            Tb = self._prefill_bucket(T)
            buf = self._prefill_buffers(Tb)[0]
            if x.data_ptr() != buf.data_ptr():
                buf[:, :T].copy_(x)
                buf[:, T:].zero_()
            # else the rest of a split prefill continues in place: its pad rows carry on from the prefix's
            # blocks, as they would in one unsplit prefill (no real row reads them: causal attention)
            for b in block_ids:
                if self.use_graphs:
                    self._prefill_graph(int(b), Tb).replay()
                else:
                    self._prefill_body(int(b), Tb)
            return buf[:, :T]
        cos, sin = rope_cos_sin(torch.arange(T, device=self.device), self.inv_freq, self.rope_scale, self.dtype)
        h = x
        for b in block_ids:
            h = self._prefill_fn(self.weights[b], self.shape, h, cos, sin, self.k_cache[b], self.v_cache[b],
                                 self._top_k[b])
        return h

    def _prefill_bucket(self, T: int) -> int:
        return min(self.max_len, -(-T // self.prefill_bucket) * self.prefill_bucket)

    def _prefill_buffers(self, Tb: int):
        """Static input/output [1, Tb, D] and RoPE tables of one length bucket."""
        bufs = self._prefill_bufs.get(Tb)
        if bufs is None:
            cos, sin = rope_cos_sin(torch.arange(Tb, device=self.device), self.inv_freq, self.rope_scale, self.dtype)
            bufs = (torch.zeros(1, Tb, self.cfg.d_model, device=self.device, dtype=self.dtype), cos, sin)
            self._prefill_bufs[Tb] = bufs
        return bufs

    def _prefill_body(self, b: int, Tb: int) -> None:
        buf, cos, sin = self._prefill_buffers(Tb)
        buf.copy_(self._prefill_fn(self.weights[b], self.shape, buf, cos, sin, self.k_cache[b], self.v_cache[b],
                                   self._top_k[b]))

    def _prefill_graph(self, b: int, Tb: int):
        return self._graph(("prefill", b, Tb), lambda: self._prefill_body(b, Tb),
                           keep=(self._prefill_buffers(Tb)[0],))

    def truncate(self, length: int, block_ids: Sequence[int]) -> None:
        """No-op: the next decode step writes position ``length`` and attends to positions <= it."""

    @torch.no_grad()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h)

    @torch.no_grad()
    def decode_step(self, token_id: int, position: int, block_ids: Sequence[int],
                    top_k: Mapping[int, int]) -> torch.Tensor:
        """One token at ``position`` -> logits [1, 1, V] (a static buffer: read it before the next step)."""
        if position >= self.max_len:
            raise ValueError(f"position {position} is beyond the fast engine's cache of {self.max_len} "
                             f"positions (model.fast_max_len)")
        self._set_top_k(block_ids, top_k)
        self._tok.fill_(int(token_id))
        self._pos.fill_(int(position))
        if not self.use_graphs:
            self._embed_step()
            for b in block_ids:
                self._block_step(b)
            self._head_step()
            return self._logits
        whole = self._graphs.get(("step", tuple(int(b) for b in block_ids)))
        if whole is not None:          # one replay for the whole step (block lists captured at warm-up)
            whole.replay()
            return self._logits
        self._graph(("embed",), self._embed_step).replay()
        for b in block_ids:
            self._graph(("block", int(b)), lambda b=b: self._block_step(b), keep=(self._x,)).replay()
        self._graph(("head",), self._head_step).replay()
        return self._logits

    @torch.no_grad()
    def greedy_decode(self, logits: torch.Tensor, start: int, block_ids: Sequence[int], top_k: Mapping[int, int],
                      max_new_tokens: int, eos: Optional[int]) -> Optional[list[int]]:
        """Greedy answer ids from the prefill's last logits [1, 1, V]: the first token from them, then one
        decode step per token at positions start, start + 1, ... until ``eos`` (kept) or ``max_new_tokens``.

        Each step's argmax and position increment run on the device inside the step (one graph replay
        when the block list's whole-step graph was captured), and the host reads each token through one
        small pinned copy queued behind the step for the end-of-sequence check: between two steps the GPU
        waits only for that check, not for an argmax launch, a synchronising copy and two buffer fills.
        Returns None when graphs are on but this block list has no whole-step graph (the caller then runs
        ``decode_step`` per token); same tokens as that loop (tested)."""
        key = ("step", tuple(int(b) for b in block_ids))
        graph = self._graphs.get(key) if self.use_graphs else None
        if self.use_graphs and graph is None:
            return None
        self._set_top_k(block_ids, top_k)
        cuda = self.device.type == "cuda"
        torch.argmax(logits.reshape(-1), dim=0, keepdim=True, out=self._tok)
        self._tok_host.copy_(self._tok, non_blocking=cuda)
        self._pos.fill_(int(start))
        out: list[int] = []
        for i in range(max_new_tokens):
            if cuda:
                torch.cuda.current_stream().synchronize()
            tok = int(self._tok_host[0])
            out.append(tok)
            if tok == eos or i == max_new_tokens - 1:
                break
            if start + i >= self.max_len:
                raise ValueError(f"position {start + i} is beyond the fast engine's cache of {self.max_len} "
                                 f"positions (model.fast_max_len)")
            if graph is not None:
                graph.replay()
            else:
                self._whole_step(block_ids)
            self._tok_host.copy_(self._tok, non_blocking=cuda)
        return out

    # ------------------------------------------------------------------ warm-up / graphs
    @torch.no_grad()
    def warmup(self, space=None, crop_counts: Optional[Sequence[int]] = None, importance=None,
               block_lists: Optional[Sequence[Sequence[int]]] = None) -> dict:
        """Compile the layer functions and capture every graph a request can use: the embedding, each
        block and the head for decode, and the vision tower for every crop count the knob space allows.
        With ``importance`` (an ImportanceScores or a sequence of scores) and ``space``, or explicit
        ``block_lists``, one graph per executed-block list runs a whole decode step in one replay
        (the per-block graphs stay for any other list).
        Returns {"graphs", "step_graphs", "seconds", "compiled"} (and "compile_error" when compilation
        fell back)."""
        t0 = time.perf_counter()
        if space is not None and max(space.top_ks) > self.shape.k_max:
            raise ValueError(f"top_k options up to {max(space.top_ks)} but the engine was built for at most "
                             f"{self.shape.k_max} (top_k_max)")
        report: dict = {"compiled": self.compile}
        if self.compile:     # compile prefill once for a dynamic length (two lengths mark it dynamic)
            try:
                for T in (17, 33):
                    x = torch.zeros(1, T, self.cfg.d_model, device=self.device, dtype=self.dtype)
                    self.prefill(x, [0], {})
                self._decode_fn(self.weights[0], self.shape, self._x, self._pos, self._cos, self._sin, self._mask,
                                self.k_cache[0], self.v_cache[0], self._top_k[0])
                for n in (2, 3):
                    self._vision_fn(torch.zeros(n, self.cfg.patches_per_crop, self.cfg.patch_dim, device=self.device,
                                                 dtype=self.dtype),
                                     torch.ones(n, self.cfg.patches_per_crop, device=self.device, dtype=self.dtype))
            except Exception as exc:     # no compiler toolchain, unsupported op: run the same functions eagerly
                log.warning("torch.compile failed (%s: %s); the fast engine runs its layer functions uncompiled",
                            type(exc).__name__, exc)
                self.compile, self._decode_fn, self._prefill_fn = False, block_decode, block_prefill
                self._vision_fn = self._vision_eager
                report.update(compiled=False, compile_error=f"{type(exc).__name__}: {exc}"[:500])
        if self.use_graphs:
            self._pos.fill_(0)
            self._graph(("embed",), self._embed_step)
            self._graph(("head",), self._head_step)
            for b in range(self.n_layers):
                self._graph(("block", b), lambda b=b: self._block_step(b))
            for Tb in sorted({self._prefill_bucket(t) for t in range(1, self.max_len + 1, self.prefill_bucket)}):
                for b in range(self.n_layers):
                    self._prefill_graph(b, Tb)
            if crop_counts is None and space is not None:
                crop_counts = range(1, max(space.tier_max_crops) + 2)     # global view + up to max_crops crops
            for n in crop_counts or ():
                self._vision_graph(int(n))
            lists = {tuple(int(b) for b in bl) for bl in (block_lists or ())}
            if space is not None and importance is not None:
                scores = getattr(importance, "scores", importance)
                lists |= {tuple(select_blocks(p, nb, scores)) for p in space.positions for nb in space.num_blocks
                          if p < nb}
            for bl in sorted(lists):
                self._graph(("step", bl), lambda bl=bl: self._whole_step(bl))
            report["step_graphs"] = len(lists)
            torch.cuda.synchronize()
        self._warm = True
        report.update(graphs=len(self._graphs) + len(self._vision), seconds=time.perf_counter() - t0)
        return report

    def write_top_k_on_device(self, first_block: int, k_index: torch.Tensor, top_ks: Sequence[int]) -> None:
        """Queue top_k[b] = top_ks[k_index] for every block b >= first_block, from a decision that is still on the
        device (`k_index`: a scalar tensor there, e.g. Stage2's output), so that blocks can be queued before the
        host has read the decision. The host's record of those blocks' top_k is unknown until `note_top_k`."""
        key = tuple(int(k) for k in top_ks)
        if max(key) > self.shape.k_max or min(key) < 1:
            raise ValueError(f"top_k options {key} outside 1..{self.shape.k_max} (the fast engine's top_k_max)")
        table = self._top_k_tables.get(key)
        if table is None:
            table = self._top_k_tables[key] = torch.tensor(key, dtype=torch.long, device=self.device)
        # index_select, not table[k_index]: indexing with a 0-d tensor reads it on the host (a sync that waits for
        # the decision, which is what this method exists to avoid)
        k = torch.index_select(table, 0, k_index.long().reshape(1)).reshape(())
        blocks = range(int(first_block), self.n_layers)
        torch._foreach_copy_([self._top_k[b] for b in blocks], [k] * len(blocks))
        for b in blocks:
            self._top_k_host[b] = -1          # unknown: the next _set_top_k copies

    def note_top_k(self, first_block: int, k: int) -> None:
        """Record that blocks >= first_block hold top_k ``k`` on the device (after `write_top_k_on_device`, once
        the host has read the decision), so that later requests skip copying what is already there."""
        for b in range(int(first_block), self.n_layers):
            self._top_k_host[b] = int(k)

    def _set_top_k(self, block_ids: Sequence[int], top_k: Mapping[int, int]) -> None:
        """Per-block top_k (device data read by the compiled code and the graphs) for the blocks about to
        run; other blocks keep theirs. The changed values go in one multi-tensor copy: after the Stage2
        decision the GPU is idle, and one small launch per block would leave it waiting."""
        bad = [k for k in top_k.values() if not 1 <= int(k) <= self.shape.k_max]
        if bad:
            raise ValueError(f"top_k {bad[0]} outside 1..{self.shape.k_max} (the fast engine's top_k_max)")
        dst, src = [], []
        for b in block_ids:
            k = int(top_k.get(b, self.native_k))
            if k != self._top_k_host[b]:
                dst.append(self._top_k[b])
                src.append(self._k_values[k])
                self._top_k_host[b] = k
        if dst:
            torch._foreach_copy_(dst, src)

    def _graph(self, key, fn, keep: Sequence[torch.Tensor] = ()):
        """The graph of ``key``, captured from ``fn`` on first use. A capture runs ``fn`` (twice, and on the live
        buffers): ``keep`` are the buffers ``fn`` updates in place (a block's hidden state), restored after a
        capture, so that one made in the middle of a request (an engine not warmed up) leaves its state as it
        was and the replay computes what it should."""
        g = self._graphs.get(key)
        if g is None:
            saved = [t.clone() for t in keep]
            g = self._capture(fn)
            for t, s in zip(keep, saved):
                t.copy_(s)
            self._graphs[key] = g
        return g

    def _capture(self, fn):
        if self._warm:
            self.captures_after_warmup += 1
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self.captured += 1
        return capture_graph(fn, self._pool)

    # ------------------------------------------------------------------ decode step pieces (graph bodies)
    def _embed_step(self) -> None:
        self._x.copy_(self.model.embed_tokens(self._tok))
        cos, sin = rope_cos_sin(self._pos, self.inv_freq, self.rope_scale, self.dtype)
        self._cos.copy_(cos)
        self._sin.copy_(sin)
        torch.le(self._arange, self._pos, out=self._mask)

    def _whole_step(self, block_ids: Sequence[int]) -> None:
        """A decode step, then the greedy token into ``_tok`` and the next position into ``_pos`` (for
        ``greedy_decode``; ``decode_step`` overwrites both before each step)."""
        self._embed_step()
        for b in block_ids:
            self._block_step(b)
        self._head_step()
        torch.argmax(self._logits.reshape(-1), dim=0, keepdim=True, out=self._tok)
        self._pos.add_(1)

    def _block_step(self, b: int) -> None:
        out = self._decode_fn(self.weights[b], self.shape, self._x, self._pos, self._cos, self._sin, self._mask,
                              self.k_cache[b], self.v_cache[b], self._top_k[b])
        self._x.copy_(out)

    def _head_step(self) -> None:
        self._logits.copy_(self.model.head(self._x))

    # ------------------------------------------------------------------ vision
    def _vision_eager(self, images: torch.Tensor, image_masks: Optional[torch.Tensor]) -> torch.Tensor:
        """The model's ``encode_images`` with this engine's ViT layers (``vision_layer``)."""
        heads, eps = self.cfg.vit_num_heads, float(self.cfg.vit_layer_norm_eps)
        return self.model.encode_images(images, image_masks,
                                        layer_fn=lambda i, h: vision_layer(self.vision_weights[i], h, heads, eps))

    def _encode_images(self, images: torch.Tensor, image_masks: Optional[torch.Tensor]) -> torch.Tensor:
        """[n_crops, n_patches, patch_dim] -> [n_crops, tokens_per_crop, d_model], replaying the crop
        count's graph when there is one (a mask is always passed inside graphs: ones when absent)."""
        if images.dim() == 4 and images.shape[0] == 1:
            images = images[0]
        if image_masks is not None and image_masks.dim() == 3 and image_masks.shape[0] == 1:
            image_masks = image_masks[0]
        if not self.use_graphs or image_masks is None:
            return self._vision_fn(images, image_masks)
        g, x_in, m_in, out = self._vision_graph(images.shape[0])   # captured at warm-up for every count
        x_in.copy_(images)
        m_in.copy_(image_masks)
        g.replay()
        return out

    def _vision_graph(self, n: int):
        if n in self._vision:
            return self._vision[n]
        cfg = self.cfg
        x_in = torch.zeros(n, cfg.patches_per_crop, cfg.patch_dim, device=self.device, dtype=self.dtype)
        m_in = torch.ones(n, cfg.patches_per_crop, device=self.device, dtype=self.dtype)
        out = torch.zeros(n, cfg.tokens_per_crop, cfg.d_model, device=self.device, dtype=self.dtype)
        g = self._capture(lambda: out.copy_(self._vision_fn(x_in, m_in)))
        self._vision[n] = (g, x_in, m_in, out)
        return self._vision[n]
