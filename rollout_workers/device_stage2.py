"""Stage2 decided on the device, in the stream right after the prefix (issue 4 point 5).

On a GPU the host-side Stage2 leaves a bubble by construction: the decision needs the latency token,
the rest of the prefill needs the decision. With the decision on the host the bubble was the latency
token's read-back, the spent fraction, the controller's maths (~0.3 ms of Python on an H100 host inside a
request) and the block selection (docs/PERFORMANCE.md). Here the host queues, while the GPU still runs
the vision encoder and the prefix:

    copy the per-request scalars (pinned -> device)   p, vision tokens, charged ms, budget, two uniforms,
                                                     greedy flag, the num_blocks mask
    [prefix blocks 0..p-1]
    copy the latency-token row into a static buffer
    graph: stamp the GPU clock; Stage2's MLP, log-softmax heads, draw or argmax;
           copy the decision [6] to pinned memory                               (one CUDA graph)
    record an event

and then polls the event and reads six numbers: the two chosen indices, their log-probs, the spent
fraction and the elapsed ms. The latency state itself goes to the host after the rest of the prefill is
queued (`queue_state_copy`), off the critical path.

The maths is that of `shared.controller._NumpyAct.stage2` (the same prepared matrices: the first layer's
latency-state and scalar-code columns, the per-budget term with the p one-hot column, the later layers
with GELU's 0.5 folded in), in float32 torch ops; the draw is the same inverse CDF on the same two uniforms
(`TwoStageController._pick_pair` draws them from the caller's generator on the host). So for the same
features and uniforms the decisions equal the host path's, and the log-probs agree within float32
round-off (tested); the learner recomputes log-probs from the recorded features as before.

The spent fraction: ``(stamp after the prefix - stamp at the request's start) + charged ms`` over the
budget, where the stamps are the GPU's global nanosecond timer (`triton_kernels.stamp_ns`) taken in the
stream, so it measures the same interval as the timer's CUDA events (the start stamp is launched right
after the timer's first event, on an idle stream). On CPU (tests) the stamps are the host clock.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rollout_workers.device_decision import GraphedDecision, StageWeights, draw_index, gelu2, wide
from shared.controller import SCALAR_CODE_DIM, SCALAR_CODE_MAX_FREQ, TwoStageController, _code_freqs
from shared.knobs import KnobSpace

# the per-request scalars, one float32 vector copied to the device per request
S_P, S_VISION, S_CHARGED, S_BUDGET, S_U_K, S_U_NB, S_GREEDY = range(7)
S_MASK = 8
# the decision, six float32 values read back by the host
O_K, O_LP_K, O_NB, O_LP_NB, O_SPENT, O_ELAPSED = range(6)


def stage2_decide(state: torch.Tensor, scal: torch.Tensor, stamps: torch.Tensor, w_in: torch.Tensor,
                  base: torch.Tensor, later1: torch.Tensor, heads: torch.Tensor, freqs: torch.Tensor,
                  wide_scale: float, token_scale: float, num_top_k: int) -> torch.Tensor:
    """Stage2's decision for one request, in float32.

    Args:
        state: [d] latency-token state (any float dtype).
        scal: [8 + N] per-request scalars (S_* indices): p index, vision tokens, charged ms, budget ms,
            uniforms for top_k and num_blocks, greedy flag, then the num_blocks mask (1 = feasible).
        stamps: [2] int64 ns: request start and decision point.
        w_in: [h, d + 2 * (1 + SCALAR_CODE_DIM)] first layer over [wide state | the two scalar codes].
        base: [P, h] first-layer term of the budget per p (bias, budget-embedding columns, p one-hot).
        later1: [h, h + 1] second layer (bias last, GELU's 0.5 folded in).
        heads: [K + N, h + 1] the stacked heads (bias last, 0.5 folded in).
        freqs: [SCALAR_CODE_DIM // 2] the scalar code's frequencies.
    Returns:
        [6] float32 (O_* indices): top_k index, its log-prob, num_blocks index, its log-prob, spent fraction,
        elapsed ms.
    """
    K = num_top_k
    h = base.shape[1]
    wide_state = wide(state.float(), wide_scale)
    elapsed_ms = (stamps[1] - stamps[0]).float() * 1e-6 + scal[S_CHARGED]
    spent = elapsed_ms / scal[S_BUDGET]
    pair = torch.stack([scal[S_VISION] / token_scale, spent])[:, None]           # [2, 1]
    angles = pair * freqs[None, :]
    codes = torch.cat([pair, torch.sin(angles), torch.cos(angles)], dim=1).reshape(-1)
    p_row = base.index_select(0, scal[S_P:S_P + 1].long())[0]
    a = gelu2(w_in @ torch.cat([wide_state, codes]) + p_row)
    b = gelu2(later1[:, :h] @ a + later1[:, h])
    logits = heads[:, :h] @ b + heads[:, h]
    lk = F.log_softmax(logits[:K], dim=0)
    mask = scal[S_MASK:S_MASK + logits.shape[0] - K] > 0.5
    ln = F.log_softmax(logits[K:].masked_fill(~mask, float("-inf")), dim=0)
    greedy = scal[S_GREEDY]
    k_idx = draw_index(lk, scal[S_U_K], greedy)
    nb_idx = draw_index(ln, scal[S_U_NB], greedy)
    # gather, not lk[k_idx]: indexing with a tensor checks its bounds on the host (a sync, not capturable)
    return torch.cat([k_idx.float().view(1), lk.gather(0, k_idx.view(1)), nb_idx.float().view(1),
                      ln.gather(0, nb_idx.view(1)), spent.view(1), elapsed_ms.view(1)])


class DeviceStage2(GraphedDecision):
    """Stage2 on the request's device for one `RequestEngine` (module docstring).

    Args:
        device: the model's device.
        space: the knob space.
        state_dtype: the model's dtype (the latency-token row is copied as is).
        d_model: the latency-token width.
        use_graph: capture the decision (clock stamp included) as one CUDA graph (CUDA only).
        compile: fuse `stage2_decide` with torch.compile before capturing.
    """

    def __init__(self, device: torch.device, space: KnobSpace, state_dtype: torch.dtype, d_model: int, *,
                 use_graph: Optional[bool] = None, compile: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.use_graph = self.cuda if use_graph is None else bool(use_graph)
        if self.use_graph and not self.cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        if self.cuda:
            from rollout_workers import triton_kernels
            if not triton_kernels.HAVE_TRITON:
                raise ValueError("the device-side Stage2 reads the GPU clock through Triton, which is not installed")
            self._stamp_kernel = triton_kernels.stamp_ns
        self.space = space
        self.num_top_k = len(space.top_ks)
        self.num_nb = len(space.num_blocks)
        dev, pin = self.device, self.cuda
        self.stamps = torch.zeros(2, dtype=torch.int64, device=dev)
        self.scal_host = torch.zeros(S_MASK + self.num_nb, dtype=torch.float32, pin_memory=pin)
        self._scal_np = self.scal_host.numpy()
        self.scal = torch.zeros_like(self.scal_host, device=dev)
        self.state = torch.zeros(d_model, dtype=state_dtype, device=dev)
        self.state_host = torch.zeros(d_model, dtype=state_dtype, pin_memory=pin)
        self.out = torch.zeros(6, dtype=torch.float32, device=dev)
        self.out_host = torch.zeros(6, dtype=torch.float32, pin_memory=pin)
        self._out_np = self.out_host.numpy()
        self.freqs = _code_freqs(SCALAR_CODE_DIM // 2, SCALAR_CODE_MAX_FREQ).to(dev)
        self.event = torch.cuda.Event() if self.cuda else None
        self._decide = torch.compile(stage2_decide, dynamic=False) if compile else stage2_decide
        self._weights = StageWeights(dev, 2)    # Stage2's prepared matrices and budget term on the device
        self._graph = None
        self._inputs_set = False
        self._start_graph = None
        self.captured = 0

    # ------------------------------------------------------------------------------------------
    def stamp(self, slot: int) -> None:
        """Stamp the clock into `stamps[slot]` (in the stream on CUDA; the host clock on CPU)."""
        if self.cuda:
            self._stamp_kernel(self.stamps, slot)
        else:
            self.stamps[slot] = time.perf_counter_ns()

    def start(self) -> None:
        """Stamp the request's start (right after the timer's first event, on an idle stream). On CUDA a
        one-node graph: its replay costs the host less than a Triton launch."""
        if not self.use_graph:
            self.stamp(0)
            return
        if self._start_graph is None:
            self._start_graph = self._capture(lambda: self.stamp(0))
        self._start_graph.replay()

    def prepare(self, controller: TwoStageController, budget_ms: float) -> None:
        """Bring the controller's Stage2 matrices and the budget's first-layer term to the device if they
        changed (new weights: once per policy version; new budget: once per GRPO group). On CUDA the copies
        are queued from pinned staging memory (non-blocking), so this may run while the device is busy."""
        if self._weights.sync(controller, budget_ms):
            self._graph = None            # new device tensors: capture again

    def set_inputs(self, *, p_idx: int, vision_tokens: int, charged_ms: float, budget_ms: float,
                   uniforms: Optional[Sequence[float]], nb_mask: Sequence[bool]) -> None:
        """Queue the per-request scalars' upload: `uniforms` (two, from the caller's generator) or None for
        greedy. Call before the prefix is queued, so that the copy runs before it, not between the prefix
        and the decision. `prepare` must have run for this controller and budget."""
        if not self._weights.ready(budget_ms):
            raise RuntimeError("DeviceStage2.prepare(controller, budget_ms) must run before the decision's inputs")
        if len(nb_mask) != self.num_nb:
            raise ValueError(f"a num_blocks mask of {len(nb_mask)} options for {self.num_nb}")
        s = self._scal_np          # numpy view of the pinned buffer: element writes without torch dispatch
        s[S_P], s[S_VISION], s[S_CHARGED], s[S_BUDGET] = p_idx, vision_tokens, charged_ms, budget_ms
        if uniforms is None:
            s[S_U_K] = s[S_U_NB] = 0.0
            s[S_GREEDY] = 1.0
        else:
            s[S_U_K], s[S_U_NB] = uniforms
            s[S_GREEDY] = 0.0
        s[S_MASK:] = nb_mask
        # the previous request's copy out of this buffer has completed: each request waits for its decision
        self.scal.copy_(self.scal_host, non_blocking=True)
        self._inputs_set = True

    def queue(self, state_row: torch.Tensor, **inputs) -> None:
        """Queue the decision after the work already in the stream (the prefix): `state_row` [d] is the
        latency token's row of the prefix output. The scalars come from `set_inputs` (or pass its keyword
        arguments here)."""
        if inputs:
            self.set_inputs(**inputs)
        if not self._inputs_set:
            raise RuntimeError("DeviceStage2.set_inputs(...) must run before queue()")
        self._inputs_set = False
        self.state.copy_(state_row)
        self._launch()

    def result(self, spin: bool = True) -> tuple[int, float, int, float, float, float]:
        """Wait for the queued decision (polling the event with `spin`): (top_k index, its log-prob,
        num_blocks index, its log-prob, spent fraction, elapsed ms)."""
        v = self._read(spin)
        return int(v[O_K]), v[O_LP_K], int(v[O_NB]), v[O_LP_NB], v[O_SPENT], v[O_ELAPSED]

    def top_k_index_on_device(self) -> torch.Tensor:
        """The queued decision's top_k index as a float32 scalar on the device (valid in stream order after
        `queue`; for work queued before the host reads the decision)."""
        return self.out[O_K]

    def queue_state_copy(self) -> None:
        """Queue the latency state's copy to the host (after the rest of the prefill is queued); read it with
        `latency_state` once the stream has passed it."""
        if self.cuda:
            self.state_host.copy_(self.state, non_blocking=True)

    def latency_state(self) -> np.ndarray:
        """The recorded latency state [d] float32 (call after the stream synchronised past the copy)."""
        src = self.state_host if self.cuda else self.state
        return src.float().numpy().copy()

    # ------------------------------------------------------------------------------------------
    def _run(self) -> torch.Tensor:
        w, (wide_scale, token_scale) = self._weights.w, self._weights.consts
        return self._decide(self.state, self.scal, self.stamps, w["w_in"], w["base"], w["later1"], w["heads"],
                            self.freqs, wide_scale, token_scale, self.num_top_k)

    def _body(self) -> None:
        """Stamp, decide, and the decision down to pinned memory (a node of the graph on CUDA: one host call
        less in the bubble)."""
        self.stamp(1)
        self.out.copy_(self._run())
        if self.cuda:
            self.out_host.copy_(self.out, non_blocking=True)
