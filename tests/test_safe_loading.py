"""Safe loading: nothing from a run folder, a model folder or a data set is unpickled.

- A static scan of every module we ship: no `pickle`/`dill`/`joblib`/`shelve`/`marshal` loads, every
  `torch.load` passes `weights_only=True`, no `np.load(allow_pickle=True)`, no `yaml.load` other than
  `safe_load`, no `eval`/`exec`.
- Malicious files (a pickle whose `__reduce__` would create a marker file) placed where our loaders
  look: a checkpoint's `trainer.pt` (a raw pickle, and a real `torch.save` zip holding such an
  object), a bundle's and `best/`'s `controller.safetensors`, a model folder's `pytorch_model.bin`.
  Each is refused with `CheckpointError` and the marker is never created.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner.checkpoint import (CheckpointError, export_bundle, latest_checkpoint, load_bundle, load_checkpoint,
                                save_checkpoint)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("jobs", "learner", "rollout_workers", "shared", "bench")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


class Boom:
    """Unpickling this runs `os.system("touch MARKER")` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _shipped_sources():
    for top in SHIPPED:
        yield from sorted((REPO / top).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def unsafe_loading_sites() -> list[str]:
    """file:line: what, for every deserialisation that could run code."""
    problems = []
    for path in _shipped_sources():
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(), filename=str(rel))
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in UNSAFE_MODULES:
                        problems.append(f"{where}: import {a.name}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                name = _call_name(node)
                last = name.rsplit(".", 1)[-1]
                if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                    problems.append(f"{where}: {name}()")
                elif name == "torch.load" or name.endswith(".torch.load"):
                    wo = _kw(node, "weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                elif name in ("np.load", "numpy.load"):
                    ap = _kw(node, "allow_pickle")
                    if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                        problems.append(f"{where}: np.load(allow_pickle=...)")
                elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                    problems.append(f"{where}: {name} (use yaml.safe_load)")
                elif last in ("read_pickle", "from_pickle") or name.endswith("cloudpickle.loads"):
                    problems.append(f"{where}: {name}")
    return problems


def test_no_unsafe_deserialisation_in_shipped_code():
    assert unsafe_loading_sites() == []
    # The scan has teeth: it finds each unsafe pattern in a probe file.
    probe = REPO / "shared" / "_probe_unsafe_loading.py"
    assert not probe.exists()
    try:
        probe.write_text("import pickle\nimport numpy as np\nimport torch, yaml\n"
                         "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
                         "yaml.load('x')\neval('1')\n")
        found = [p.split(": ", 1)[1] for p in unsafe_loading_sites() if "_probe_unsafe_loading" in p]
    finally:
        probe.unlink()
    assert found == ["import pickle", "torch.load without weights_only=True",
                     "torch.load without weights_only=True", "np.load(allow_pickle=...)",
                     "yaml.load (use yaml.safe_load)", "eval()"], found


def test_every_torch_load_is_weights_only_by_text():
    """Belt and braces for the AST scan: the literal text of every torch.load call."""
    hits = []
    for path in _shipped_sources():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"', "`")) and "`" not in line:
                hits.append((path.relative_to(REPO), i, "weights_only=True" in line))
    assert hits and all(ok for *_, ok in hits), hits


# ----------------------------------------------------------------------------------------------
# Malicious files
# ----------------------------------------------------------------------------------------------
def _good_checkpoint(run_dir: Path) -> Path:
    state = {"controller": {"w": torch.ones(3)}, "optimizer": {}, "reference": None, "step": 1,
             "policy_version": 1, "rng": {"torch": torch.get_rng_state()}}
    return save_checkpoint(run_dir, 1, state, {"dispenser": {}, "counters": {}})


@pytest.mark.parametrize("how", ["raw-pickle", "torch-save-zip"])
def test_malicious_trainer_pt_is_refused(tmp_path, how):
    marker = tmp_path / "PWNED"
    ckpt = _good_checkpoint(tmp_path / "run")
    assert load_checkpoint(ckpt)[0]["step"] == 1
    payload = {"controller": Boom(marker), "step": 1}
    if how == "raw-pickle":
        (ckpt / "trainer.pt").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, ckpt / "trainer.pt")        # a genuine torch zip whose data.pkl holds the payload
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as err:
        load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert "trainer.pt" in str(err.value)
    assert not marker.exists(), "unpickling ran attacker code"
    # Control: an unrestricted load of the same file WOULD run it (so the test above has teeth).
    # Done in a subprocess so this test process never executes the payload itself.
    code = f"import torch, pickle; f={str(ckpt / 'trainer.pt')!r}\n" \
           "try:\n    torch.load(f, weights_only=False)\nexcept Exception:\n    pickle.load(open(f, 'rb'))\n"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    assert marker.exists()


def test_resume_from_a_malicious_checkpoint_is_refused(tmp_path):
    """The Learner's --resume path goes through load_checkpoint: same refusal, nothing run."""
    from learner.learner import Learner
    from rollout_workers.worker import RolloutWorker
    from shared.config import load_config
    marker = tmp_path / "PWNED"
    cfg = load_config(REPO / "jobs" / "configs" / "ci_synthetic.yaml", [f"system.run_dir={tmp_path}"])
    ckpt = _good_checkpoint(tmp_path)
    (ckpt / "trainer.pt").write_bytes(pickle.dumps({"step": Boom(marker)}))
    w = RolloutWorker(cfg, 0)
    train, val = w.sample_ids()
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        Learner(cfg, str(tmp_path), train, val, w.info(), resume=True)
    assert not marker.exists()


def test_malicious_bundle_and_best_weights_are_refused(tmp_path):
    from jobs.evaluate import resolve_target
    marker = tmp_path / "PWNED"
    meta = {k: "x" for k in ("model_id", "engine", "device", "knob_space", "importance_sha256", "budget_norm",
                             "calibration", "d_model", "controller")}
    run = tmp_path / "run"
    ckpt = _good_checkpoint(run)
    sj = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(sj))
    export_bundle(run / "bundle", {"w": torch.ones(2)}, meta)
    assert load_bundle(run / "bundle")[0]["w"].shape == (2,)
    evil = pickle.dumps({"w": Boom(marker)})
    (run / "bundle" / "controller.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_bundle(run / "bundle")
    torch.save({"w": Boom(marker)}, run / "bundle" / "controller.safetensors")     # torch zip under the name
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_bundle(run / "bundle")
    # best/controller.safetensors as read by jobs/evaluate.py --weights best
    export_bundle(run / "bundle", {"w": torch.ones(2)}, meta)
    (run / "best").mkdir()
    (run / "best" / "controller.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match="cannot be read"):
        resolve_target(run, weights="best")
    assert not marker.exists()


def test_pickled_model_weights_are_never_loaded(tmp_path):
    """A model folder that holds only a (malicious) pytorch_model.bin is refused before any read
    (tests/test_molmoe_loader.py::test_pickled_bin_checkpoint_is_refused covers the message)."""
    from rollout_workers.molmoe.loader import CheckpointError as ModelCheckpointError
    from rollout_workers.molmoe.loader import load_molmoe
    from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
    marker = tmp_path / "PWNED"
    folder = make_tiny_checkpoint(tmp_path / "m", seed=0)
    for p in list(folder.glob("model*.safetensors*")):
        p.unlink()
    torch.save({"w": Boom(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelCheckpointError, match="pickled PyTorch weights are not loaded"):
        load_molmoe(folder)
    # A pickle renamed to model.safetensors is not a safetensors file: refused too.
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    with pytest.raises(ModelCheckpointError, match="not a readable safetensors file"):
        load_molmoe(folder)
    assert not marker.exists()
