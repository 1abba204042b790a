"""Knob spaces (DESIGN.md section 2): option sets, feasibility masks and block selection.

Semantics fixed by the design:
- tier -> max_crops for image preprocessing (decided by Stage1, before the vision encoder);
- p (insertion position): Stage2 reads the hidden state after the first p blocks;
- top_k: experts per token for every executed block with index >= p (the prefix keeps native top_k);
- num_blocks: total executed blocks; blocks 0..p-1 always run, then the (num_blocks - p) most important
  of blocks p..L-1 (importance from a JSON file, ties broken by the lower block index).

Pure module: no Ray, no model, no torch.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class KnobError(ValueError):
    """A knob space or knob choice that the model cannot execute."""


@dataclass(frozen=True)
class KnobChoice:
    """One request's knob values (not indices)."""

    tier: str
    max_crops: int
    p: int
    top_k: int
    num_blocks: int


@dataclass(frozen=True)
class KnobSpace:
    """The option sets of the four knobs, validated against the model's shape.

    Attributes:
        tier_names: tier names, cheapest first.
        tier_max_crops: max_crops per tier (same order).
        positions: options for p.
        top_ks: top_k options.
        num_blocks: num_blocks options.
        num_layers: LLM blocks of the model.
        num_experts: experts per MoE block.
        native_top_k: the model's trained top_k (used by the prefix).
    """

    tier_names: tuple[str, ...]
    tier_max_crops: tuple[int, ...]
    positions: tuple[int, ...]
    top_ks: tuple[int, ...]
    num_blocks: tuple[int, ...]
    num_layers: int
    num_experts: int
    native_top_k: int

    def __post_init__(self) -> None:
        if len(self.tier_names) != len(self.tier_max_crops) or not self.tier_names:
            raise KnobError("tier_names and tier_max_crops must be non-empty and of equal length")
        for name in ("tier_max_crops", "positions", "top_ks", "num_blocks"):
            vals = getattr(self, name)
            if not vals:
                raise KnobError(f"knob option set '{name}' is empty")
            if list(vals) != sorted(set(vals)):
                raise KnobError(f"knob option set '{name}' must be strictly increasing, got {list(vals)}")
        if self.native_top_k > self.num_experts:
            raise KnobError(f"native top_k {self.native_top_k} exceeds the {self.num_experts} experts")
        if max(self.top_ks) > self.num_experts or min(self.top_ks) < 1:
            raise KnobError(f"top_k options {list(self.top_ks)} must lie in 1..{self.num_experts} "
                            f"(the model has {self.num_experts} experts)")
        if max(self.num_blocks) > self.num_layers:
            raise KnobError(f"num_blocks options {list(self.num_blocks)} exceed the model's "
                            f"{self.num_layers} blocks")
        if min(self.positions) < 1:
            raise KnobError(f"insertion positions must be >= 1 (block 0 always runs), got "
                            f"{list(self.positions)}")
        for p in self.positions:
            if not any(self.num_blocks_feasible(p)):
                raise KnobError(f"insertion position p={p} leaves no feasible num_blocks option: "
                                f"need p < num_blocks <= {self.num_layers}, options are "
                                f"{list(self.num_blocks)}")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, knobs_cfg, model_cfg) -> "KnobSpace":
        """Build from the `knobs` and `model` sections of a RunConfig."""
        return cls(tier_names=tuple(knobs_cfg.tier_names), tier_max_crops=tuple(knobs_cfg.tier_max_crops),
                   positions=tuple(knobs_cfg.insertion_positions), top_ks=tuple(knobs_cfg.top_k_options),
                   num_blocks=tuple(knobs_cfg.num_blocks_options), num_layers=model_cfg.num_layers,
                   num_experts=model_cfg.num_experts, native_top_k=model_cfg.native_top_k)

    @property
    def num_tiers(self) -> int:
        return len(self.tier_names)

    def num_blocks_feasible(self, p: int) -> list[bool]:
        """Feasibility of each num_blocks option for insertion position p: p < num_blocks <= L."""
        return [p < nb <= self.num_layers for nb in self.num_blocks]

    def tier_mask(self, tier_token_counts: Sequence[int]) -> list[bool]:
        """Mask out tiers that change nothing: a tier giving the same vision-token count as a cheaper
        tier is infeasible (only the cheapest of equal tiers stays sampleable).

        Args:
            tier_token_counts: vision-token count each tier would give for this image.
        """
        if len(tier_token_counts) != self.num_tiers:
            raise KnobError(f"expected {self.num_tiers} tier token counts, got {len(tier_token_counts)}")
        seen: set[int] = set()
        mask = []
        for count in tier_token_counts:
            mask.append(count not in seen)
            seen.add(count)
        return mask

    def choice(self, tier_idx: int, p_idx: int, top_k_idx: int, nb_idx: int) -> KnobChoice:
        """Knob values for option indices; raises KnobError for an infeasible num_blocks."""
        p = self.positions[p_idx]
        nb = self.num_blocks[nb_idx]
        if not self.num_blocks_feasible(p)[nb_idx]:
            raise KnobError(f"num_blocks={nb} is infeasible for p={p}")
        return KnobChoice(tier=self.tier_names[tier_idx], max_crops=self.tier_max_crops[tier_idx], p=p,
                          top_k=self.top_ks[top_k_idx], num_blocks=nb)

    def index_of(self, choice: KnobChoice) -> tuple[int, int, int, int]:
        """Option indices of a KnobChoice (inverse of `choice`)."""
        try:
            return (self.tier_names.index(choice.tier), self.positions.index(choice.p),
                    self.top_ks.index(choice.top_k), self.num_blocks.index(choice.num_blocks))
        except ValueError as exc:
            raise KnobError(f"{choice} is not in this knob space: {exc}") from exc

    def static_choices(self, p: int) -> list[KnobChoice]:
        """Every (tier, top_k, num_blocks) combination at a fixed p (static baselines use p = 1)."""
        feasible = self.num_blocks_feasible(p)
        return [KnobChoice(t, c, p, k, nb) for t, c in zip(self.tier_names, self.tier_max_crops)
                for k in self.top_ks for nb, ok in zip(self.num_blocks, feasible) if ok]

    def full_compute(self) -> KnobChoice:
        """The most expensive setting at the smallest p: largest tier, top_k and num_blocks."""
        return KnobChoice(self.tier_names[-1], self.tier_max_crops[-1], self.positions[0], self.top_ks[-1],
                          self.num_blocks[-1])

    def to_dict(self) -> dict:
        return {"tier_names": list(self.tier_names), "tier_max_crops": list(self.tier_max_crops),
                "positions": list(self.positions), "top_ks": list(self.top_ks),
                "num_blocks": list(self.num_blocks), "num_layers": self.num_layers,
                "num_experts": self.num_experts, "native_top_k": self.native_top_k}


