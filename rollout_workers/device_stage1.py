"""Stage1 decided on the device, with the question's feature it reads (issue 4 point 5).

Stage1 sits where the GPU has nothing to do: the vision encoder needs the tier it chooses. On the host
its window was the question's embedding (a copy to the device, the lookup, a copy back), then ~0.1 ms of
Python for the controller's maths inside a request (docs/PERFORMANCE.md: host code runs 10-30x slower
after milliseconds of other work than in a loop). Here the host writes the question's token ids and the
per-request scalars into one pinned buffer and queues:

    copy the buffer (pinned -> device)           ids, their count, tier token counts and masks, p mask,
                                                 two uniforms, the greedy flag
    graph: the ids' embedding rows, their mean (the language feature); Stage1's MLP, masked
           log-softmax heads, draw or argmax                                         (one CUDA graph)
    copy the decision [4] to pinned memory; record an event
    copy the language feature [d] to pinned memory (for the record; read after the request)

and polls the event for four numbers: the tier and p indices and their log-probs. On CUDA the three
copies are nodes of the graph (a pinned buffer's copy in a graph reads or writes the buffer when the graph
runs), so the host makes two calls in the window: the replay and the event. Host code is slow there (it
follows milliseconds of image decoding or waiting: 10-40x slower per call than in a loop on these
hosts, docs/PERFORMANCE.md), so the number of calls is what counts.

The maths is `shared.controller._NumpyAct.stage1`'s (its prepared matrices: the first layer's columns over
the wide language feature and the tier token counts, the per-budget term, the later layers with GELU's
0.5 folded in) in float32 torch ops, and the draw is the same inverse CDF on the same two uniforms (drawn
on the host from the caller's generator, before Stage2's pair as on the host path). So for the recorded
language feature and the same uniforms the decisions equal the host path's and the log-probs agree
within float32 round-off (tested). The language feature is the mean of the question's word embeddings
in float32 as `RequestEngine.language_feature` computes it (the same rows; the sum's order may differ in
the last bits), and the recorded one is the one the decision read.

Questions longer than `max_question_tokens` ids take the host path (the buffer and the graph are sized
for that many rows).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rollout_workers.device_decision import GraphedDecision, StageWeights, draw_index, gelu2, wide
from shared.controller import TwoStageController
from shared.knobs import KnobSpace

# the per-request float32 vector: a header, then the tier counts and masks, the p mask and the ids
I_N, I_U_TIER, I_U_P, I_GREEDY = range(4)
HEADER = 4
# the decision, four float32 values read back by the host
O_TIER, O_LP_TIER, O_P, O_LP_P = range(4)


def question_mean(emb: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mean of the first n rows of emb [L, d] (any float dtype) in float32: [d]. n is a 0-d float tensor."""
    keep = (torch.arange(emb.shape[0], device=emb.device) < n).to(torch.float32)
    return (emb.float() * keep[:, None]).sum(0) / n


