"""The two-stage budget controller (DESIGN.md section 3).

Parts:
- `sinusoidal_code`: normalised budget -> fixed 256-d sinusoidal code.
- `BudgetEncoder` (trainable): code -> Linear(code, D) -> LayerNorm -> GELU -> Linear(D, D) -> LayerNorm.
- `BudgetTokenMap` (FIXED, never trained, saved with the checkpoint): code -> random projection, each
  vector rescaled to the RMS of the frozen model's word embeddings. Its output is appended as the last
  LLM input position. It is fixed because the learner holds no LLM (no gradient could reach it) and a
  fixed token keeps recorded latency-token states valid across policy versions.
- `Stage1` (before vision): prompt language feature + budget embedding + vision-token count per tier
  -> categorical heads for tier and insertion position p. Tiers that change nothing are masked.
- `Stage2` (after the first p blocks): latency-token state + budget embedding + p + vision-token count +
  spent fraction of the budget -> categorical heads for top_k and num_blocks (masked by feasibility).

Learning path: the learner recomputes log-probs from RECORDED features (`TwoStageController.log_prob`).
Both stages recompute the budget embedding from the recorded budget in ms, so the budget encoder trains
through all four heads; the language feature, latency-token state, p, token count, spent fraction and
masks are recorded features. The log-prob of a rollout is the sum of its four categorical log-probs,
exactly as sampled (masks included): a head with a single feasible option contributes log 1 = 0 and
therefore no gradient, so a choice that cannot change execution receives no advantage.

Acting path: `act_stage1`/`act_stage2` (one request, on the rollout worker) run float32 numpy mirrors of
the torch forward (`_NumpyAct`): torch's per-op dispatch made them ~0.2 ms and ~0.8 ms of host work per
request on a GPU machine. Their log-probs equal the torch forward's within 1e-5 (tested); the learner
recomputes with the torch forward. `act_impl = "torch"` keeps the torch act path (reference, benchmarks).

Everything runs in float32. Pure module: torch and numpy only, no Ray, no model.
"""
from __future__ import annotations

import functools
import math
import operator
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.knobs import KnobChoice, KnobSpace

HEADS = ("tier", "p", "top_k", "num_blocks")


def check_budget_ms(budget_ms: float) -> float:
    """Validate a latency budget in milliseconds (finite and > 0); returns it as float."""
    try:
        value = float(budget_ms)
    except (TypeError, ValueError):
        raise ValueError(f"budget_ms must be a number, got {budget_ms!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget_ms must be a finite positive number of milliseconds, got {budget_ms!r}")
    return value


