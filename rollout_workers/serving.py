"""Serving API: answer single requests with a trained controller bundle (how a user deploys it).

    from rollout_workers.serving import BudgetedModel
    model = BudgetedModel.from_bundle("runs/default/bundle")          # config: the run's config.yaml
    out = model.answer(open("cat.jpg", "rb").read(), "what colour is the cat?", budget_ms=250)
    out["answer"], out["knobs"], out["segments_ms"], out["latency_ms"]

`from_bundle` builds the configured backend (the frozen model, or the synthetic tables), checks the
bundle's metadata against the metadata this config and this machine would give a bundle (model, engine,
device, calibration, knob spaces, importance hash, budget normalisation, controller sizes; the same
check as evaluation and resume) and refuses a mismatch with `CheckpointError`. Each `answer` runs the
controller greedily: Stage1 picks tier and p before the vision encoder, Stage2 picks top_k and
num_blocks on the latency token (DESIGN.md sections 2-3).

Bad requests raise `RequestError` (a ValueError) with a clear message: empty question, budget not a
positive finite number of ms, empty or undecodable image.

The synthetic backend has no model: it ignores the image (None is fine) and maps the question to one of
its question types (a type name in the question, e.g. "counting", else a stable hash), then draws the
answer and latency from its tables. It exists so the serving path can be exercised without a model.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from shared.backend import RolloutBackend, Sample, SampleError
from shared.controller import TwoStageController, check_budget_ms


class RequestError(ValueError):
    """A request that cannot be served (empty question, bad budget, bad image); the message says why."""


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle folder, or a run folder holding bundle/."""
    from learner.checkpoint import CheckpointError
    p = Path(path)
    if (p / "bundle.json").is_file():
        return p
    if (p / "bundle" / "bundle.json").is_file():
        return p / "bundle"
    if not p.exists():
        raise CheckpointError(f"bundle folder {p} does not exist")
    raise CheckpointError(f"{p} is not a controller bundle (no bundle.json) nor a run folder with bundle/")


def load_serving_config(bundle_dir: Path, config: Any = None, overrides: Sequence[str] = ()):
    """`config` as a RunConfig, a YAML path, or None (the run's config.yaml next to the bundle), with its
    `budget.calibration` applied (shared.calibration.apply_calibration; a no-op without one)."""
    from shared.calibration import apply_calibration
    from shared.config import RunConfig, load_config
    if isinstance(config, RunConfig):
        return apply_calibration(config)
    path = Path(config) if config else bundle_dir.parent / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config: {path} does not exist (pass the run's config.yaml)")
    return apply_calibration(load_config(path, overrides))


class BudgetedModel:
    """The frozen model (or the synthetic stand-in) with a trained controller, one request at a time."""

    def __init__(self, backend: RolloutBackend, controller: TwoStageController, cfg, meta: dict):
        self.backend = backend
        self.controller = controller
        self.cfg = cfg
        self.meta = meta
        self.space = backend.space
        self.info = backend.info()
        self._synthetic = self.info.backend == "synthetic"

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, config: Any = None, *, overrides: Sequence[str] = (),
                    backend: Optional[RolloutBackend] = None, warmup: bool = True) -> "BudgetedModel":
        """Load a bundle (or a run folder's bundle/) for serving.

        Args:
            config: RunConfig, YAML path or None (the run's config.yaml beside the bundle).
            overrides: `key.sub=value` config overrides (with a path or None).
            backend: an already built backend (default: `make_backend(cfg)`).
        Raises:
            CheckpointError: not a bundle, unreadable, or its metadata does not match this setting.
        """
        from jobs.train import bundle_metadata
        from learner.checkpoint import check_bundle_meta, load_bundle
        from rollout_workers.backends import make_backend
        folder = resolve_bundle_dir(bundle_dir)
        cfg = load_serving_config(folder, config, overrides)
        state, meta = load_bundle(folder)
        torch.set_num_threads(cfg.system.torch_threads)
        backend = backend if backend is not None else make_backend(cfg, 0)
        info = backend.info()
        check_bundle_meta(meta, bundle_metadata(cfg, dict(vars(info)), meta.get("policy_version", 0)))
        controller = TwoStageController.from_config(cfg, backend.space, token_rms=info.token_rms).eval()
        controller.set_weights({k: v.detach().cpu().numpy() for k, v in state.items()})
        if warmup:
            backend.warmup(cfg.system.warmup_rollouts, controller)
        return cls(backend, controller, cfg, meta)

    # ------------------------------------------------------------------------------------------
    def trained_budget_range_ms(self) -> Optional[tuple[float, float]]:
        r = self.meta.get("budget_range_ms")
        return (float(r[0]), float(r[1])) if r else None

    def _sample(self, image: Optional[bytes], question: str, max_new_tokens: Optional[int]) -> Sample:
        n = int(max_new_tokens or self.cfg.model.max_new_tokens)
        if not self._synthetic:
            return Sample(sample_id="request", question=question, answers=[], image=image, max_new_tokens=n)
        tables = self.backend.tables
        low = question.lower()
        named = [i for i, t in enumerate(tables.qtypes) if t in low]
        h = zlib.crc32(question.encode())
        q = named[0] if named else h % tables.num_question_types
        return Sample(sample_id="request", question=question, answers=[], metric="exact",
                      question_type=tables.qtypes[q], image=None, max_new_tokens=int(tables.answer_tokens[q]),
                      meta={"q": q, "small_image": False, "jitter_seed": h})

    def answer(self, image_bytes: Optional[bytes], question: str, budget_ms: float, *,
               max_new_tokens: Optional[int] = None) -> dict:
        """Serve one request with the controller (greedy).

        Args:
            image_bytes: the encoded image (PNG/JPEG/...), or None for a text-only request (and for the
                synthetic backend, which ignores images).
            question: the question text (non-empty).
            budget_ms: the latency budget in milliseconds (finite, > 0).
        Returns:
            dict: answer, knobs {tier, max_crops, p, top_k, num_blocks}, segments_ms {segment: ms},
            latency_ms, budget_ms, within_budget, num_crops, vision_tokens, answer_tokens.
        Raises:
            RequestError: empty question, bad budget, empty or undecodable image.
        """
        if not isinstance(question, str) or not question.strip():
            raise RequestError("the question is empty")
        try:
            budget = check_budget_ms(budget_ms)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if image_bytes is not None:
            if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
                raise RequestError(f"image must be encoded bytes, got {type(image_bytes).__name__}")
            image_bytes = bytes(image_bytes)
            if not image_bytes:
                raise RequestError("the image is empty (0 bytes)")
        sample = self._sample(None if self._synthetic else image_bytes, question, max_new_tokens)
        try:
            out = self.backend.run(sample, budget, self.controller, greedy=True)
        except SampleError as exc:
            raise RequestError(str(exc)) from exc
        k = out.knobs
        return {"answer": out.answer,
                "knobs": {"tier": k.tier, "max_crops": k.max_crops, "p": k.p, "top_k": k.top_k,
                          "num_blocks": k.num_blocks},
                "segments_ms": {name: float(v) for name, v in out.segments_ms.items()},
                "latency_ms": float(out.latency_ms), "budget_ms": budget,
                "within_budget": bool(out.latency_ms <= budget), "num_crops": int(out.num_crops),
                "vision_tokens": int(out.vision_tokens), "answer_tokens": int(out.answer_tokens),
                "backend": self.info.backend}

