"""jobs/compute_importance.py on the tiny random checkpoint with a tiny fixture data set."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import compute_importance as ci
from rollout_workers.molmoe.loader import load_molmoe
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
from shared.backend import Sample
from shared.datasets import LOADERS
from shared.knobs import ImportanceScores, select_blocks

QUESTIONS = [("what colour is the circle", ["red"]), ("how many squares", ["two", "two", "three"]),
             ("what shape is it", ["triangle"])]


def _png(seed: int, w=96, h=64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def fixture_loader(source, split, cfg):
    out = [Sample(f"fix-{split}-{i}", q, a, metric="vqa", image=_png(i), max_new_tokens=3)
           for i, (q, a) in enumerate(QUESTIONS)]
    out.append(Sample(f"fix-{split}-bad", "what is this", ["x"], image=b"\x89PNG not an image", max_new_tokens=3))
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


def _config(tmp_path, folder, importance=""):
    LOADERS["fixture_importance"] = fixture_loader
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
model: {{backend: molmoe, checkpoint: "{folder}", model_id: tiny-test, num_layers: 4, num_experts: 8,
        native_top_k: 2, d_model: 64, device: cpu, importance_scores: "{importance}"}}
knobs: {{tier_max_crops: [1, 2, 4], insertion_positions: [1, 2], top_k_options: [1, 2], num_blocks_options: [3, 4]}}
data: {{sources: [{{name: fixture_importance, split: calibration}}]}}
""")
    return cfg


def test_job_writes_loadable_scores(tmp_path, tiny_folder, capsys):
    out = tmp_path / "imp" / "importance.json"
    rc = ci.main(["--config", str(_config(tmp_path, tiny_folder)), "--split", "calibration", "--out", str(out),
                  "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["num_layers"] == 4 and len(data["scores"]) == 4 and len(data["blocks"]) == 4
    assert data["model_id"] == "tiny-test" and data["split"] == "calibration"
    assert data["num_samples"] == 3 and data["skipped"] == 1          # the corrupt image is skipped, counted
    assert data["blocks"][0]["always_kept"] and not data["blocks"][1]["always_kept"]
    # removing a block changes the answer loss
    assert all(abs(b["loss_increase"]) > 1e-6 for b in data["blocks"])
    assert all(0.0 <= b["accuracy"] <= 1.0 for b in data["blocks"])
    imp = ImportanceScores.load(out, 4)
    assert imp.model_id == "tiny-test" and imp.method.startswith("ablation")
    assert select_blocks(1, 3, imp.scores)[0] == 0
    assert sorted(data["removal_order"]) == [1, 2, 3]
    assert "removal order" in capsys.readouterr().out


def test_default_output_is_the_configured_importance_file(tmp_path, tiny_folder):
    target = tmp_path / "scores.json"
    assert ci.main(["--config", str(_config(tmp_path, tiny_folder, str(target))), "--split", "calibration",
                    "--max-samples", "1", "--quiet"]) == 0
    assert json.loads(target.read_text())["num_samples"] == 1


def test_cached_teacher_forcing_equals_full_forward(tiny_folder):
    """The loss through the KV cache equals a plain forward over prompt + answer, for a skipped block set."""
    m = load_molmoe(tiny_folder)
    ab = ci.Ablator(m.model, m.preprocessor, max_crops=2)
    sample = Sample("s", "what colour is the circle", ["red"], image=_png(5), max_new_tokens=4)
    x, answer_ids = ab.prepare(sample)
    ids = [0, 2, 3]
    nll, text = ab.run(x, answer_ids, ids, 4)
    inp = m.preprocessor.preprocess(sample.question, m.preprocessor.load_image(sample.image), max_crops=2)
    full_ids = torch.cat([inp.input_ids, torch.tensor(answer_ids[:-1])])
    with torch.no_grad():
        logits = m.model(full_ids, inp.images, inp.image_masks, inp.image_input_idx, block_ids=ids)[0]
    T = inp.num_tokens
    ref = torch.nn.functional.cross_entropy(logits[T - 1:].float(), torch.tensor(answer_ids))
    assert abs(nll - float(ref)) < 1e-4
    greedy = m.model.greedy_generate(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx,
                                     max_new_tokens=4, block_ids=ids)
    assert text == m.preprocessor.tokenizer.decode([i for i in greedy if i != m.model.config.eos_token_id])


def test_combine_breaks_loss_ties_by_accuracy():
    scores = ci.combine(1.0, 0.8, [1.5, 1.2, 1.2, 1.200002], [0.8, 0.5, 0.7, 0.8])
    order = sorted(range(4), key=lambda i: -scores[i])
    assert order == [0, 3, 1, 2]      # distinct loss increases first; the tie (1.2) by the accuracy drop
