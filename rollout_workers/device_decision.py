"""What the device-side controller stages share (rollout_workers/device_stage1.py, device_stage2.py): the
numpy act path's maths pieces in float32 torch ops, a stage's weights kept on the device, and the wait for a
decision.

The prepared matrices are `shared.controller._NumpyAct`'s (`TwoStageController.act_arrays(stage)`): a stage's
first layer over its per-request inputs, its per-budget first-layer term, the later layer and the stacked
heads with GELU's 0.5 folded in. So the device stages compute what the host act path computes, op for op.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional

import numpy as np
import torch

from shared.controller import TwoStageController

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_CA = math.sqrt(2.0 / math.pi) * 0.044715
_LN_EPS = 1e-5


def gelu2(x: torch.Tensor) -> torch.Tensor:
    """2 * GELU_tanh(x) (the next layer's weights carry the 0.5, as in the numpy act path)."""
    return x * (1.0 + torch.tanh(x * (_GELU_C + _GELU_CA * x * x)))


def wide(x: torch.Tensor, wide_scale: float) -> torch.Tensor:
    """`shared.controller._wide` of one d-vector in float32: layer-normalised, times `wide_scale`."""
    xc = x - x.mean()
    return xc * (wide_scale * torch.rsqrt((xc * xc).mean() + _LN_EPS))


def draw_index(lp: torch.Tensor, u: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """Index drawn from log-probs lp [C] (-inf = masked) by inverse CDF on the uniform u (as
    `shared.controller._draw`), or the first argmax when greedy > 0.5. Returns an int64 scalar tensor."""
    probs = lp.exp()
    cdf = probs.cumsum(0)
    idx = (cdf <= u * cdf[-1]).sum()
    ar = torch.arange(lp.shape[0], device=lp.device)
    last = torch.where(probs > 0, ar, torch.zeros_like(ar)).max()       # round-off at the top
    drawn = torch.where(idx >= lp.shape[0], last, idx)
    return torch.where(greedy > 0.5, lp.argmax(), drawn)


def upload(dst: torch.Tensor, arr: np.ndarray) -> None:
    """dst <- arr; to a CUDA tensor through a pinned copy, non-blocking (torch's host allocator keeps the
    pinned block until the copy has run), so it may be queued while the device is busy."""
    src = torch.from_numpy(arr)
    if dst.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


def wait(event: torch.cuda.Event, spin: bool) -> None:
    """Wait for a recorded event: polling it (`spin`), or blocking in the driver."""
    if spin:
        while not event.query():
            pass
    else:
        event.synchronize()


class StageWeights:
    """One controller stage's prepared matrices and its per-budget first-layer term as float32 device tensors
    (`w`: "w_in", "later1", "heads", "base"), uploaded only when they change: new weights once per policy
    version, a new budget once per GRPO group. `consts` = (wide scale, token scale)."""

    def __init__(self, device: torch.device, stage: int):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.device = torch.device(device)
        self.stage = stage
        self.w: Optional[dict] = None
        self.consts = (1.0, 1.0)
        self._w_key = None          # (numpy act object, the stage's weight versions)
        self._base_key = None       # (numpy act object, the encoder's and stage's weight versions, budget)

    def sync(self, controller: TwoStageController, budget_ms: float) -> bool:
        """Bring the controller's current matrices and the budget's term to the device if they changed.
        Returns True when the device tensors were (re)allocated: graphs reading them must be captured again."""
        st = self.stage
        act = controller.act_arrays(st)
        new_tensors = False
        if self._w_key is None or self._w_key[0] is not act or self._w_key[1] != act.stage_keys[st]:
            w_in, later = (act.s1_in, act.s1_later) if st == 1 else (act.s2_in, act.s2_later)
            mats = {"w_in": w_in, "later1": later[0], "heads": later[1]}
            shapes = {n: tuple(m.shape) for n, m in mats.items()}
            shapes["base"] = (w_in.shape[0],) if st == 1 else tuple(act.s2_p.shape)    # Stage2: per p
            if self.w is None or any(tuple(self.w[n].shape) != shp for n, shp in shapes.items()):
                self.w = {n: torch.zeros(shp, dtype=torch.float32, device=self.device) for n, shp in shapes.items()}
                new_tensors = True
            for n, m in mats.items():
                upload(self.w[n], m)
            self.consts = (float(act.wide_d), float(act.token_scale))
            self._w_key = (act, act.stage_keys[st])
            self._base_key = None
        base_key = (act, act.keys[st], float(budget_ms))
        if self._base_key is None or self._base_key[0] is not act or self._base_key[1:] != base_key[1:]:
            upload(self.w["base"], act.budget_term(st, float(budget_ms)))
            self._base_key = base_key
        return new_tensors

    def ready(self, budget_ms: Optional[float] = None) -> bool:
        """Whether `sync` has run (for this budget, if given)."""
        if self.w is None or self._base_key is None:
            return False
        return budget_ms is None or self._base_key[2] == float(budget_ms)


class GraphedDecision(ABC):
    """What both device stages do around their maths: `_body` (subclasses) runs as one CUDA graph, captured at
    its first use, or eagerly without graphs; an event marks its end on CUDA; the host reads the decision
    vector `out` (on CUDA its pinned copy, `_out_np`, which `_body` fills). Subclasses set `use_graph`, `cuda`,
    `event`, `out`, `_out_np`, `_graph` (None) and `captured` (0)."""

    def _launch(self) -> None:
        if self.use_graph:
            if self._graph is None:
                self._graph = self._capture(self._body)
            self._graph.replay()
        else:
            self._body()
        if self.cuda:
            self.event.record()

    def _read(self, spin: bool) -> list[float]:
        """The launched decision's values, after waiting for it (polling its event with `spin`)."""
        if self.cuda:
            wait(self.event, spin)
            return self._out_np.tolist()
        return self.out.tolist()

    @abstractmethod
    def _body(self) -> None:
        """The stage's device work: inputs in, the decision, the decision out (graph-capturable)."""

    def _capture(self, fn):
        from rollout_workers.fast_engine import capture_graph
        self.captured += 1
        return capture_graph(fn)
