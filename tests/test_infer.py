"""jobs/infer.py and rollout_workers/serving.BudgetedModel end to end: the tiny random MolmoE (real request
path, image) and the synthetic backend (no image); clear errors for bad requests and mismatched bundles."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import infer
from jobs.train import bundle_metadata
from learner.checkpoint import CheckpointError, export_bundle
from rollout_workers.backends import make_backend
from rollout_workers.request_path import SEGMENT_ORDER
from rollout_workers.serving import BudgetedModel, RequestError
from shared.config import dump_config, load_config
from shared.controller import TwoStageController

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "jobs" / "configs" / "ci_synthetic.yaml"

TINY_MOLMOE = """\
model:
  backend: molmoe
  random_weights: tiny
  num_layers: 4
  num_experts: 8
  native_top_k: 2
  d_model: 64
  max_new_tokens: 3
knobs:
  tier_max_crops: [1, 2, 4]
  insertion_positions: [1, 2, 3]
  top_k_options: [1, 2]
  num_blocks_options: [2, 3, 4]
budget:
  min_ms: 20
  max_ms: 200
  norm_min_ms: 10
  norm_max_ms: 250
system:
  warmup_rollouts: 1
"""


def make_bundle_run(folder: Path, cfg, backend=None) -> Path:
    """A run-like folder: config.yaml + bundle/ holding an (untrained) controller for this setting."""
    folder.mkdir(parents=True, exist_ok=True)
    backend = backend or make_backend(cfg)
    info = backend.info()
    ctl = TwoStageController.from_config(cfg, backend.space, token_rms=info.token_rms)
    export_bundle(folder / "bundle", dict(ctl.state_dict()), bundle_metadata(cfg, vars(info), 0))
    dump_config(cfg, folder / "config.yaml")
    return folder


def png_bytes(w=160, h=120, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def molmoe(tmp_path_factory):
    d = tmp_path_factory.mktemp("molmoe_run")
    (d / "src.yaml").write_text(TINY_MOLMOE)
    cfg = load_config(d / "src.yaml")
    backend = make_backend(cfg)
    make_bundle_run(d, cfg, backend)
    model = BudgetedModel.from_bundle(d / "bundle", backend=backend)
    return d, model


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn_run")
    return make_bundle_run(d, load_config(CI_CONFIG, [f"system.run_dir={d}"]))


def test_molmoe_answer_with_image(molmoe):
    d, model = molmoe
    out = model.answer(png_bytes(), "what colour is the circle", 150.0)
    assert set(out) >= {"answer", "knobs", "segments_ms", "latency_ms", "budget_ms", "within_budget",
                        "num_crops", "vision_tokens"}
    k = out["knobs"]
    space = model.space
    assert k["tier"] in space.tier_names and k["p"] in space.positions and k["top_k"] in space.top_ks
    assert k["num_blocks"] in space.num_blocks
    assert k["max_crops"] == space.tier_max_crops[space.tier_names.index(k["tier"])]
    assert list(out["segments_ms"]) == list(SEGMENT_ORDER)
    assert all(v >= 0 for v in out["segments_ms"].values())
    assert out["latency_ms"] == pytest.approx(sum(out["segments_ms"].values()), rel=0.05, abs=0.5)
    assert out["within_budget"] == (out["latency_ms"] <= 150.0)
    assert out["vision_tokens"] > 0 and out["num_crops"] >= 1 and isinstance(out["answer"], str)
    # Greedy: the same request gives the same knobs and answer.
    again = model.answer(png_bytes(), "what colour is the circle", 150.0)
    assert again["knobs"] == k and again["answer"] == out["answer"]
    # Text-only request (no image): no vision tokens.
    assert model.answer(None, "what colour is the circle", 150.0)["vision_tokens"] == 0


@pytest.mark.parametrize("image,question,budget,match", [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "q", 100.0, "bad image"),
    (png_bytes()[:120], "what", 100.0, "bad image"),
    (b"", "what", 100.0, "empty"),
    ("not bytes", "what", 100.0, "encoded bytes"),
    (None, "   ", 100.0, "question is empty"),
    (None, "what", 0.0, "budget_ms"),
    (None, "what", -5, "budget_ms"),
    (None, "what", float("nan"), "budget_ms"),
    (None, "what", float("inf"), "budget_ms"),
    (None, "what", "fast", "budget_ms"),
])
def test_bad_requests_are_clear_errors(molmoe, image, question, budget, match):
    _, model = molmoe
    with pytest.raises(RequestError, match=match):
        model.answer(image, question, budget)


def test_mismatched_bundle_refused(molmoe):
    d, model = molmoe
    with pytest.raises(CheckpointError, match="budget_norm"):
        BudgetedModel.from_bundle(d, overrides=["budget.norm_max_ms=300"], backend=model.backend)
    with pytest.raises(CheckpointError, match="not a controller bundle"):
        BudgetedModel.from_bundle(d / "src.yaml", backend=model.backend)


def test_cli_molmoe(molmoe, tmp_path, capsys):
    d, _ = molmoe
    img = tmp_path / "img.png"
    img.write_bytes(png_bytes(seed=1))
    assert infer.main([str(d / "bundle"), "--image", str(img), "--question", "what shape",
                       "--budget-ms", "120", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "molmoe" and out["vision_tokens"] > 0
    assert list(out["segments_ms"]) == list(SEGMENT_ORDER)
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes()[:100])
    assert infer.main([str(d), "--image", str(bad), "--question", "what shape", "--budget-ms", "120"]) == 2
    assert "bad image" in capsys.readouterr().err


def test_cli_synthetic_without_image(synthetic, capsys):
    assert infer.main([str(synthetic), "--question", "counting: how many cubes", "--budget-ms", "250"]) == 0
    text = capsys.readouterr().out
    for line in ("answer:", "knobs: tier=", "latency:", "segments (ms): preprocess"):
        assert line in text
    assert infer.main([str(synthetic / "bundle"), "--question", "x", "--budget-ms", "250", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "synthetic" and out["answer"] in ("yes", "no")


@pytest.mark.parametrize("args,match", [
    (["--question", "", "--budget-ms", "100"], "question is empty"),
    (["--question", "q", "--budget-ms", "abc"], "number of milliseconds"),
    (["--question", "q", "--budget-ms", "-1"], "finite positive"),
    (["--question", "q", "--budget-ms", "100", "--image", "/no/such/image.png"], "image file not found"),
    (["--question", "q", "--budget-ms", "100", "budget.norm_max_ms=500"], "does not match"),
])
def test_cli_errors(synthetic, capsys, args, match):
    assert infer.main([str(synthetic), *args]) == 2
    assert match in capsys.readouterr().err


def test_cli_not_a_bundle(tmp_path, capsys):
    assert infer.main([str(tmp_path), "--question", "q", "--budget-ms", "100"]) == 2
    assert "not a controller bundle" in capsys.readouterr().err
