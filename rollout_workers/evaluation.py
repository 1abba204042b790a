"""The per-sample work of an evaluation (jobs/evaluate.py), as a plain class (Ray-free).

`EvalRunner` hosts one backend and the trained controller and evaluates whole samples:

- role "profile": every static knob combination once (latency of a static combination does not
  depend on the budget, so one run per sample serves every budget);
- role "test": the same static runs, plus per budget one greedy controller run and one run of the
  uniform random policy.

Static combinations run without the controller where the backend has a plain path (MolmoE: no budget
token, one prefill, as a static deployment would serve); the synthetic backend needs the controller
object for its features, which do not change its latency or answer under fixed knobs.

Determinism: the synthetic backend's noise generator and the random policy's generator are reseeded
per (seed, sample id), so a sample gives the same result whichever worker or shard evaluates it.

A sample whose input is bad (`SampleError`, e.g. a corrupt image) is dropped whole and reported; any
other exception propagates (an evaluation must not hide a broken backend).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional, Sequence

import numpy as np
import torch

from rollout_workers.backends import make_backend
from shared.backend import RolloutOutcome, Sample, SampleError, score_outcome
from shared.controller import HeadDecision, Stage1Features, Stage2Features, TwoStageController
from shared.knobs import KnobChoice


class UniformPolicy(TwoStageController):
    """The random baseline: uniform over the feasible (tier, p, top_k, num_blocks) options of a request.

    Masks are the controller's own (collapsed tiers, infeasible num_blocks for the drawn p), and p is
    drawn in proportion to its number of feasible num_blocks options, so the joint draw is uniform over
    feasible options. Log-probs are those of that distribution.
    """

    def act_stage1(self, f: Stage1Features, *, greedy: bool = False,
                   generator: Optional[torch.Generator] = None) -> tuple[HeadDecision, HeadDecision]:
        weights_p = [float(ok) * sum(self.space.num_blocks_feasible(p))
                     for ok, p in zip(f.p_mask, self.space.positions)]
        return _draw([float(ok) for ok in f.tier_mask], generator), _draw(weights_p, generator)

    def act_stage2(self, budget_ms: float, f: Stage2Features, *, greedy: bool = False,
                   generator: Optional[torch.Generator] = None) -> tuple[HeadDecision, HeadDecision]:
        return (_draw([1.0] * len(self.space.top_ks), generator),
                _draw([float(ok) for ok in f.nb_mask], generator))


def _draw(weights: Sequence[float], generator: Optional[torch.Generator]) -> HeadDecision:
    total = sum(weights)
    if total <= 0:
        raise ValueError("no feasible option to draw from")
    u = float(torch.rand((), generator=generator)) * total
    acc, idx = 0.0, max(i for i, w in enumerate(weights) if w > 0)
    for i, w in enumerate(weights):
        acc += w
        if w > 0 and u < acc:
            idx = i
            break
    return HeadDecision(idx, math.log(weights[idx] / total))


def sample_seed(seed: int, sample_id: str, salt: int = 0) -> int:
    """A stable per-sample seed (crc32: the same in every process, unlike hash())."""
    return (zlib.crc32(sample_id.encode()) * 1000003 + seed * 7919 + salt) % (1 << 62)


def knob_dict(out: RolloutOutcome) -> dict:
    k = out.knobs
    return {"tier": k.tier, "max_crops": k.max_crops, "p": k.p, "top_k": k.top_k, "num_blocks": k.num_blocks}


class EvalRunner:
    """Evaluates samples with one backend, the trained controller, the static set and the random policy.

    Args:
        cfg: the evaluation's RunConfig (the one the bundle was checked against).
        controller_state: the bundle's controller tensors (name -> tensor or array).
        worker_id: seeds the backend (each Ray shard has its own).
        backend: an already built backend (in-process use); default: `make_backend(cfg, worker_id)`.
    """

    def __init__(self, cfg, controller_state: Optional[dict] = None, worker_id: int = 0, backend=None):
        self.cfg = cfg
        self.worker_id = worker_id
        torch.set_num_threads(cfg.system.torch_threads)
        self.backend = backend if backend is not None else make_backend(cfg, worker_id)
        self.space = self.backend.space
        info = self.backend.info()
        self.controller = TwoStageController.from_config(cfg, self.space, token_rms=info.token_rms).eval()
        self.random_policy = UniformPolicy.from_config(cfg, self.space, token_rms=info.token_rms).eval()
        self.statics: list[KnobChoice] = self.space.static_choices(cfg.knobs.static_p)
        self.plain_static = info.backend == "molmoe"
        self.warmed = False
        if controller_state is not None:
            self.set_controller(controller_state)

    def info(self) -> dict:
        return dict(vars(self.backend.info()))

    def set_controller(self, state: dict) -> None:
        weights = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                   for k, v in state.items()}
        self.controller.set_weights(weights)
        self.random_policy.set_weights(weights)   # the same budget-token map: same request path

    def warmup(self) -> None:
        if not self.warmed:
            self.backend.warmup(self.cfg.system.warmup_rollouts, self.controller)
            self.warmed = True

    # ------------------------------------------------------------------------------------------
    def _reseed(self, sample: Sample, salt: int) -> torch.Generator:
        seed = sample_seed(self.cfg.system.seed, sample.sample_id, salt)
        if isinstance(getattr(self.backend, "rng", None), np.random.Generator):   # synthetic noise
            self.backend.rng = np.random.default_rng(seed)
        return torch.Generator().manual_seed(seed)

    def run_static(self, sample: Sample) -> dict:
        """Every static combination once: accuracy [C], latency_ms [C], vision tokens [C]."""
        self._reseed(sample, 1)
        budget = float(self.cfg.budget.max_ms)          # does not affect a static run's latency
        ctl = None if self.plain_static else self.controller
        acc, lat, tokens = [], [], []
        for choice in self.statics:
            out = self.backend.run(sample, budget, ctl, fixed=choice)
            acc.append(score_outcome(out, sample))
            lat.append(out.latency_ms)
            tokens.append(out.vision_tokens)
        return {"accuracy": acc, "latency_ms": lat, "vision_tokens": tokens}

    def run_policy(self, sample: Sample, budgets: Sequence[float], which: str) -> dict:
        """One run per budget of the greedy controller ("controller") or the random policy ("random")."""
        gen = self._reseed(sample, 2 if which == "controller" else 3)
        policy = self.controller if which == "controller" else self.random_policy
        acc, lat, knobs, segs = [], [], [], []
        for b in budgets:
            out = self.backend.run(sample, float(b), policy, greedy=which == "controller", generator=gen)
            acc.append(score_outcome(out, sample))
            lat.append(out.latency_ms)
            knobs.append(knob_dict(out))
            segs.append({k: float(v) for k, v in out.segments_ms.items()})
        return {"accuracy": acc, "latency_ms": lat, "knobs": knobs, "segments_ms": segs}

    def evaluate(self, sample: Sample, role: str, budgets: Sequence[float]) -> dict:
        """All of one sample's runs for `role` ("test" or "profile"); {"error": msg} for a bad sample."""
        self.warmup()
        res: dict = {"sample_id": sample.sample_id, "role": role, "question_type": sample.question_type}
        try:
            res["static"] = self.run_static(sample)
            if role == "test":
                res["controller"] = self.run_policy(sample, budgets, "controller")
                res["random"] = self.run_policy(sample, budgets, "random")
        except SampleError as exc:
            return {"sample_id": sample.sample_id, "role": role, "error": f"{type(exc).__name__}: {exc}"}
        return res

    def evaluate_many(self, items: Sequence[tuple[Sample, str]], budgets: Sequence[float]) -> list[dict]:
        return [self.evaluate(s, role, budgets) for s, role in items]