def stage1_decide(emb: torch.Tensor, scal: torch.Tensor, w_in: torch.Tensor, base: torch.Tensor,
                  later1: torch.Tensor, heads: torch.Tensor, wide_scale: float, token_scale: float,
                  num_tiers: int, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage1's decision for one request, in float32.

    Args:
        emb: [L, d] embedding rows of the question's ids (rows past the count are ignored).
        scal: [HEADER + 2T + P + L] per-request values: id count, uniforms for tier and p, greedy flag
            (I_* indices), then the tier token counts [T], the tier mask [T] and the p mask [P] (1 = feasible),
            then the ids.
        w_in: [h, d + T] first layer over [wide language feature | tier tokens / token scale].
        base: [h] first-layer term of the budget (bias and budget-embedding columns).
        later1: [h, h + 1] second layer (bias last, GELU's 0.5 folded in).
        heads: [T + P, h + 1] the stacked heads (bias last, 0.5 folded in).
    Returns:
        ([4] float32 (O_* indices): tier index, its log-prob, p index, its log-prob; [d] the language feature).
    """
    T, P = num_tiers, num_positions
    h = base.shape[0]
    lang = question_mean(emb, scal[I_N])
    tokens = scal[HEADER:HEADER + T] / token_scale
    a = gelu2(w_in @ torch.cat([wide(lang, wide_scale), tokens]) + base)
    b = gelu2(later1[:, :h] @ a + later1[:, h])
    logits = heads[:, :h] @ b + heads[:, h]
    tier_mask = scal[HEADER + T:HEADER + 2 * T] > 0.5
    p_mask = scal[HEADER + 2 * T:HEADER + 2 * T + P] > 0.5
    lt = F.log_softmax(logits[:T].masked_fill(~tier_mask, float("-inf")), dim=0)
    lp = F.log_softmax(logits[T:].masked_fill(~p_mask, float("-inf")), dim=0)
    greedy = scal[I_GREEDY]
    t_idx = draw_index(lt, scal[I_U_TIER], greedy)
    p_idx = draw_index(lp, scal[I_U_P], greedy)
    # gather, not lt[t_idx]: indexing with a tensor checks its bounds on the host (a sync, not capturable)
    out = torch.cat([t_idx.float().view(1), lt.gather(0, t_idx.view(1)), p_idx.float().view(1),
                     lp.gather(0, p_idx.view(1))])
    return out, lang


class DeviceStage1(GraphedDecision):
    """Stage1 and the language feature on the request's device for one `RequestEngine` (module docstring).

    Args:
        device: the model's device.
        space: the knob space.
        embed: the model's word embedding: ids [L] (int64, on the device) -> [1, L, d] (no host syncs on CUDA).
        d_model: the embedding width.
        max_question_tokens: the most question ids the device path takes (longer questions: host path).
        use_graph: capture embedding and decision as one CUDA graph (CUDA only).
        compile: fuse `stage1_decide` with torch.compile before capturing.
    """

    def __init__(self, device: torch.device, space: KnobSpace, embed: Callable[[torch.Tensor], torch.Tensor],
                 d_model: int, *, max_question_tokens: int = 256, use_graph: Optional[bool] = None,
                 compile: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.use_graph = self.cuda if use_graph is None else bool(use_graph)
        if self.use_graph and not self.cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        if max_question_tokens < 1:
            raise ValueError(f"max_question_tokens must be at least 1, got {max_question_tokens}")
        self.space = space
        self.embed = embed
        self.num_tiers = len(space.tier_names)
        self.num_positions = len(space.positions)
        self.max_ids = int(max_question_tokens)
        self.ids_at = HEADER + 2 * self.num_tiers + self.num_positions
        dev, pin = self.device, self.cuda
        self.scal_host = torch.zeros(self.ids_at + self.max_ids, dtype=torch.float32, pin_memory=pin)
        self._scal_np = self.scal_host.numpy()
        self.scal = torch.zeros_like(self.scal_host, device=dev)
        self.out = torch.zeros(4, dtype=torch.float32, device=dev)
        self.out_host = torch.zeros(4, dtype=torch.float32, pin_memory=pin)
        self._out_np = self.out_host.numpy()
        self.lang = torch.zeros(d_model, dtype=torch.float32, device=dev)
        self.lang_host = torch.zeros(d_model, dtype=torch.float32, pin_memory=pin)
        self.event = torch.cuda.Event() if self.cuda else None
        self._decide = torch.compile(stage1_decide, dynamic=False) if compile else stage1_decide
        self._weights = StageWeights(dev, 1)    # Stage1's prepared matrices and budget term on the device
        self._graph = None
        self.captured = 0
        self.decided = 0                        # decisions queued (for reports and tests)

    def fits(self, num_ids: int) -> bool:
        """Whether a question of `num_ids` ids takes the device path."""
        return 0 < num_ids <= self.max_ids

    def prepare(self, controller: TwoStageController, budget_ms: float) -> None:
        """Bring the controller's Stage1 matrices and the budget's first-layer term to the device if they
        changed (new weights: once per policy version; new budget: once per GRPO group); pinned,
        non-blocking copies on CUDA."""
        if self._weights.sync(controller, budget_ms):
            self._graph = None            # new device tensors: capture again

    def queue(self, ids: Sequence[int], tier_tokens: Sequence[int], tier_mask: Sequence[bool],
              p_mask: Sequence[bool], uniforms: Optional[Sequence[float]]) -> None:
        """Queue the decision: `ids` the question's token ids (`fits(len(ids))`), `uniforms` two draws from
        the caller's generator (tier, p) or None for greedy. `prepare` must have run for this controller and
        budget."""
        if not self._weights.ready():
            raise RuntimeError("DeviceStage1.prepare(controller, budget_ms) must run before queue()")
        n = len(ids)
        if not self.fits(n):
            raise ValueError(f"{n} question ids do not fit the device path's {self.max_ids} (check fits() first)")
        T, P = self.num_tiers, self.num_positions
        if len(tier_tokens) != T or len(tier_mask) != T or len(p_mask) != P:
            raise ValueError(f"tier counts/mask of {len(tier_tokens)}/{len(tier_mask)} for {T} tiers, a p mask of "
                             f"{len(p_mask)} for {P} positions")
        head = [n, 0.0, 0.0, 1.0] if uniforms is None else [n, uniforms[0], uniforms[1], 0.0]
        # one write into the numpy view of the pinned buffer (each call costs ~10x its loop time here); ids
        # < 2**24 are exact in float32; rows past n keep earlier ids (valid rows, masked out of the mean)
        values = head + list(tier_tokens) + list(tier_mask) + list(p_mask) + list(ids)
        self._scal_np[:len(values)] = values
        # the previous request's copy out of this buffer has completed: each request waited for its decision
        self.decided += 1
        self._launch()

    def result(self, spin: bool = True) -> tuple[int, float, int, float]:
        """Wait for the queued decision (polling the event with `spin`): (tier index, its log-prob, p index,
        its log-prob)."""
        v = self._read(spin)
        return int(v[O_TIER]), v[O_LP_TIER], int(v[O_P]), v[O_LP_P]

    def lang_feat(self) -> np.ndarray:
        """The language feature the last decision read [d] float32 (on CUDA, call after the stream has
        synchronised past the request's end)."""
        src = self.lang_host if self.cuda else self.lang
        return src.numpy().copy()

    # ------------------------------------------------------------------------------------------
    def _body(self) -> None:
        """Inputs up, the decision, the decision and the language feature down (pinned, so the copies can be
        graph nodes)."""
        w, (wide_scale, token_scale) = self._weights.w, self._weights.consts
        self.scal.copy_(self.scal_host, non_blocking=True)
        ids = self.scal[self.ids_at:].long()
        emb = self.embed(ids)[0]
        out, lang = self._decide(emb, self.scal, w["w_in"], w["base"], w["later1"], w["heads"], wide_scale,
                                 token_scale, self.num_tiers, self.num_positions)
        self.out.copy_(out)
        self.lang.copy_(lang)
        if self.cuda:
            self.out_host.copy_(self.out, non_blocking=True)
            self.lang_host.copy_(self.lang, non_blocking=True)