def sinusoidal_code(budget_norm: torch.Tensor, dim: int = 256, max_freq: float = 32.0) -> torch.Tensor:
    """Fixed sinusoidal code of a normalised budget.

    Angular frequencies are geometric from pi to pi * max_freq, so the lowest pair is monotone over
    [0, 1] and the highest resolves differences of about 1/max_freq (the seed's base-10000 code on
    [0, 1] was nearly linear and low-resolution).

    Args:
        budget_norm: [B] budgets normalised to [0, 1].
        dim: code width (even).
    Returns:
        [B, dim] float32: [sin(w_j b), cos(w_j b)] for j < dim/2.
    """
    if dim % 2:
        raise ValueError(f"code dim must be even, got {dim}")
    angles = budget_norm.to(torch.float32)[:, None] * _code_freqs(dim // 2, float(max_freq))[None, :]
    if angles.shape[0] == 1 and angles.shape[1] > _SERIAL_CHUNK:
        # One request (the act path): evaluate in chunks small enough that torch's CPU kernels stay on
        # the calling thread. A larger sin/cos wakes the intra-op thread pool, whose spinning threads
        # then compete with the rollout for the cores (4x slower rollouts on a loaded 2-core machine).
        # Same values: elementwise kernels, same vector widths.
        chunks = angles.split(_SERIAL_CHUNK, dim=-1)
        return torch.cat([torch.sin(c) for c in chunks] + [torch.cos(c) for c in chunks], dim=-1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


_SERIAL_CHUNK = 32


@functools.lru_cache(maxsize=16)
def _code_freqs(half: int, max_freq: float) -> torch.Tensor:
    """The code's angular frequencies [half] (cached: the act path calls the code per request)."""
    with torch.inference_mode(False), torch.no_grad():
        return math.pi * torch.exp(torch.linspace(0.0, math.log(max_freq), half, dtype=torch.float32))


class BudgetEncoder(nn.Module):
    """Trainable budget embedding: code [B, code_dim] -> [B, out_dim].

    All GELUs of the controller use the tanh approximation: the exact (erf) GELU of torch's CPU build
    takes a multi-threaded path even for a handful of elements, which costs milliseconds per call when
    the cores are busy (measured: median 13 us, mean 4 ms at 24 elements with 2 threads on a loaded
    2-core machine), while the tanh form stays at about 1.5 us.
    """

    def __init__(self, code_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(code_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(out_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code)


class BudgetTokenMap(nn.Module):
    """Fixed (never trained) map from the budget code to an LLM input embedding.

    Buffers (saved in the state dict, so the checkpoint carries the exact map):
        proj: [code_dim, d_model] random projection drawn from `seed`.
        target_rms: [] RMS of the frozen model's word embeddings; every token is rescaled to it.
    """

    def __init__(self, code_dim: int, d_model: int, target_rms: float = 1.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(code_dim, d_model, generator=gen) / math.sqrt(code_dim))
        self.register_buffer("target_rms", torch.tensor(float(target_rms)))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """code [B, code_dim] -> budget tokens [B, d_model] with RMS == target_rms."""
        tok = code @ self.proj
        rms = tok.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        return tok / rms * self.target_rms


def _masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked-out options get -inf; every row must keep at least one option."""
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("a controller head has no feasible option for some row")
    return logits.masked_fill(~mask, float("-inf"))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy [B] of categorical log-probs [B, C] that may hold -inf."""
    p = logp.exp()
    return -(p * torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))).sum(-1)


SCALAR_CODE_DIM = 16
"""Width of the fixed sinusoidal code each scalar Stage2 input (token count, spent fraction) gets."""
SCALAR_CODE_MAX_FREQ = 8.0
WIDE_GROUP_SQ_NORM = 16.0
"""Squared norm each wide input group (a layer-normalised d-vector) is scaled to before the first layer."""


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Layer-normalise a wide feature [B, d] and scale it to squared norm WIDE_GROUP_SQ_NORM.

    Without the rescaling a d-wide group has squared norm d (2048 for the real model) and swamps the
    few scalar inputs (p, token count, spent fraction) at the first layer, so the heads learn to ignore
    them; with it every group enters at a comparable scale whatever d_model is.
    """
    return F.layer_norm(x, x.shape[-1:]) * math.sqrt(WIDE_GROUP_SQ_NORM / x.shape[-1])


def _scalar_code(x: torch.Tensor) -> torch.Tensor:
    """[B, 1] scalar (about 0..1) -> [B, 1 + SCALAR_CODE_DIM]: the value and its sinusoidal code."""
    return torch.cat([x, sinusoidal_code(x[:, 0], SCALAR_CODE_DIM, SCALAR_CODE_MAX_FREQ)], dim=-1)


class Stage1(nn.Module):
    """Before vision: tier and insertion-position heads.

    Inputs (batched):
        lang_feat: [B, d_model] mean word embedding of the question (layer-normalised here, no params).
        budget_emb: [B, budget_dim] (layer-normalised by the encoder).
        tier_tokens: [B, num_tiers] vision-token count each tier would give, divided by token_scale.
    Both wide inputs are rescaled to squared norm WIDE_GROUP_SQ_NORM (see `_wide`).
    """

    def __init__(self, d_model: int, budget_dim: int, num_tiers: int, num_positions: int, hidden: int):
        super().__init__()
        self.inp = nn.Linear(d_model + budget_dim + num_tiers, hidden)
        self.mlp = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden), nn.GELU(approximate="tanh"))
        self.tier_head = nn.Linear(hidden, num_tiers)
        self.p_head = nn.Linear(hidden, num_positions)

    def forward(self, lang_feat, budget_emb, tier_tokens):
        x = torch.cat([_wide(lang_feat), _wide(budget_emb), tier_tokens], dim=-1)
        h = self.mlp(self.inp(x))
        return self.tier_head(h), self.p_head(h)


class Stage2(nn.Module):
    """After the first p blocks: top_k and num_blocks heads.

    Inputs (batched):
        latency_state: [B, d_model] hidden state at the budget token (layer-normalised here, no params).
        budget_emb: [B, budget_dim].
        p_onehot: [B, num_positions].
        vision_tokens: [B, 1] actual vision-token count divided by token_scale.
        spent_frac: [B, 1] elapsed time / budget at the decision point.
    The wide inputs are rescaled (see `_wide`); each scalar enters with its fixed sinusoidal code
    (`_scalar_code`), so that thresholds on the remaining budget are easy to represent.
    """

    def __init__(self, d_model: int, budget_dim: int, num_positions: int, num_top_k: int,
                 num_blocks_options: int, hidden: int):
        super().__init__()
        self.inp = nn.Linear(d_model + budget_dim + num_positions + 2 * (1 + SCALAR_CODE_DIM), hidden)
        self.mlp = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden), nn.GELU(approximate="tanh"))
        self.top_k_head = nn.Linear(hidden, num_top_k)
        self.nb_head = nn.Linear(hidden, num_blocks_options)

    def forward(self, latency_state, budget_emb, p_onehot, vision_tokens, spent_frac):
        x = torch.cat([_wide(latency_state), _wide(budget_emb), p_onehot, _scalar_code(vision_tokens),
                       _scalar_code(spent_frac)], dim=-1)
        h = self.mlp(self.inp(x))
        return self.top_k_head(h), self.nb_head(h)


# ----------------------------------------------------------------------------------------------
# Per-request features and decisions (what the worker records)
# ----------------------------------------------------------------------------------------------
@dataclass
class Stage1Features:
    lang_feat: np.ndarray            # [d_model] float32
    budget_ms: float
    tier_tokens: list[int]           # vision tokens each tier would give
    tier_mask: list[bool]            # False = tier changes nothing (collapsed)
    p_mask: list[bool]


@dataclass
class Stage2Features:
    latency_state: np.ndarray        # [d_model] float32
    p_idx: int
    vision_tokens: int
    spent_frac: float
    nb_mask: list[bool]


@dataclass
class HeadDecision:
    index: int
    log_prob: float


# ----------------------------------------------------------------------------------------------
# The numpy act path (one request at a time, on the rollout worker)
# ----------------------------------------------------------------------------------------------
_F32 = np.float32
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_GELU_C = _F32(math.sqrt(2.0 / math.pi))
_GELU_CA = _F32(math.sqrt(2.0 / math.pi) * 0.044715)
_ONE = _F32(1.0)
_LN_EPS = 1e-5
_BUDGET_CACHE = 64
"""Budgets whose derived act-path vectors (first-layer terms, budget tokens) are kept, least recent out."""
_VECDOT = getattr(np, "vecdot", None)      # numpy >= 2.0


def _matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w [m, n] @ x [n] on the calling thread: one dot product per row (`np.vecdot`). BLAS gemv hands
    anything above ~9K elements to its thread pool, whose spinning threads then compete with the rollout
    for the cores (and on a many-core host cost more than they save at this size). numpy < 2 has no
    vecdot: gemv there."""
    if _VECDOT is None:
        return np.dot(w, x, out=out)
    return _VECDOT(w, x, out=out)


def _np_view(t: torch.Tensor) -> np.ndarray:
    """float32 numpy array of a tensor: a view of a contiguous CPU float32 tensor, else a copy."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to("cpu", torch.float32).contiguous()
    return t.numpy()


def _np_copy(a: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """A C-contiguous float32 copy of `a` (times `scale`)."""
    out = np.array(a, dtype=np.float32, order="C", copy=True)
    if scale != 1.0:
        out *= _F32(scale)
    return out


def _np_layer_norm(x: np.ndarray, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """LayerNorm of a vector (biased variance, eps 1e-5, as torch), optionally affine."""
    centred = x - x.mean(dtype=np.float32)
    y = centred * _F32(1.0 / math.sqrt(float(np.dot(centred, centred)) / x.shape[-1] + _LN_EPS))
    if weight is not None:
        y *= weight
        y += bias
    return y


def _np_gelu2_(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """x <- 2 * GELU_tanh(x) in place, tmp a work buffer of x's shape. The factor 0.5 of the GELU is
    folded into the weights of the next layer (exact: a power of two)."""
    np.multiply(x, x, out=tmp)
    tmp *= _GELU_CA
    tmp += _GELU_C
    tmp *= x
    np.tanh(tmp, out=tmp)
    tmp += _ONE
    x *= tmp
    return x


def _log_softmax_list(logits: list[float], mask: Sequence[bool] | None = None) -> list[float]:
    """Log-softmax of a handful of logits in plain Python (faster than array ops at this size); masked
    options get -inf and at least one option must stay."""
    if mask is None:
        top = max(logits)
        lse = top + math.log(math.fsum([math.exp(v - top) for v in logits]))
        return [v - lse for v in logits]
    if len(mask) != len(logits):
        raise ValueError(f"a mask of {len(mask)} options for a head of {len(logits)}")
    kept = [v for v, keep in zip(logits, mask) if keep]
    if not kept:
        raise ValueError("a controller head has no feasible option for some row")
    top = max(kept)
    lse = top + math.log(math.fsum([math.exp(v - top) for v in kept]))
    return [v - lse if keep else -math.inf for v, keep in zip(logits, mask)]


def _lru_get(cache: OrderedDict, key):
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
    return hit


def _lru_put(cache: OrderedDict, key, value) -> None:
    if len(cache) >= _BUDGET_CACHE:
        cache.popitem(last=False)
    cache[key] = value


def _argmax(lps: list[float]) -> HeadDecision:
    """The most likely option (the first on ties)."""
    idx = max(range(len(lps)), key=lps.__getitem__)
    return HeadDecision(idx, float(lps[idx]))


def _draw(lps: list[float], u: float) -> HeadDecision:
    """Inverse-CDF draw from log-probs with a uniform u in [0, 1); options of probability 0 never come."""
    probs = [math.exp(v) for v in lps]
    u *= sum(probs)
    acc = 0.0
    for i, q in enumerate(probs):
        acc += q
        if u < acc:
            return HeadDecision(i, float(lps[i]))
    idx = max(i for i, q in enumerate(probs) if q > 0.0)       # round-off at the top
    return HeadDecision(idx, float(lps[idx]))


class UniformStream:
    """Uniform draws in [0, 1) from a `torch.Generator`, fetched `block` at a time.

    The act path draws two uniforms per stage and request. One `torch.rand` call costs ~2 us in a loop but
    ~40-160 us inside a request (torch's dispatcher is a lot of code, and after milliseconds of other work
    it is out of the caches: docs/PERFORMANCE.md), and Stage1's draw sits where the GPU waits for the host.
    A stream makes one torch call per `block` draws. Pass it wherever the act path takes a `generator`.
    Deterministic given the generator's seed, but not the same numbers as drawing pairs from the generator
    directly; it owns the generator (other draws from it, or re-seeding it, would not be seen by the values
    already fetched)."""

    def __init__(self, generator: torch.Generator | None = None, block: int = 256):
        if block < 2:
            raise ValueError(f"block must be at least 2, got {block}")
        self.generator = generator
        self.block = int(block)
        self._buf: list[float] = []

    def pair(self) -> tuple[float, float]:
        buf = self._buf
        if len(buf) < 2:
            buf.extend(torch.rand(self.block, generator=self.generator).tolist())
        return buf.pop(), buf.pop()


def uniform_pair(generator: "torch.Generator | UniformStream | None") -> tuple[float, float]:
    """Two uniforms from a generator (one torch call) or a `UniformStream`."""
    if isinstance(generator, UniformStream):
        return generator.pair()
    u = torch.rand(2, generator=generator).tolist()
    return u[0], u[1]


class _NumpyAct:
    """The act path of one `TwoStageController` in float32 numpy: the same maths as the torch forward
    without torch's per-op dispatch (10-50 us per op on a busy host).

    State, in three parts, each rebuilt when one of its weights changes (an optimizer step, `set_weights`,
    `load_state_dict` or `.to()` moves a tensor's version counter or storage; a stage's call checks the
    budget encoder's and its own weights):
      - each stage's first layer as one contiguous matrix over the per-request inputs (the wide feature
        and the small inputs); its budget-embedding columns apart: their product with the embedding, plus
        the bias (and Stage2's p one-hot column), depends only on the budget and is kept per budget (LRU
        of `_BUDGET_CACHE`, like the embedding itself), so a request computes one matrix-vector product
        per layer;
      - the later layers with their bias as an extra column (the hidden buffers end in a constant 1),
        GELU's 0.5 folded into them (exact: a power of two), both heads of a stage stacked;
      - work buffers, so that a request allocates almost nothing.
    The budget encoder's weights are views of the parameters (no copy). The budget tokens are kept per
    budget, keyed by the token map's buffers.
    """

    def __init__(self, ctl: TwoStageController):
        enc = tuple(ctl.budget_encoder.parameters())
        self.n_enc = len(enc)
        self.params = {1: enc + tuple(ctl.stage1.parameters()), 2: enc + tuple(ctl.stage2.parameters())}
        self.keys: dict = {1: None, 2: None}
        self.stage_keys: dict = {1: None, 2: None}
        self.enc_key = None
        self.wide_embs: OrderedDict = OrderedDict()             # budget -> wide budget embedding
        self.terms: dict = {1: OrderedDict(), 2: OrderedDict()}  # budget -> a stage's first-layer term
        self.s1_memo = None
        self.tokens: OrderedDict = OrderedDict()
        self.token_key = None
        self.freqs = _code_freqs(ctl.code_dim // 2, 32.0).numpy().copy()
        self.sc_freqs = _code_freqs(SCALAR_CODE_DIM // 2, SCALAR_CODE_MAX_FREQ).numpy().reshape(1, -1).copy()
        self.norm = (_F32(ctl.norm_min_ms), _F32(ctl.norm_max_ms - ctl.norm_min_ms))
        self.token_scale = _F32(ctl.token_scale)
        self.d = d = ctl.d_model
        self.inv_d = 1.0 / d
        self.ones_d = np.ones(d, np.float32)
        self.wide_d = math.sqrt(WIDE_GROUP_SQ_NORM / d)
        self.num_tiers = ctl.stage1.tier_head.out_features
        self.num_top_k = ctl.stage2.top_k_head.out_features
        self.num_positions = len(ctl.space.positions)
        self.x1 = np.empty(d + self.num_tiers, np.float32)      # [wide lang | tier tokens / scale]
        self.x2 = np.empty(d + 2 * (1 + SCALAR_CODE_DIM), np.float32)   # [wide state | 2 x (value, sin, cos)]
        self.x2_codes = self.x2[d:].reshape(2, 1 + SCALAR_CODE_DIM)
        self.x2_sin = self.x2_codes[:, 1:1 + SCALAR_CODE_DIM // 2]
        self.x2_cos = self.x2_codes[:, 1 + SCALAR_CODE_DIM // 2:]
        self.pair = np.empty((2, 1), np.float32)
        self.angles = np.empty((2, SCALAR_CODE_DIM // 2), np.float32)

    # ------------------------------------------------------------------------------------------
    def sync(self, ctl: TwoStageController, stage: int) -> _NumpyAct:
        """Rebuild what changed among the budget encoder's and `stage`'s (1 or 2) weights."""
        params = self.params[stage]
        key = (tuple(map(_VERSION, params)), tuple(map(_DATA_PTR, params)))
        if key == self.keys[stage]:
            return self
        n = self.n_enc
        enc_key = (key[0][:n], key[1][:n])
        if enc_key != self.enc_key:
            self._load_encoder(ctl)
            self.enc_key = enc_key
            self.wide_embs.clear()
            self.terms[1].clear()
            self.terms[2].clear()
            self.s1_memo = None
        stage_key = (key[0][n:], key[1][n:])
        if stage_key != self.stage_keys[stage]:
            self._load_stage1(ctl) if stage == 1 else self._load_stage2(ctl)
            self.stage_keys[stage] = stage_key
            self.terms[stage].clear()
            self.s1_memo = None
        self.keys[stage] = key
        return self

    def _load_encoder(self, ctl: TwoStageController) -> None:
        net = ctl.budget_encoder.net
        self.enc = tuple(_np_view(t) for t in (net[0].weight, net[0].bias, net[1].weight, net[1].bias,
                                                 net[3].weight, net[3].bias, net[4].weight, net[4].bias))
        self.bd = self.enc[0].shape[0]
        self.wide_emb = math.sqrt(WIDE_GROUP_SQ_NORM / self.bd)

    @staticmethod
    def _later(*linears: nn.Linear) -> np.ndarray:
        """[W * 0.5 | b] of linears applied to a GELU output (heads stacked)."""
        w = np.concatenate([_np_view(m.weight) * _F32(0.5) for m in linears])
        b = np.concatenate([_np_view(m.bias) for m in linears])
        return _np_copy(np.concatenate([w, b[:, None]], axis=1))

    @staticmethod
    def _buffers(h: int) -> tuple[np.ndarray, ...]:
        """(layer 1 output [h+1], its first h, layer 2 output [h+1], its first h, a GELU temporary [h]);
        the last element of each output stays 1 (the next layer's bias column)."""
        a, b = np.ones(h + 1, np.float32), np.ones(h + 1, np.float32)
        return a, a[:h], b, b[:h], np.empty(h, np.float32)

    def _load_stage1(self, ctl: TwoStageController) -> None:
        s1, d, bd = ctl.stage1, self.d, self.bd
        w = _np_view(s1.inp.weight)                              # [h1, d | bd | T]
        self.s1_in = _np_copy(np.concatenate([w[:, :d], w[:, d + bd:]], axis=1))
        self.s1_emb, self.s1_bias = _np_copy(w[:, d:d + bd]), _np_copy(_np_view(s1.inp.bias))
        self.s1_later = (self._later(s1.mlp[1]), self._later(s1.tier_head, s1.p_head))
        self.bufs1 = self._buffers(self.s1_in.shape[0])

    def _load_stage2(self, ctl: TwoStageController) -> None:
        s2, d, bd, P = ctl.stage2, self.d, self.bd, self.num_positions
        w = _np_view(s2.inp.weight)                              # [h2, d | bd | P | 2 x (1 + code)]
        self.s2_in = _np_copy(np.concatenate([w[:, :d], w[:, d + bd + P:]], axis=1))
        self.s2_emb, self.s2_bias = _np_copy(w[:, d:d + bd]), _np_copy(_np_view(s2.inp.bias))
        self.s2_p = _np_copy(w[:, d + bd:d + bd + P].T)           # [P, h2]: the p one-hot's columns
        self.s2_later = (self._later(s2.mlp[1]), self._later(s2.top_k_head, s2.nb_head))
        self.bufs2 = self._buffers(self.s2_in.shape[0])

    # ------------------------------------------------------------------------------------------
    def code(self, budget_ms: float) -> np.ndarray:
        """The budget's sinusoidal code [code_dim] (as `TwoStageController.budget_code`)."""
        lo, span = self.norm
        b = min(max((_F32(budget_ms) - lo) / span, _F32(0.0)), _F32(1.0))
        angles = b * self.freqs
        return np.concatenate([np.sin(angles), np.cos(angles)])

    def embedding(self, budget_ms: float) -> np.ndarray:
        """The trainable budget embedding [budget_dim] (as `TwoStageController.budget_embedding`)."""
        w0, b0, g1, be1, w3, b3, g4, be4 = self.enc
        h = _np_layer_norm(_matvec(w0, self.code(budget_ms)) + b0, g1, be1)
        _np_gelu2_(h, np.empty_like(h))
        h *= _F32(0.5)
        return _np_layer_norm(_matvec(w3, h) + b3, g4, be4)

    def wide_embedding(self, budget_ms: float) -> np.ndarray:
        """`_wide` of the budget embedding [budget_dim], kept per budget."""
        hit = _lru_get(self.wide_embs, budget_ms)
        if hit is None:
            hit = _np_layer_norm(self.embedding(budget_ms))
            hit *= _F32(self.wide_emb)
            _lru_put(self.wide_embs, budget_ms, hit)
        return hit

    def budget_term(self, stage: int, budget_ms: float) -> np.ndarray:
        """A stage's first-layer term of a budget, kept per budget: the bias plus the budget-embedding
        columns times the wide embedding; Stage1 [h1], Stage2 per p [P, h2] (plus the p one-hot column)."""
        cache = self.terms[stage]
        hit = _lru_get(cache, budget_ms)
        if hit is None:
            wide = self.wide_embedding(budget_ms)
            if stage == 1:
                hit = _matvec(self.s1_emb, wide) + self.s1_bias
            else:
                hit = self.s2_p + (_matvec(self.s2_emb, wide) + self.s2_bias)
            _lru_put(cache, budget_ms, hit)
        return hit

    def _wide_into(self, x, out: np.ndarray, what: str) -> None:
        """out <- `_wide(x)` for one d-vector x."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape != out.shape:
            raise ValueError(f"{what} must have shape {out.shape}, got {x.shape}")
        np.subtract(x, _F32(float(np.dot(x, self.ones_d)) * self.inv_d), out=out)
        var = float(np.dot(out, out)) * self.inv_d
        np.multiply(out, _F32(self.wide_d / math.sqrt(var + _LN_EPS)), out=out)

    @staticmethod
    def _mlp_heads(x: np.ndarray, w_in: np.ndarray, base: np.ndarray, later, bufs) -> list[float]:
        """inp (+ the budget term) -> GELU -> Linear -> GELU -> stacked heads: logits as a list."""
        a, a_h, b, b_h, tmp = bufs
        _matvec(w_in, x, out=a_h)
        np.add(a_h, base, out=a_h)
        _np_gelu2_(a_h, tmp)
        np.dot(later[0], a, out=b_h)
        _np_gelu2_(b_h, tmp)
        return np.dot(later[1], b).tolist()

    # ------------------------------------------------------------------------------------------
    def stage1(self, budget_ms: float, f: Stage1Features) -> tuple[list[float], list[float]]:
        """Masked log-probs (tier, p) as lists. The G rollouts of a group share their features: the last
        call's result is reused when the features are equal (the state is dropped on weight changes)."""
        lang = np.asarray(f.lang_feat, dtype=np.float32)
        key = (budget_ms, tuple(f.tier_tokens), tuple(f.tier_mask), tuple(f.p_mask), lang.tobytes())
        memo = self.s1_memo
        if memo is not None and memo[0] == key:
            return memo[1]
        base = self.budget_term(1, budget_ms)
        d, x = self.d, self.x1
        self._wide_into(lang, x[:d], "lang_feat")
        tokens = np.asarray(f.tier_tokens, dtype=np.float32)
        if tokens.shape != (self.num_tiers,):
            raise ValueError(f"tier_tokens must list {self.num_tiers} counts, got {list(f.tier_tokens)}")
        np.divide(tokens, self.token_scale, out=x[d:])
        logits = self._mlp_heads(x, self.s1_in, base, self.s1_later, self.bufs1)
        T = self.num_tiers
        out = (_log_softmax_list(logits[:T], f.tier_mask), _log_softmax_list(logits[T:], f.p_mask))
        self.s1_memo = (key, out)
        return out

    def stage2(self, budget_ms: float, f: Stage2Features) -> tuple[list[float], list[float]]:
        """Log-probs (top_k, masked num_blocks) as lists."""
        p_idx = int(f.p_idx)
        if not 0 <= p_idx < self.num_positions:
            raise ValueError(f"p_idx {p_idx} is out of range for {self.num_positions} positions")
        base = self.budget_term(2, budget_ms)
        x = self.x2
        self._wide_into(f.latency_state, x[:self.d], "latency_state")
        pair = self.pair                                         # the two scalars and their codes
        pair[0, 0] = _F32(f.vision_tokens) / self.token_scale
        pair[1, 0] = f.spent_frac
        np.multiply(pair, self.sc_freqs, out=self.angles)
        self.x2_codes[:, :1] = pair
        np.sin(self.angles, out=self.x2_sin)
        np.cos(self.angles, out=self.x2_cos)
        logits = self._mlp_heads(x, self.s2_in, base[p_idx], self.s2_later, self.bufs2)
        K = self.num_top_k
        return _log_softmax_list(logits[:K]), _log_softmax_list(logits[K:], f.nb_mask)

    def budget_token(self, ctl: TwoStageController, budget_ms: float) -> torch.Tensor:
        """The fixed budget token [d_model] (a fresh tensor), kept per budget."""
        bt = ctl.budget_token
        proj, rms = bt.proj, bt.target_rms
        key = (proj.data_ptr(), proj._version, rms.data_ptr(), rms._version)
        if key != self.token_key:
            self.tokens.clear()
            self.proj_t = _np_copy(_np_view(proj).T)          # [d_model, code]: rows for _matvec
            self.target_rms = float(rms)
            self.token_key = key
        tok = _lru_get(self.tokens, budget_ms)
        if tok is None:
            t = _matvec(self.proj_t, self.code(budget_ms))
            t *= _F32(self.target_rms / max(math.sqrt(float(np.dot(t, t)) / t.shape[0]), 1e-12))
            tok = torch.from_numpy(t)
            _lru_put(self.tokens, budget_ms, tok)
        return tok.clone()


class TwoStageController(nn.Module):
    """Budget encoder + fixed budget-token map + Stage1 + Stage2, all float32.

    Args:
        space: the knob space (option sets and masks).
        d_model: LLM width (language feature and latency-token width).
        code_dim: sinusoidal code width.
        budget_dim: budget-embedding width (DESIGN.md fixes d_model).
        stage1_hidden, stage2_hidden: hidden widths of the stages.
        norm_min_ms, norm_max_ms: budgets mapped to 0 and 1 (clamped outside).
        token_scale: vision-token counts are divided by this.
        token_rms: RMS of the frozen model's word embeddings (the budget token's scale).
        token_seed: seed of the fixed budget-token map.

    `act_impl` picks the act path: "numpy" (default; `_NumpyAct`) or "torch" (the torch forward, the
    reference; benchmarks and the equality tests use it). The act path serves one request at a time
    (work buffers are shared): do not call it from several threads on one controller.
    """

    act_impl = "numpy"

    def __init__(self, space: KnobSpace, d_model: int, *, code_dim: int = 256, budget_dim: int = 0,
                 stage1_hidden: int = 32, stage2_hidden: int = 24, norm_min_ms: float = 100.0,
                 norm_max_ms: float = 500.0, token_scale: float = 1200.0, token_rms: float = 1.0,
                 token_seed: int = 0):
        super().__init__()
        budget_dim = budget_dim or d_model
        self.space = space
        self.d_model = d_model
        self.code_dim = code_dim
        self.norm_min_ms = float(norm_min_ms)
        self.norm_max_ms = float(norm_max_ms)
        self.token_scale = float(token_scale)
        self.budget_encoder = BudgetEncoder(code_dim, budget_dim)
        self.budget_token = BudgetTokenMap(code_dim, d_model, token_rms, token_seed)
        self.stage1 = Stage1(d_model, budget_dim, space.num_tiers, len(space.positions), stage1_hidden)
        self.stage2 = Stage2(d_model, budget_dim, len(space.positions), len(space.top_ks),
                             len(space.num_blocks), stage2_hidden)
        # Feasibility of each num_blocks option for each p: [P, N] (a buffer: moves with .to()).
        self.register_buffer("nb_feasible", torch.tensor([space.num_blocks_feasible(p) for p in space.positions]),
                             persistent=False)
        self._np_act: _NumpyAct | None = None        # built on the first numpy act call

    @classmethod
    def from_config(cls, cfg, space: KnobSpace, token_rms: float = 1.0) -> TwoStageController:
        c = cfg.controller
        return cls(space, cfg.model.d_model, code_dim=c.code_dim, budget_dim=c.budget_embed_dim,
                   stage1_hidden=c.stage1_hidden, stage2_hidden=c.stage2_hidden,
                   norm_min_ms=cfg.budget.norm_min_ms, norm_max_ms=cfg.budget.norm_max_ms,
                   token_scale=c.token_scale, token_rms=token_rms, token_seed=cfg.system.seed)

    # ------------------------------------------------------------------------------------------
    def num_policy_params(self) -> int:
        """Trainable parameters of Stage1 + Stage2 (the budget encoder is counted separately)."""
        return sum(p.numel() for m in (self.stage1, self.stage2) for p in m.parameters())

    def num_budget_encoder_params(self) -> int:
        return sum(p.numel() for p in self.budget_encoder.parameters())

    def normalise_budget(self, budget_ms: torch.Tensor) -> torch.Tensor:
        """[B] ms -> [B] in [0, 1] (clamped)."""
        span = self.norm_max_ms - self.norm_min_ms
        return ((budget_ms.to(torch.float32) - self.norm_min_ms) / span).clamp(0.0, 1.0)

    def budget_code(self, budget_ms: torch.Tensor) -> torch.Tensor:
        return sinusoidal_code(self.normalise_budget(budget_ms), self.code_dim)

    def budget_embedding(self, budget_ms: torch.Tensor) -> torch.Tensor:
        """[B] ms -> [B, budget_dim] trainable embedding."""
        return self.budget_encoder(self.budget_code(budget_ms))

    def budget_token_embedding(self, budget_ms: float) -> torch.Tensor:
        """The fixed budget token appended to the LLM input: [d_model] float32, a fresh tensor.

        With the numpy act path the tokens of the last budgets are kept (a group's rollouts share their
        budget); the map's buffers never train, but `load_state_dict`/`.to()` replace them and so
        invalidate the entries."""
        budget_ms = check_budget_ms(budget_ms)
        if self.act_impl == "torch":
            return self._budget_token_torch(budget_ms)
        return self._numpy_act().budget_token(self, budget_ms)

    def budget_token_key(self, budget_ms: float) -> tuple:
        """Equal for two calls exactly when `budget_token_embedding` gives the same token: the budget, the
        normalisation range and the map's buffers (their storage and version). A caller may keep the token
        under it (a rollout worker keeps the last one on the GPU: a group's rollouts share their budget)."""
        bt = self.budget_token
        return (check_budget_ms(budget_ms), float(self.norm_min_ms), float(self.norm_max_ms),
                bt.proj.data_ptr(), bt.proj._version, bt.target_rms.data_ptr(), bt.target_rms._version)

    @torch.no_grad()
    def _budget_token_torch(self, budget_ms: float) -> torch.Tensor:
        return self.budget_token(self.budget_code(torch.tensor([budget_ms])))[0]

    # ------------------------------------------------------------------------------------------
    def stage1_log_probs(self, lang_feat, budget_emb, tier_tokens, tier_mask, p_mask):
        """Masked log-softmax of the Stage1 heads: ([B, T], [B, P])."""
        tier_logits, p_logits = self.stage1(lang_feat, budget_emb, tier_tokens.to(torch.float32) / self.token_scale)
        return (F.log_softmax(_masked_logits(tier_logits, tier_mask), -1),
                F.log_softmax(_masked_logits(p_logits, p_mask), -1))

    def stage2_log_probs(self, latency_state, budget_emb, p_idx, vision_tokens, spent_frac, nb_mask):
        """Masked log-softmax of the Stage2 heads: ([B, K], [B, N])."""
        p_onehot = F.one_hot(p_idx.long(), len(self.space.positions)).to(torch.float32)
        top_k_logits, nb_logits = self.stage2(latency_state, budget_emb, p_onehot,
                                              vision_tokens.to(torch.float32)[:, None] / self.token_scale,
                                              spent_frac.to(torch.float32)[:, None])
        return (F.log_softmax(top_k_logits, -1), F.log_softmax(_masked_logits(nb_logits, nb_mask), -1))

    @staticmethod
    def _pick(logp, greedy: bool, generator: torch.Generator | UniformStream | None) -> HeadDecision:
        """Sample (or argmax, first index on ties) one option from log-probs [C] (a tensor or a list).

        Sampling is by inverse CDF on one uniform draw from `generator`, in plain Python: for a
        handful of options this is ~5x faster than torch.multinomial. Options with probability 0
        (masked, log-prob -inf) are never returned.
        """
        lps = logp if isinstance(logp, list) else logp.tolist()
        if greedy:
            return _argmax(lps)
        u = generator.pair()[0] if isinstance(generator, UniformStream) else float(torch.rand((), generator=generator))
        return _draw(lps, u)

    @staticmethod
    def _pick_pair(a: list[float], b: list[float], greedy: bool,
                   generator: torch.Generator | UniformStream | None) -> tuple[HeadDecision, HeadDecision]:
        """`_pick` for the two heads of a stage with one draw of two uniforms (from a generator: the same
        stream as two single draws, one torch call less; or from a `UniformStream`)."""
        if greedy:
            return _argmax(a), _argmax(b)
        u0, u1 = uniform_pair(generator)
        return _draw(a, u0), _draw(b, u1)

    def _act_budget_embedding(self, budget_ms: float) -> torch.Tensor:
        """[1, budget_dim] budget embedding for the act path, cached for the last budget.

        A group's G rollouts share their budget, and each rollout needs the embedding twice (Stage1
        and Stage2), so this saves most of the encoder calls. The cache key holds the budget and the
        version counter and storage of every budget-encoder tensor: an optimizer step, `set_weights`,
        `load_state_dict` or `.to()` changes one of them and so invalidates the entry. Call only under
        no_grad/inference mode (the entry carries no graph).
        """
        budget_ms = check_budget_ms(budget_ms)
        params = getattr(self, "_enc_params", None)
        if params is None:
            params = self._enc_params = tuple(self.budget_encoder.parameters())
        key = (budget_ms, tuple((t.data_ptr(), t._version) for t in params))
        cached = getattr(self, "_emb_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        emb = self.budget_embedding(torch.tensor([budget_ms]))
        self._emb_cache = (key, emb)
        return emb

    def _numpy_act(self) -> _NumpyAct:
        act = self._np_act
        if act is None:
            act = self._np_act = _NumpyAct(self)
        return act

    def act_arrays(self, stage: int) -> _NumpyAct:
        """The numpy act path's prepared matrices, synced with the current weights: stage 1 or 2's first
        layer over the per-request inputs (`s2_in`), its per-budget term (`budget_term`), the later layers
        (`s2_later`). The device-side Stage2 (rollout_workers/device_stage2.py) uploads Stage2's."""
        return self._numpy_act().sync(self, stage)

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.float()`... may give the module new parameter objects: the act paths start afresh."""
        self._reset_act_state()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        """As nn.Module's (`assign=True` gives new parameter objects: the act paths start afresh)."""
        self._reset_act_state()
        return super().load_state_dict(*args, **kwargs)

    def _reset_act_state(self) -> None:
        self.__dict__["_np_act"] = None
        for name in ("_enc_params", "_s1_params", "_emb_cache", "_s1_cache"):
            self.__dict__.pop(name, None)

    def act_stage1(self, f: Stage1Features, *, greedy: bool = False,
                   generator: torch.Generator | None = None) -> tuple[HeadDecision, HeadDecision]:
        """Choose tier and p for one request. Returns (tier decision, p decision).

        The G rollouts of a group share their Stage1 features, so the log-probs of the last call are
        reused when the features and the weights are unchanged; only the draws differ.
        """
        budget_ms = check_budget_ms(f.budget_ms)
        if self.act_impl == "torch":
            return self._act_stage1_torch(budget_ms, f, greedy, generator)
        lt, lp = self._numpy_act().sync(self, 1).stage1(budget_ms, f)
        return self._pick_pair(lt, lp, greedy, generator)

    @torch.inference_mode()
    def _act_stage1_torch(self, budget_ms: float, f: Stage1Features, greedy: bool,
                          generator: torch.Generator | None) -> tuple[HeadDecision, HeadDecision]:
        """The torch act path of Stage1 (its cache keys on the version counters of the budget encoder
        and Stage1)."""
        lang = np.asarray(f.lang_feat, dtype=np.float32)
        key = (budget_ms, tuple(f.tier_tokens), tuple(f.tier_mask), tuple(f.p_mask),
               tuple((t.data_ptr(), t._version) for t in self._stage1_params()))
        cached = getattr(self, "_s1_cache", None)
        if cached is not None and cached[0] == key and np.array_equal(cached[1], lang):
            lt, lp = cached[2]
        else:
            emb = self._act_budget_embedding(budget_ms)
            lt, lp = self.stage1_log_probs(torch.from_numpy(lang.copy())[None], emb,
                                           torch.tensor([f.tier_tokens]), torch.tensor([f.tier_mask]),
                                           torch.tensor([f.p_mask]))
            self._s1_cache = (key, lang.copy(), (lt, lp))
        return self._pick_pair(lt[0].tolist(), lp[0].tolist(), greedy, generator)

    def _stage1_params(self) -> tuple[torch.Tensor, ...]:
        params = getattr(self, "_s1_params", None)
        if params is None:
            params = self._s1_params = tuple(self.budget_encoder.parameters()) + tuple(self.stage1.parameters())
        return params

    def nb_mask_for(self, p_idx: int) -> list[bool]:
        return self.space.num_blocks_feasible(self.space.positions[p_idx])

    def act_stage2(self, budget_ms: float, f: Stage2Features, *, greedy: bool = False,
                   generator: torch.Generator | None = None) -> tuple[HeadDecision, HeadDecision]:
        """Choose top_k and num_blocks for one request. Returns (top_k decision, num_blocks decision)."""
        budget_ms = check_budget_ms(budget_ms)
        if self.act_impl == "torch":
            return self._act_stage2_torch(budget_ms, f, greedy, generator)
        lk, ln = self._numpy_act().sync(self, 2).stage2(budget_ms, f)
        return self._pick_pair(lk, ln, greedy, generator)

    @torch.inference_mode()
    def _act_stage2_torch(self, budget_ms: float, f: Stage2Features, greedy: bool,
                          generator: torch.Generator | None) -> tuple[HeadDecision, HeadDecision]:
        emb = self._act_budget_embedding(budget_ms)
        lk, ln = self.stage2_log_probs(torch.as_tensor(f.latency_state, dtype=torch.float32)[None], emb,
                                       torch.tensor([f.p_idx]), torch.tensor([f.vision_tokens]),
                                       torch.tensor([f.spent_frac], dtype=torch.float32),
                                       torch.tensor([f.nb_mask]))
        return self._pick_pair(lk[0].tolist(), ln[0].tolist(), greedy, generator)

    def log_prob(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict]:
        """Recompute log-probs of recorded choices from recorded features (the learner's path).

        Args:
            batch: tensors with leading dim N: lang_feat [N, d], budget_ms [N], tier_tokens [N, T],
                tier_mask [N, T] bool, p_mask [N, P] bool, latency_state [N, d], vision_tokens [N],
                spent_frac [N], nb_mask [N, Nb] bool, and the choices tier_idx, p_idx, top_k_idx,
                nb_idx [N] long.
        Returns:
            (logp [N] summed over the four heads, {head: logp [N]}, {head: entropy [N]}).
        """
        emb = self.budget_embedding(batch["budget_ms"])
        lt, lp = self.stage1_log_probs(batch["lang_feat"], emb, batch["tier_tokens"], batch["tier_mask"],
                                       batch["p_mask"])
        lk, ln = self.stage2_log_probs(batch["latency_state"], emb, batch["p_idx"], batch["vision_tokens"],
                                       batch["spent_frac"], batch["nb_mask"])
        per_head, entropy = {}, {}
        for name, logp, key in (("tier", lt, "tier_idx"), ("p", lp, "p_idx"), ("top_k", lk, "top_k_idx"),
                                ("num_blocks", ln, "nb_idx")):
            per_head[name] = logp.gather(-1, batch[key].long()[:, None])[:, 0]
            entropy[name] = _entropy(logp)
        total = per_head["tier"] + per_head["p"] + per_head["top_k"] + per_head["num_blocks"]
        return total, per_head, entropy

    # ------------------------------------------------------------------------------------------
    def knob_choice(self, tier_idx: int, p_idx: int, top_k_idx: int, nb_idx: int) -> KnobChoice:
        return self.space.choice(tier_idx, p_idx, top_k_idx, nb_idx)

    def get_weights(self) -> dict[str, np.ndarray]:
        """All state (trainable and fixed buffers) as numpy arrays: what Ray ships to workers."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load numpy weights; names and shapes must match exactly."""
        own = self.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise ValueError(f"controller weights do not match: missing {missing}, unexpected {unexpected}")
        bad = [k for k in own if tuple(own[k].shape) != tuple(np.shape(weights[k]))]
        if bad:
            raise ValueError(f"controller weights have wrong shapes for {bad}")
        # one copy, straight from the arrays into the module's tensors (read-only arrays from Ray's object store
        # are only read); the act paths' caches are keyed on the tensors' versions and start afresh anyway
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for k, t in own.items():
                t.copy_(torch.as_tensor(np.asarray(weights[k])))
        self._reset_act_state()


def collate_features(rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Stack recorded feature/choice columns (dicts of lists/arrays) into the tensors `log_prob` wants."""
    def col(name, dtype):
        return torch.as_tensor(np.asarray([r[name] for r in rows]), dtype=dtype)
    return {
        "lang_feat": col("lang_feat", torch.float32), "budget_ms": col("budget_ms", torch.float32),
        "tier_tokens": col("tier_tokens", torch.float32), "tier_mask": col("tier_mask", torch.bool),
        "p_mask": col("p_mask", torch.bool), "latency_state": col("latency_state", torch.float32),
        "vision_tokens": col("vision_tokens", torch.float32), "spent_frac": col("spent_frac", torch.float32),
        "nb_mask": col("nb_mask", torch.bool), "tier_idx": col("tier_idx", torch.long),
        "p_idx": col("p_idx", torch.long), "top_k_idx": col("top_k_idx", torch.long),
        "nb_idx": col("nb_idx", torch.long),
    }
