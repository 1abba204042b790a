"""The fast batch-1 engine (issue 8): static KV cache, grouped expert GEMMs, CUDA graphs for decode.

Same model, same weights (the transformers modules' parameters are read in place, nothing is
copied), same knob semantics as :class:`rollout_workers.executors.EagerEngine`; what changes is how
the blocks run:

* **Static KV cache**: one preallocated [1, kv_heads, max_len, head_dim] pair per block. Prefill
  writes positions 0..T-1; a decode step writes its own position and attends to positions <= it, so
  the budget token's entry (position T) needs no removal: the first decode step overwrites it.
* **Experts as grouped GEMMs** (``torch.nn.functional.grouped_mm``): the (token, expert) pairs are
  sorted by expert and each expert's weights are read once, only for experts that have tokens. No
  host synchronisation, so a step can be captured. The routed outputs are summed per token in
  ascending expert order in the model dtype, as transformers' eager loop does (its ``index_add_``),
  so bf16 results follow the eager engine's rounding.
* **CUDA graphs for decode**: one graph per (block, top_k, KV bucket). A decode step replays the
  embedding graph, the graph of each executed block at its top_k, and the head graph; keys/values
  are attended up to the step's KV bucket (``kv_bucket`` positions), so a short prompt does not
  read the whole cache. :meth:`FastEngine.warmup` captures every graph the knob space can ask for,
  so switching settings between requests never captures or compiles anything.
* Prefill and the vision encoder run eagerly (their lengths vary per request) with the same grouped
  experts and SDPA attention. The vision tower runs in the LLM's dtype.

On CPU the same code runs without graphs (tests compare it with the eager engine there).
"""
from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' OlmoeRMSNorm: float32 statistics, result cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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


