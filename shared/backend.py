"""The rollout-backend interface (DESIGN.md section 6) and group execution.

A backend hosts the frozen model (or a stand-in) and runs ONE request under a controller or under fixed
knobs, returning a `RolloutOutcome`: the knob decisions with their log-probs, the controller features,
crop/token counts, the answer text and the timings. `run_group` runs the G rollouts of a
(sample, budget) group one at a time, scores each answer, computes its reward and builds the records.

Failure policy: a rollout that raises `SampleError` (bad input, e.g. a corrupt image) or any other
exception is dropped, counted and logged; it never becomes a zero-reward row. A group with fewer than
two successful rollouts carries no group-relative signal and is dropped whole.

Pure module: no Ray, no model.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from shared.controller import HeadDecision, Stage1Features, Stage2Features, TwoStageController
from shared.knobs import KnobChoice, KnobSpace
from shared.records import RolloutRecord, make_record
from shared.rewards import RewardInputs
from shared.scorers import extract_answer, score

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that cannot be served (corrupt image, empty question, ...): skipped and counted."""


@dataclass
class Sample:
    """One question. `image` holds the encoded image bytes (None for text-only or synthetic)."""

    sample_id: str
    question: str
    answers: list[str]
    metric: str = "vqa"
    question_type: str = ""
    source: str = ""
    image: Optional[bytes] = None
    max_new_tokens: int = 16
    meta: dict = field(default_factory=dict)


@dataclass
class BackendInfo:
    """What a bundle's metadata records about the execution setting."""

    backend: str
    model_id: str
    engine: str
    device: str                       # e.g. "cpu (2 threads)" or "NVIDIA H100 80GB HBM3"
    d_model: int
    token_rms: float                  # RMS of the frozen model's word embeddings (budget-token scale)
    importance_sha256: str


@dataclass
class RolloutOutcome:
    """One request's result, before scoring."""

    stage1: Stage1Features
    stage2: Stage2Features
    tier: HeadDecision
    p: HeadDecision
    top_k: HeadDecision
    num_blocks: HeadDecision
    knobs: KnobChoice
    num_crops: int
    vision_tokens: int
    prompt_tokens: int
    answer_tokens: int
    segments_ms: dict[str, float]     # keys: shared.records.SEGMENTS
    latency_ms: float
    answer: str
    t_start: float
    t_end: float

    @property
    def behavior_logp(self) -> float:
        return self.tier.log_prob + self.p.log_prob + self.top_k.log_prob + self.num_blocks.log_prob


class RolloutBackend(ABC):
    """Runs single requests of the frozen model (batch size 1, one at a time)."""

    space: KnobSpace

    @abstractmethod
    def info(self) -> BackendInfo:
        """The execution setting (model, engine, device, importance hash)."""

    def warmup(self, num_rollouts: int, controller: TwoStageController) -> None:
        """Unmeasured requests before the first recorded one (compilation, caches, clocks)."""

    @abstractmethod
    def run(self, sample: Sample, budget_ms: float, controller: TwoStageController, *,
            greedy: bool = False, generator: Optional[torch.Generator] = None,
            fixed: Optional[KnobChoice] = None) -> RolloutOutcome:
        """Serve one request under the controller, or under `fixed` knobs (the controller's decisions
        are then replaced by the fixed choice, with log-prob 0)."""


@dataclass
class GroupResult:
    records: list[RolloutRecord]
    failures: list[str]               # one message per dropped rollout
    dropped_group: bool = False       # True when the whole group was dropped


def rollout_inputs(out: RolloutOutcome, accuracy: float, space: KnobSpace) -> RewardInputs:
    return RewardInputs(accuracy=accuracy, latency_ms=out.latency_ms, budget_ms=out.stage1.budget_ms,
                        num_crops=out.num_crops, max_crops=max(space.tier_max_crops) + 1,
                        top_k=out.knobs.top_k, max_top_k=max(space.top_ks), num_blocks=out.knobs.num_blocks,
                        max_blocks=space.num_layers)


