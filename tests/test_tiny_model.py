"""The shipped tiny shapes MolmoE (assets/tiny_molmoe) and pieces of jobs/build_tiny_model.py."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "tiny_molmoe"
sys.path.insert(0, str(ROOT / "jobs"))


@pytest.mark.skipif(not ASSET.is_dir(), reason="assets/tiny_molmoe not built")
def test_shipped_model_loads_and_serves():
    from rollout_workers.molmoe import load_molmoe
    from rollout_workers.request_path import RequestEngine
    from shared import shapes
    from shared.knobs import ImportanceScores, KnobSpace

    size = sum(f.stat().st_size for f in ASSET.iterdir())
    assert size <= 5 * 2**20
    m = load_molmoe(ASSET)                       # bf16 on disk, float32 in memory
    k = json.loads((ASSET / "knobs.json").read_text())
    space = KnobSpace(tuple(k["tier_names"]), tuple(k["tier_max_crops"]), tuple(k["insertion_positions"]),
                      tuple(k["top_k_options"]), tuple(k["num_blocks_options"]), k["num_layers"],
                      k["num_experts"], k["native_top_k"])
    eng = RequestEngine(m.model, m.preprocessor, space, ImportanceScores.by_index(space.num_layers))
    it = shapes.make_item(0, "test")
    r = eng.serve(it.image, it.question, 1000.0, fixed=space.full_compute(), max_new_tokens=4)
    assert isinstance(r.answer, str) and r.num_crops == 10


def test_device_crops_match_preprocessor():
    from build_tiny_model import Layouts, build_shapes_tokenizer, tiny_shapes_config
    from rollout_workers.molmoe import MolmoPreprocessor
    from shared import shapes

    cfg = tiny_shapes_config()
    pre = MolmoPreprocessor(cfg, build_shapes_tokenizer())
    lay = Layouts(pre, "cpu")
    img, q, _, _ = shapes.render_item(3, "validation", 0)
    for mc in (1, 4, 9):
        ref = pre.preprocess(q, img, max_crops=mc).images
        got = lay.crops(torch.from_numpy(img[None]), mc)[0]
        assert got.shape == ref.shape and float((ref - got).abs().max()) < 1e-4


@pytest.mark.skipif(not ASSET.is_dir(), reason="assets/tiny_molmoe not built")
def test_shapes_tokenizer_is_rebuilt_identically():
    from build_tiny_model import build_shapes_tokenizer
    from rollout_workers.molmoe import MolmoTokenizer

    built = build_shapes_tokenizer()
    shipped = MolmoTokenizer.from_folder(ASSET)
    for text in [" User: Which corner has the small cross? Assistant:", " purple", " top left", " 3"]:
        assert built.encode(text) == shipped.encode(text)
    assert len(built.encode(" purple")) == 1
    assert np.array_equal(built.token_ids()["image_start_token_id"], 448)
