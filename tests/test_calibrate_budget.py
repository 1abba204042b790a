"""jobs/calibrate_budget.py on the tiny random checkpoint, and shared.calibration.apply_calibration."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from jobs import calibrate_budget as cb
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
from shared.backend import Sample
from shared.calibration import CalibrationError, apply_calibration
from shared.config import ConfigError, load_config
from shared.datasets import LOADERS
from shared.knobs import KnobSpace


def _png(seed: int, w=448, h=336) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def fixture_loader(source, split, cfg):
    return [Sample(f"cal-{split}-{i}", "what colour is the small circle", ["red"], metric="exact",
                   image=_png(i), max_new_tokens=4) for i in range(4)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)


def _config(tmp_path, folder, workers=1, calibration=""):
    LOADERS["fixture_calibration"] = fixture_loader
    cfg = tmp_path / f"cfg{workers}.yaml"
    cfg.write_text(f"""
model: {{backend: molmoe, checkpoint: "{folder}", model_id: tiny-test, num_layers: 4, num_experts: 8,
        native_top_k: 2, d_model: 64, device: cpu}}
knobs: {{tier_max_crops: [1, 2, 6], insertion_positions: [1, 2], top_k_options: [1, 2], num_blocks_options: [2, 4]}}
budget: {{calibration: "{calibration}"}}
data: {{sources: [{{name: fixture_calibration}}]}}
system: {{num_workers: {workers}, torch_threads: 1, warmup_rollouts: 1}}
""")
    return cfg


def test_extreme_choices_respect_static_p():
    space = KnobSpace(("low", "high"), (1, 4), (1, 3), (1, 2), (2, 3, 4), 4, 8, 2)
    cheap, dear = cb.extreme_choices(space, 3)
    assert (cheap.tier, cheap.top_k, cheap.num_blocks, cheap.p) == ("low", 1, 4, 3)   # 2, 3 infeasible at p=3
    assert (dear.tier, dear.top_k, dear.num_blocks, dear.p) == ("high", 2, 4, 3)


def test_derive_range_is_wider_for_normalisation_and_refuses_flat_latency():
    r = cb.derive_range({"p50": 100.0}, {"p95": 300.0})
    assert (r["min_ms"], r["max_ms"]) == (100.0, 300.0)
    assert r["norm_min_ms"] < 100.0 and r["norm_max_ms"] > 300.0
    with pytest.raises(ValueError, match="do not change latency"):
        cb.derive_range({"p50": 100.0}, {"p95": 90.0})


def test_calibration_job_and_apply(tmp_path, tiny_folder, capsys):
    out = tmp_path / "calib.json"
    cfg_path = _config(tmp_path, tiny_folder)
    assert cb.main(["--config", str(cfg_path), "--samples", "3", "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    for key in ("hardware", "engine", "model_id", "torch_threads", "concurrency", "cheapest", "most_expensive",
                "min_ms", "max_ms", "norm_min_ms", "norm_max_ms", "date"):
        assert key in data, key
    assert data["concurrency"] == 1 and data["torch_threads"] == 1 and data["engine"] == "eager"
    assert data["cheapest"]["n"] == 3 and data["most_expensive"]["n"] == 3
    assert data["cheapest"]["knobs"]["max_crops"] == 1 and data["most_expensive"]["knobs"]["max_crops"] == 6
    assert data["most_expensive"]["mean_vision_tokens"] > data["cheapest"]["mean_vision_tokens"]
    assert data["min_ms"] == data["cheapest"]["p50"] and data["max_ms"] == data["most_expensive"]["p95"]
    assert data["norm_min_ms"] < data["min_ms"] < data["max_ms"] < data["norm_max_ms"]
    assert "budget range" in capsys.readouterr().out

    cfg = load_config(_config(tmp_path, tiny_folder, calibration=str(out)))
    got = apply_calibration(cfg)
    assert (got.budget.min_ms, got.budget.max_ms) == (data["min_ms"], data["max_ms"])
    assert (got.budget.norm_min_ms, got.budget.norm_max_ms) == (data["norm_min_ms"], data["norm_max_ms"])
    assert cfg.budget.min_ms == 170.0                                   # the input config is not modified
    assert apply_calibration(load_config(_config(tmp_path, tiny_folder))).budget.min_ms == 170.0   # no file

    # another model, engine or thread count is refused
    for override in ("model.model_id=other", "system.torch_threads=2", "system.num_workers=3"):
        with pytest.raises(CalibrationError, match="another setting"):
            apply_calibration(load_config(_config(tmp_path, tiny_folder, calibration=str(out)), [override]))
    bad = dict(data, engine="fast")
    (tmp_path / "fast.json").write_text(json.dumps(bad))
    with pytest.raises(CalibrationError, match="engine 'fast'"):
        apply_calibration(load_config(_config(tmp_path, tiny_folder, calibration=str(tmp_path / "fast.json"))))


@pytest.mark.parametrize("content, match", [(None, "not found"), ("{not json", "not readable JSON"),
                                            ('{"engine": "eager"}', "lacks"),
                                            ("BAD_RANGE", "min_ms .* exceeds max_ms")])
def test_apply_calibration_errors(tmp_path, content, match):
    path = tmp_path / "c.json"
    if content == "BAD_RANGE":
        content = json.dumps({"hardware": "x", "engine": "eager", "model_id": "allenai/MolmoE-1B-0924",
                              "torch_threads": 1, "concurrency": 2, "cheapest": {}, "most_expensive": {},
                              "min_ms": 300.0, "max_ms": 200.0, "norm_min_ms": 100.0, "norm_max_ms": 400.0,
                              "date": "today"})
    if content is not None:
        path.write_text(content)
    cfg = load_config(None, [f"budget.calibration={path}"])
    with pytest.raises(CalibrationError, match=match):
        apply_calibration(cfg)
    assert issubclass(CalibrationError, ConfigError)


def test_concurrent_processes(tmp_path, tiny_folder):
    """Two spawned processes (the training worker count), each timing its share under the same load."""
    out = tmp_path / "calib2.json"
    assert cb.main(["--config", str(_config(tmp_path, tiny_folder, workers=2)), "--samples", "4", "--out",
                    str(out), "--quiet", "--warmup", "1"]) == 0
    data = json.loads(out.read_text())
    assert data["concurrency"] == 2
    assert data["cheapest"]["n"] == 4 and data["most_expensive"]["n"] == 4   # 2 samples per process