def outcome_to_record(out: RolloutOutcome, sample: Sample, *, group_id: str, rollout_index: int, worker_id: int,
                      policy_version: int, accuracy: float, reward: float, run_id: str = "") -> RolloutRecord:
    seg = out.segments_ms
    return make_record(
        sample_id=sample.sample_id, group_id=group_id, rollout_index=rollout_index, worker_id=worker_id,
        policy_version=policy_version, source=sample.source, question_type=sample.question_type,
        metric=sample.metric, budget_ms=out.stage1.budget_ms,
        lang_feat=out.stage1.lang_feat, tier_tokens=list(out.stage1.tier_tokens),
        tier_mask=list(out.stage1.tier_mask), p_mask=list(out.stage1.p_mask),
        latency_state=out.stage2.latency_state, spent_frac=out.stage2.spent_frac,
        nb_mask=list(out.stage2.nb_mask),
        tier_idx=out.tier.index, p_idx=out.p.index, top_k_idx=out.top_k.index, nb_idx=out.num_blocks.index,
        logp_tier=out.tier.log_prob, logp_p=out.p.log_prob, logp_top_k=out.top_k.log_prob,
        logp_nb=out.num_blocks.log_prob, behavior_logp=out.behavior_logp,
        tier=out.knobs.tier, max_crops=out.knobs.max_crops, p=out.knobs.p, top_k=out.knobs.top_k,
        num_blocks=out.knobs.num_blocks, num_crops=out.num_crops, vision_tokens=out.vision_tokens,
        prompt_tokens=out.prompt_tokens, answer_tokens=out.answer_tokens, latency_ms=out.latency_ms,
        **{name: float(seg.get(name, 0.0)) for name in ("preprocess_ms", "stage1_ms", "vision_ms", "prefix_ms",
                                                          "stage2_ms", "prefill_rest_ms", "decode_ms",
                                                          "postprocess_ms")},
        decode_ms_per_token=float(seg.get("decode_ms", 0.0)) / max(out.answer_tokens, 1),
        answer=out.answer, accuracy=accuracy, reward=reward, within_budget=out.latency_ms <= out.stage1.budget_ms,
        t_start=out.t_start, t_end=out.t_end, run_id=run_id)


def score_outcome(out: RolloutOutcome, sample: Sample) -> float:
    return score(sample.metric, extract_answer(out.answer), sample.answers)


def run_group(backend: RolloutBackend, sample: Sample, budget_ms: float, controller: TwoStageController,
              reward_fn: Callable[[RewardInputs], float], *, group_size: int, group_id: str, worker_id: int = 0,
              policy_version: int = 0, generator: Optional[torch.Generator] = None,
              run_id: str = "") -> GroupResult:
    """Run the G rollouts of one (sample, budget) group, one at a time, and build scored records."""
    records: list[RolloutRecord] = []
    failures: list[str] = []
    for i in range(group_size):
        try:
            out = backend.run(sample, budget_ms, controller, generator=generator)
            accuracy = score_outcome(out, sample)
            reward = reward_fn(rollout_inputs(out, accuracy, backend.space))
        except Exception as exc:  # noqa: BLE001 - a failed rollout is dropped and counted, never scored
            msg = f"sample {sample.sample_id} rollout {i}: {type(exc).__name__}: {exc}"
            log.warning("dropping rollout: %s", msg)
            failures.append(msg)
            if isinstance(exc, SampleError):   # the input itself is bad: the other rollouts would fail too
                break
            continue
        records.append(outcome_to_record(out, sample, group_id=group_id, rollout_index=i, worker_id=worker_id,
                                         policy_version=policy_version, accuracy=accuracy, reward=reward,
                                         run_id=run_id))
    if len(records) < 2:
        return GroupResult([], failures, dropped_group=True)
    return GroupResult(records, failures)

