"""Budget calibration files (written by jobs/calibrate_budget.py) and how configs honour them.

A calibration JSON records the measured end-to-end latency of the cheapest and the most expensive
static knob combinations (at p = knobs.static_p) on one hardware + engine + model, under the
training thread count and concurrency, and the budget ranges derived from it:

    {"hardware": ..., "engine": "eager", "model_id": ..., "torch_threads": 1, "concurrency": 2,
     "cheapest": {"knobs": {...}, "p50": ..., "p95": ..., "mean": ...}, "most_expensive": {...},
     "min_ms": ..., "max_ms": ..., "norm_min_ms": ..., "norm_max_ms": ..., "date": ...}

`apply_calibration(cfg)` fills `budget.min_ms/max_ms/norm_min_ms/norm_max_ms` from the file named by
`budget.calibration` (a no-op when it is ''). Budgets in ms only mean something for the setting they
were measured on, so a file whose engine, model id or torch thread count differs from the config's
(or whose concurrency differs from an explicit `system.num_workers`) is refused with CalibrationError.

Pure module: stdlib only (no torch, no Ray).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from shared.config import ConfigError, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
RANGE_KEYS = ("min_ms", "max_ms", "norm_min_ms", "norm_max_ms")
REQUIRED_KEYS = ("hardware", "engine", "model_id", "torch_threads", "concurrency", "cheapest", "most_expensive",
                 *RANGE_KEYS, "date")


class CalibrationError(ConfigError):
    """A calibration file that is missing, corrupt, or measured for another setting."""


def resolve_path(path: str | Path) -> Path:
    """An absolute path as is; a relative one against the working directory, else the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def load_calibration(path: str | Path) -> dict:
    """Read and validate a calibration JSON; raises CalibrationError naming the file and the problem."""
    p = resolve_path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"budget.calibration: file not found: {path} (looked in the working directory and "
                               f"{REPO_ROOT}); write it with `python jobs/calibrate_budget.py --config ... "
                               f"--out {path}`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"budget.calibration: {p} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CalibrationError(f"budget.calibration: {p} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CalibrationError(f"budget.calibration: {p} lacks {missing} (not a file written by "
                               f"jobs/calibrate_budget.py?)")
    for k in RANGE_KEYS:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise CalibrationError(f"budget.calibration: {p}: '{k}' must be a finite number >= 0, got {v!r}")
    if not data["min_ms"] <= data["max_ms"]:
        raise CalibrationError(f"budget.calibration: {p}: min_ms {data['min_ms']} exceeds max_ms {data['max_ms']}")
    if not data["norm_min_ms"] < data["norm_max_ms"]:
        raise CalibrationError(f"budget.calibration: {p}: norm_min_ms must be below norm_max_ms")
    for k in ("torch_threads", "concurrency"):
        if isinstance(data[k], bool) or not isinstance(data[k], int) or data[k] < 1:
            raise CalibrationError(f"budget.calibration: {p}: '{k}' must be a positive integer, got {data[k]!r}")
    return data


def check_matches(data: dict, cfg, src: str = "budget.calibration") -> None:
    """Refuse a calibration measured for another engine, model, thread count or worker count."""
    problems = []
    if data["engine"] != cfg.model.engine:
        problems.append(f"engine {data['engine']!r} != model.engine {cfg.model.engine!r}")
    if data["model_id"] != cfg.model.model_id:
        problems.append(f"model_id {data['model_id']!r} != model.model_id {cfg.model.model_id!r}")
    if data["torch_threads"] != cfg.system.torch_threads:
        problems.append(f"torch_threads {data['torch_threads']} != system.torch_threads {cfg.system.torch_threads}")
    if cfg.system.num_workers and data["concurrency"] != cfg.system.num_workers:
        problems.append(f"concurrency {data['concurrency']} != system.num_workers {cfg.system.num_workers}")
    if problems:
        raise CalibrationError(f"{src}: the calibration was measured for another setting ({'; '.join(problems)}); "
                               f"budgets in ms are specific to engine, model and concurrency: re-run "
                               f"jobs/calibrate_budget.py with this config")


def apply_calibration(cfg: Any) -> Any:
    """Return `cfg` with the budget range and normalisation taken from `cfg.budget.calibration`.

    A no-op (the same object) when `budget.calibration` is ''. Otherwise a new RunConfig (the input is
    not modified) whose `budget.min_ms/max_ms/norm_min_ms/norm_max_ms` come from the file, validated.

    Raises:
        CalibrationError (a ConfigError, hence ValueError): missing or corrupt file, or a file measured
            for another engine / model / thread count / worker count.
    """
    path = cfg.budget.calibration
    if not path:
        return cfg
    data = load_calibration(path)
    check_matches(data, cfg, src=f"budget.calibration={path}")
    budget = dataclasses.replace(cfg.budget, **{k: float(data[k]) for k in RANGE_KEYS})
    out = dataclasses.replace(cfg, budget=budget)
    try:
        return validate(out, f"budget.calibration={path}")
    except ConfigError as exc:
        raise CalibrationError(str(exc)) from exc