# ----------------------------------------------------------------------------------------------
# Block selection from importance scores
# ----------------------------------------------------------------------------------------------
def select_blocks(p: int, num_blocks: int, importance: Sequence[float]) -> list[int]:
    """The executed blocks, in execution order.

    Blocks 0..p-1 always run; then the (num_blocks - p) most important of blocks p..L-1, ties broken
    by the lower index. Deterministic.

    Returns:
        Sorted block indices, length num_blocks.
    """
    return list(_select_blocks(int(p), int(num_blocks), tuple(importance)))


@functools.lru_cache(maxsize=1024)
def _select_blocks(p: int, num_blocks: int, importance: tuple) -> tuple[int, ...]:
    """select_blocks, memoised: it runs between the prefix and the rest of the prefill, while the GPU waits."""
    num_layers = len(importance)
    if not 1 <= p < num_blocks <= num_layers:
        raise KnobError(f"need 1 <= p < num_blocks <= {num_layers}, got p={p}, num_blocks={num_blocks}")
    rest = sorted(range(p, num_layers), key=lambda i: (-importance[i], i))[: num_blocks - p]
    return tuple(range(p)) + tuple(sorted(rest))


@dataclass(frozen=True)
class ImportanceScores:
    """Per-block importance (higher = more important), as written by jobs/compute_importance.py."""

    scores: tuple[float, ...]
    model_id: str = ""
    method: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    def sha256(self) -> str:
        """Hash of the scores (recorded in bundles so a mismatched file is refused)."""
        canon = json.dumps([round(float(s), 10) for s in self.scores]).encode()
        return hashlib.sha256(canon).hexdigest()

    @classmethod
    def by_index(cls, num_layers: int) -> "ImportanceScores":
        """Fallback when no file is given: earlier blocks count as more important (drop from the end)."""
        return cls(tuple(float(num_layers - i) for i in range(num_layers)), method="by_index")

    @classmethod
    def load(cls, path: str | Path, num_layers: int) -> "ImportanceScores":
        """Load and validate an importance JSON ({"scores": [...], "model_id": ..., "method": ...})."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise KnobError(f"importance file not found: {p}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise KnobError(f"importance file {p} is not readable JSON: {exc}") from exc
        scores = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) for s in scores):
            raise KnobError(f"importance file {p} must hold a list of numbers under 'scores'")
        if len(scores) != num_layers:
            raise KnobError(f"importance file {p} has {len(scores)} block scores but the model has "
                            f"{num_layers} blocks")
        if not all(math.isfinite(s) for s in scores):
            raise KnobError(f"importance file {p} holds non-finite scores")
        return cls(tuple(float(s) for s in scores), model_id=str(data.get("model_id", "")),
                   method=str(data.get("method", "")))

    def save(self, path: str | Path, **extra) -> None:
        Path(path).write_text(json.dumps({"model_id": self.model_id, "method": self.method,
                                          "scores": list(self.scores), **extra}, indent=2))