class FastEngine:
    """Batch-1 engine over a loaded ``MolmoeModel`` (eval mode, on its device).

    Args:
        model: the model; its vision tower and connector are cast to the LLM dtype.
        max_len: positions the static cache holds (prompt + budget token + answer).
        kv_bucket: decode attends to the cache in multiples of this many positions.
        use_graphs: capture decode steps as CUDA graphs (default: on CUDA).
    """

    name = "fast"

    def __init__(self, model, *, max_len: int = 2048, kv_bucket: int = 256, use_graphs: Optional[bool] = None):
        self.model = model.eval()
        cfg = model.config
        self.cfg = cfg
        dev, dt = model.device, model.dtype
        if model.vision_dtype != dt:
            model.vision.to(dt)
            model.connector.to(dt)
        self.device, self.dtype = dev, dt
        self.n_layers = cfg.n_layers
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.native_k = cfg.top_k
        self.eps = cfg.layer_norm_eps
        self.clip_qkv = cfg.clip_qkv
        self.max_len = int(max_len)
        self.kv_bucket = max(1, min(int(kv_bucket), self.max_len))
        self.use_graphs = (dev.type == "cuda") if use_graphs is None else bool(use_graphs)
        if self.use_graphs and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.layers = model.llm.model.layers
        rot = model.llm.model.rotary_emb
        self.inv_freq = rot.inv_freq.to(device=dev, dtype=torch.float32)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.grouped = grouped_mm_supported(dev, dt)
        shape = (self.n_layers, 1, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=dt)
        self.v_cache = torch.zeros(shape, device=dev, dtype=dt)
        # static decode buffers (graph inputs/outputs)
        self._tok = torch.zeros(1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._x = torch.zeros(1, 1, cfg.d_model, device=dev, dtype=dt)
        self._cos = torch.zeros(1, 1, 1, self.head_dim, device=dev, dtype=dt)
        self._sin = torch.zeros(1, 1, 1, self.head_dim, device=dev, dtype=dt)
        self._mask = torch.zeros(self.max_len, dtype=torch.bool, device=dev)
        self._arange = torch.arange(self.max_len, device=dev)
        self._logits = torch.zeros(1, 1, cfg.embedding_size, device=dev, dtype=dt)
        self._graphs: dict = {}
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
            feats = self.model.encode_images(inputs.images, inputs.image_masks)
        return self.model.embed(inputs.input_ids, image_features=feats, image_input_idx=inputs.image_input_idx)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, block_ids: Sequence[int], top_k: Mapping[int, int]) -> torch.Tensor:
        """x [1, T, D] at positions 0..T-1 through ``block_ids`` -> [1, T, D]; K/V written to 0..T-1."""
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"a prompt of {T} tokens exceeds the fast engine's cache of {self.max_len} "
                             f"positions (model.max_len)")
        pos = torch.arange(T, device=self.device)
        cos, sin = self._rope(pos)
        h = x
        for b in block_ids:
            h = self._block_prefill(b, h, cos, sin, int(top_k.get(b, self.native_k)))
        return h

    def truncate(self, length: int, block_ids: Sequence[int]) -> None:
        """No-op: the next decode step writes position ``length`` and attends to positions <= it."""

    @torch.no_grad()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h)

    @torch.no_grad()
    def decode_step(self, token_id: int, position: int, block_ids: Sequence[int],
                    top_k: Mapping[int, int]) -> torch.Tensor:
        """One token at ``position`` -> logits [1, 1, V] (a static buffer on CUDA: read it before the next step)."""
        if position >= self.max_len:
            raise ValueError(f"position {position} is beyond the fast engine's cache of {self.max_len}")
        self._tok.fill_(int(token_id))
        self._pos.fill_(int(position))
        bucket = self._bucket(position)
        if not self.use_graphs:
            self._embed_step()
            for b in block_ids:
                self._block_step(b, int(top_k.get(b, self.native_k)), bucket)
            self._head_step()
            return self._logits
        self._graph(("embed",), self._embed_step).replay()
        for b in block_ids:
            k = int(top_k.get(b, self.native_k))
            self._graph(("block", int(b), k, bucket), lambda b=b, k=k: self._block_step(b, k, bucket)).replay()
        self._graph(("head",), self._head_step).replay()
        return self._logits

    # ------------------------------------------------------------------ warm-up / graphs
    @torch.no_grad()
    def warmup(self, space=None, top_ks: Optional[Sequence[int]] = None) -> dict:
        """Capture every decode graph a request can use: each block at the native top_k and at every
        top_k option, for every KV bucket. Returns {"graphs", "seconds"}."""
        t0 = time.perf_counter()
        if self.use_graphs:
            ks = sorted({self.native_k, *(space.top_ks if space is not None else ()), *(top_ks or ())})
            buckets = range(self.kv_bucket, self.max_len + self.kv_bucket, self.kv_bucket)
            self._pos.fill_(0)
            self._graph(("embed",), self._embed_step)
            self._graph(("head",), self._head_step)
            for b in range(self.n_layers):
                for k in ks:
                    for bucket in buckets:
                        bucket = min(bucket, self.max_len)
                        self._graph(("block", b, k, bucket), lambda b=b, k=k, n=bucket: self._block_step(b, k, n))
            torch.cuda.synchronize()
        self._warm = True
        return {"graphs": len(self._graphs), "seconds": time.perf_counter() - t0}

    def _bucket(self, position: int) -> int:
        n = (position // self.kv_bucket + 1) * self.kv_bucket
        return min(n, self.max_len)

    def _graph(self, key, fn):
        g = self._graphs.get(key)
        if g is not None:
            return g
        if self._warm:
            self.captures_after_warmup += 1
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):    # warm-up run outside the capture (allocator, lazy init)
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            fn()
        self._graphs[key] = g
        self.captured += 1
        return g

    # ------------------------------------------------------------------ decode step pieces (graph bodies)
    def _embed_step(self) -> None:
        self._x.copy_(self.model.embed_tokens(self._tok))
        cos, sin = self._rope(self._pos)
        self._cos.copy_(cos)
        self._sin.copy_(sin)
        torch.le(self._arange, self._pos, out=self._mask)

    def _block_step(self, b: int, k: int, kv_len: int) -> None:
        layer = self.layers[b]
        x = self._x
        a = layer.self_attn
        q, kk, v = self._qkv(layer, _rms_norm(x, layer.input_layernorm.weight, self.eps), self._cos, self._sin)
        self.k_cache[b].index_copy_(2, self._pos, kk)
        self.v_cache[b].index_copy_(2, self._pos, v)
        keys = self.k_cache[b][:, :, :kv_len]
        values = self.v_cache[b][:, :, :kv_len]
        mask = self._mask[:kv_len].view(1, 1, 1, kv_len)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=a.scaling,
                                           enable_gqa=self.n_kv != self.n_heads)
        x = x + a.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
        y = self._moe(b, _rms_norm(x, layer.post_attention_layernorm.weight, self.eps).view(1, -1), k)
        self._x.copy_(x + y.view(1, 1, -1))

    def _head_step(self) -> None:
        self._logits.copy_(self.model.head(self._x))

    # ------------------------------------------------------------------ shared maths
    def _rope(self, pos: torch.Tensor):
        """pos [T] (long) -> cos, sin [1, 1, T, head_dim] in the model dtype (transformers' default RoPE)."""
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[None, None]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)[None, None]
        return cos, sin

    def _qkv(self, layer, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """xn [1, T, D] (normed) -> q [1, H, T, hd], k, v [1, KV, T, hd] with q/k norms, clipping and RoPE."""
        a = layer.self_attn
        T = xn.shape[1]
        q = _rms_norm(a.q_proj(xn), a.q_norm.weight, self.eps)
        k = _rms_norm(a.k_proj(xn), a.k_norm.weight, self.eps)
        v = a.v_proj(xn)
        if self.clip_qkv is not None:
            c = float(self.clip_qkv)
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(1, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(1, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _block_prefill(self, b: int, x: torch.Tensor, cos, sin, k: int) -> torch.Tensor:
        layer = self.layers[b]
        a = layer.self_attn
        T = x.shape[1]
        q, kk, v = self._qkv(layer, _rms_norm(x, layer.input_layernorm.weight, self.eps), cos, sin)
        self.k_cache[b, :, :, :T] = kk
        self.v_cache[b, :, :, :T] = v
        o = F.scaled_dot_product_attention(q, kk, v, is_causal=True, scale=a.scaling,
                                           enable_gqa=self.n_kv != self.n_heads)
        x = x + a.o_proj(o.transpose(1, 2).reshape(1, T, -1))
        y = self._moe(b, _rms_norm(x, layer.post_attention_layernorm.weight, self.eps).view(T, -1), k)
        return x + y.view(1, T, -1)

    def _moe(self, b: int, x: torch.Tensor, k: int) -> torch.Tensor:
        """x [N, D] -> routed expert output [N, D] at top_k ``k`` (softmax router, no renormalisation)."""
        mlp = self.layers[b].mlp
        experts = mlp.experts
        n = x.shape[0]
        logits = F.linear(x, mlp.gate.weight)                                  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, k, dim=-1)                            # [N, k]
        idx, order = idx.sort(dim=-1)                                          # ascending expert per token
        weights = weights.gather(-1, order).to(logits.dtype)
        flat = idx.reshape(-1)                                                 # [N*k]
        expert_of_row, perm = flat.sort(stable=True)
        rows = x[perm // k]                                                    # [N*k, D], grouped by expert
        num_experts = experts.gate_up_proj.shape[0]
        gate_up = self._expert_mm(rows, experts.gate_up_proj, expert_of_row, num_experts)   # [N*k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        out = self._expert_mm(hidden, experts.down_proj, expert_of_row, num_experts)        # [N*k, D]
        routed = torch.empty_like(out).index_copy_(0, perm, out).view(n, k, -1)
        routed = routed * weights[..., None]
        acc = routed[:, 0]
        for j in range(1, k):                    # eager's per-expert index_add_ order, model dtype
            acc = acc + routed[:, j]
        return acc

    def _expert_mm(self, rows: torch.Tensor, w: torch.Tensor, expert_of_row: torch.Tensor,
                   num_experts: int) -> torch.Tensor:
        """rows [R, in] sorted by expert, w [E, out, in] -> rows @ w[expert].T, [R, out]."""
        if self.grouped:
            counts = torch.zeros(num_experts, dtype=torch.int32, device=rows.device)
            counts.scatter_add_(0, expert_of_row, torch.ones_like(expert_of_row, dtype=torch.int32))
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            return F.grouped_mm(rows, w.transpose(1, 2), offs=offs)
        return torch.bmm(rows[:, None, :], w[expert_of_row].transpose(1, 2))[:, 0]   # reads weights per row
