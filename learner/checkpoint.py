"""Checkpoints and the exported controller bundle.

Checkpoint = a folder `checkpoints/step-NNNNNN/` holding `trainer.pt` (controller with its fixed
budget-token map, optimizer, reference policy, step, policy version, RNG states: tensors and plain
Python only, loaded with `torch.load(weights_only=True)`) and `state.json` (dispenser state,
counters). It is written to a temporary folder and renamed, then `checkpoints/latest` is replaced
atomically, so a crash mid-write leaves the previous checkpoint loadable and no torn files.

Bundle = `controller.safetensors` + `bundle.json` (metadata: model id, engine, device, calibration,
knob spaces, importance-score hash, budget normalisation, controller sizes). Evaluation, inference and
resume refuse a bundle whose metadata does not match their setting.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

BUNDLE_KEYS = ("model_id", "engine", "device", "knob_space", "importance_sha256", "budget_norm", "calibration",
               "d_model", "controller")
"""Metadata keys that must match between a bundle and the setting that loads it."""


class CheckpointError(ValueError):
    """A checkpoint or bundle that cannot be used here; the message says why."""


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never publishes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _numpy_rng_to_tensors(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_rng_from_tensors(d: dict) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def save_checkpoint(run_dir: str | Path, step: int, trainer_state: dict, state_json: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` (and `best`)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = dict(trainer_state)
    rng = dict(state.get("rng", {}))
    if "numpy" in rng:
        rng["numpy"] = _numpy_rng_to_tensors(rng["numpy"])
    state["rng"] = rng
    torch.save(state, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state_json, indent=1))
    for f in (tmp / "trainer.pt", tmp / "state.json", tmp):
        _fsync(f)                   # a node crash after the rename must not find empty files
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    _atomic_write_text(ckpt_root / "latest", name)
    olds = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in olds[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.exists():
        return None
    path = ptr.parent / ptr.read_text().strip()
    if not (path / "trainer.pt").exists():
        raise CheckpointError(f"{ptr} points at {path}, which holds no trainer.pt")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Load (trainer_state, state_json) safely: weights_only unpickling, nothing else executed."""
    path = Path(path)
    try:
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no trainer.pt in checkpoint folder {path}") from None
    except Exception as exc:  # noqa: BLE001 - surfaced with the file name
        raise CheckpointError(f"checkpoint {path / 'trainer.pt'} cannot be loaded safely: {exc}") from exc
    if "numpy" in state.get("rng", {}):
        state["rng"]["numpy"] = _numpy_rng_from_tensors(state["rng"]["numpy"])
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable state.json: {exc}") from exc
    return state, meta


def save_controller_copy(path: str | Path, controller_state: dict) -> None:
    """The controller alone (e.g. the best-by-validation copy), as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in controller_state.items()}, str(tmp))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Bundles
# ----------------------------------------------------------------------------------------------
def export_bundle(folder: str | Path, controller_state: dict, meta: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [k for k in BUNDLE_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"bundle metadata lacks {missing}")
    save_controller_copy(folder / "controller.safetensors", controller_state)
    _atomic_write_text(folder / "bundle.json", json.dumps(meta, indent=1, sort_keys=True))
    return folder


def check_bundle_meta(meta: dict, expected: dict) -> None:
    """Raise CheckpointError naming every metadata key whose value differs from the expected setting."""
    diffs = [f"{k}: bundle has {meta.get(k)!r}, this setting has {expected[k]!r}"
             for k in BUNDLE_KEYS if k in expected and meta.get(k) != expected[k]]
    if diffs:
        raise CheckpointError("controller bundle does not match this setting (budgets in ms are engine- and "
                              "GPU-specific):\n  " + "\n  ".join(diffs))


def load_bundle(folder: str | Path, expected: Optional[dict] = None) -> tuple[dict, dict]:
    """Load (controller state dict, metadata); with `expected`, refuse a mismatching bundle."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "bundle.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a controller bundle (no bundle.json)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / 'bundle.json'} is not valid JSON: {exc}") from exc
    if expected is not None:
        check_bundle_meta(meta, expected)
    try:
        state = load_file(str(folder / "controller.safetensors"))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{folder / 'controller.safetensors'} cannot be read: {exc}") from exc
    return state, meta
