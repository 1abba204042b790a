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


def test_shapes_tokenizer_answers_are_single_tokens():
    from build_tiny_model import build_shapes_tokenizer
    from shared import shapes

    tok = build_shapes_tokenizer()
    answers = {a for i in range(60) for a in shapes.make_item(i, "validation").answers}
    for a in sorted(answers):
        assert len(tok.encode(" " + a)) == 1, a


@pytest.mark.skipif(not ASSET.is_dir(), reason="assets/tiny_molmoe not built")
def test_shapes_tokenizer_is_rebuilt_identically():
    from build_tiny_model import build_shapes_tokenizer
    from rollout_workers.molmoe import MolmoTokenizer

    from shared import shapes

    info = json.loads((ASSET / "build_info.json").read_text()) if (ASSET / "build_info.json").is_file() else {}
    shipped_families = tuple(info.get("families", ("large_color", "large_exists", "large_count_color",
                                                    "small_color", "small_count", "small_corner")))
    if shipped_families != shapes.FAMILIES:
        # the merges are learned on the current question families, so a model built on other families
        # has another tokenizer; it stays self-consistent (it ships its own tokenizer.json)
        pytest.skip(f"assets/tiny_molmoe was built on families {shipped_families}, not the current "
                    f"{shapes.FAMILIES}: rebuild it with jobs/build_tiny_model.py")
    built = build_shapes_tokenizer()
    shipped = MolmoTokenizer.from_folder(ASSET)
    for text in [" User: " + shapes.make_item(i, "test").question + " Assistant:" for i in range(6)] + \
            [" purple", " yes", " 3"]:
        assert built.encode(text) == shipped.encode(text)
    assert len(built.encode(" purple")) == 1
    assert np.array_equal(built.token_ids()["image_start_token_id"], 448)


def test_draw_knobs_block_weights():
    """--block-weights skews the num_blocks draw; without it the draw is uniform over the feasible options."""
    import random

    from build_tiny_model import KNOBS, draw_knobs

    def counts(weights):
        rng, c = random.Random(0), {}
        for _ in range(3000):
            _, blocks, _ = draw_knobs(rng, 8, 4, 0.0, None, weights)
            c[len(blocks)] = c.get(len(blocks), 0) + 1
        return c

    uniform = counts(None)
    assert set(uniform) == set(KNOBS["num_blocks_options"])
    deep = counts({2: 1, 3: 1, 4: 1, 6: 2, 8: 4})
    assert deep[8] > 1.5 * uniform[8] and deep[2] < uniform[2]
    assert counts({2: 0, 3: 0, 4: 1, 6: 0, 8: 0}) == {4: 3000}


def test_build_smoke_with_depth_curriculum(tmp_path):
    """A few CPU steps of the build with the per-family depth curriculum write a loadable model."""
    import build_tiny_model
    from rollout_workers.molmoe import load_molmoe

    out = tmp_path / "m"
    threads = torch.get_num_threads()
    try:
        rc = build_tiny_model.main(["--device", "cpu", "--threads", "1", "--workers", "0", "--out", str(out),
                                    "--steps", "2", "--batch", "4", "--eval-samples", "6", "--eval-every", "0",
                                    "--final-eval", "short", "--block-weights", "1,1,1,2,4",
                                    "--depth-families", "more_color,right_color",
                                    "--depth-weights", "0,0.05,0.1,1,1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    info = json.loads((out / "build_info.json").read_text())
    assert info["args"]["depth_families"] == "more_color,right_color" and info["steps"] == 2
    assert load_molmoe(out, device="cpu", dtype=torch.float32).model is not None
    from shared import shapes
    assert info["families"] == list(shapes.FAMILIES)       # no --families: the set's own families
    # --families outside shapes.FAMILIES: validation is rendered for those families (and recorded);
    # --deterministic turns torch's deterministic algorithms on for the build
    threads = torch.get_num_threads()
    try:
        build_tiny_model.main(["--device", "cpu", "--threads", "1", "--workers", "0", "--out", str(out),
                               "--steps", "1", "--batch", "4", "--eval-samples", "4", "--eval-every", "0",
                               "--final-eval", "short", "--families", "order_hop1", "--tiers", "1",
                               "--deterministic"])
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    info = json.loads((out / "build_info.json").read_text())
    assert set(info["validation_accuracy"]["full"]) == {"order_hop1", "all"}
    assert info["families"] == ["order_hop1"] and info["args"]["deterministic"] is True
    with pytest.raises(SystemExit):
        build_tiny_model.main(["--device", "cpu", "--out", str(out), "--steps", "1",
                               "--depth-families", "right_color", "--depth-weights", "1,1"])


def test_lead_until_ends_the_lead_at_the_first_check_that_passes(tmp_path, monkeypatch, capsys):
    """--lead-until: the lead ends at the first check whose lead-family accuracy reaches the threshold (here
    every check passes, so at the first check, step 2 of a 5-step lead); without it the lead runs its
    --lead-steps; the switch restarts the data stream at the next step."""
    import build_tiny_model

    calls = []

    def fake_evaluate(model, lay, tok, cache, items, settings, amp, batch=200):
        calls.append({it[3] for it in items})
        return {name: {"all": 1.0} for name in settings}

    monkeypatch.setattr(build_tiny_model, "evaluate", fake_evaluate)
    starts = []
    real = build_tiny_model.SceneBatches.__init__

    def spy(self, *a, **kw):
        starts.append((kw.get("start_step", 0), kw.get("lead_steps")))
        real(self, *a, **kw)

    monkeypatch.setattr(build_tiny_model.SceneBatches, "__init__", spy)
    common = ["--device", "cpu", "--threads", "1", "--workers", "0", "--steps", "6", "--batch", "4",
              "--eval-samples", "4", "--eval-every", "0", "--final-eval", "short",
              "--families", "large_color,code_hop1", "--lead-families", "code_hop1", "--lead-steps", "5",
              "--lead-frac", "0.5", "--lead-full-depth"]
    threads = torch.get_num_threads()
    try:
        assert build_tiny_model.main(common + ["--lead-until", "0.9", "--lead-check-every", "2",
                                               "--lead-check-samples", "3", "--out", str(tmp_path / "a")]) == 0
        info = json.loads((tmp_path / "a" / "build_info.json").read_text())
        assert info["lead_end_step"] == 2 and "lead ends at step 2" in capsys.readouterr().out
        assert starts == [(0, 5), (2, 2)]                     # the stream restarts at step 2, lead share off
        assert calls[0] == {"code_hop1"}                       # the check asks only lead-family questions
        starts.clear()
        assert build_tiny_model.main(common + ["--out", str(tmp_path / "b")]) == 0
        assert json.loads((tmp_path / "b" / "build_info.json").read_text())["lead_end_step"] == 5
        assert starts == [(0, 5)]
        with pytest.raises(SystemExit):
            build_tiny_model.main(["--device", "cpu", "--steps", "1", "--lead-until", "0.9",
                                   "--out", str(tmp_path / "c")])
    finally:
        torch.set_num_threads(threads)


def test_scene_batches_lead_families_take_their_share_only_early():
    """--lead-families: in the first lead_steps steps about lead_frac of the samples come from the lead families
    (in runs of 7, like --families), afterwards none; without them the draw is unchanged."""
    from build_tiny_model import SceneBatches

    plain = SceneBatches(64, 100, 0, aux_frac=0.1)
    lead = SceneBatches(64, 100, 0, aux_frac=0.1, lead=("code_hop1",), lead_steps=10, lead_frac=0.6)
    early = [lead.family(i) for i in range(10 * 64)]
    late = [lead.family(i) for i in range(10 * 64, 30 * 64)]
    share = early.count("code_hop1") / len(early)
    assert 0.45 < share < 0.65                  # lead_frac of what the auxiliary share leaves
    assert "code_hop1" not in late
    assert late == [plain.family(i) for i in range(10 * 64, 30 * 64)]
    assert [f for f, p in zip(early, (plain.family(i) for i in range(10 * 64))) if f != "code_hop1"] == \
        [p for f, p in zip(early, (plain.family(i) for i in range(10 * 64))) if f != "code_hop1"]


def test_paused_and_resumed_build_equals_one_run(tmp_path):
    """--state/--pause-step/--resume: a build paused at step 3 and resumed reaches step 6 with weights and
    optimizer state bit-identical to one run paused at step 6 (lead share and depth curriculum included); a
    state saved with other training arguments, or a corrupt one, is refused by name."""
    import build_tiny_model

    common = ["--device", "cpu", "--threads", "1", "--workers", "0", "--steps", "8", "--batch", "4",
              "--eval-samples", "4", "--eval-every", "0", "--final-eval", "short", "--warmup", "2",
              "--families", "large_color,code_hop1", "--lead-families", "code_hop1", "--lead-steps", "4",
              "--lead-frac", "0.5", "--lead-full-depth", "--depth-families", "code_hop1",
              "--depth-weights", "0,0,0,1,1", "--out", str(tmp_path / "m")]
    one, split = tmp_path / "one.pt", tmp_path / "split.pt"
    threads = torch.get_num_threads()
    try:
        assert build_tiny_model.main(common + ["--state", str(one), "--pause-step", "6"]) == 0
        assert build_tiny_model.main(common + ["--state", str(split), "--pause-step", "3"]) == 0
        assert torch.load(split, weights_only=True)["step"] == 3
        assert build_tiny_model.main(common + ["--state", str(split), "--resume", "--pause-step", "6"]) == 0
        a, b = torch.load(one, weights_only=True), torch.load(split, weights_only=True)
        assert a["step"] == b["step"] == 6
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        for (ka, sa), (kb, sb) in zip(a["opt"]["state"].items(), b["opt"]["state"].items()):
            assert ka == kb and all(torch.equal(sa[n], sb[n]) for n in sa)
        assert a["rng"] == b["rng"] and a["lead_end"] == b["lead_end"] == 4
        # the state moved: step 6's weights differ from step 3's
        b3 = common + ["--state", str(tmp_path / "three.pt"), "--pause-step", "3"]
        build_tiny_model.main(b3)
        three = torch.load(tmp_path / "three.pt", weights_only=True)
        assert any(not torch.equal(three["model"][k], a["model"][k]) for k in a["model"])
        # the resumed build finishes and writes the model, recording that it was resumed
        assert build_tiny_model.main(common + ["--state", str(split), "--resume"]) == 0
        info = json.loads((tmp_path / "m" / "build_info.json").read_text())
        assert info["resumed"] is True and info["steps"] == 8
        with pytest.raises(SystemExit, match="lr"):
            build_tiny_model.main(common + ["--state", str(one), "--resume", "--lr", "1e-3"])
        (tmp_path / "bad.pt").write_bytes(b"not a state")
        with pytest.raises(SystemExit, match="not a readable training state"):
            build_tiny_model.main(common + ["--state", str(tmp_path / "bad.pt"), "--resume"])
        with pytest.raises(SystemExit, match="no training state"):
            build_tiny_model.main(common + ["--state", str(tmp_path / "missing.pt"), "--resume"])
    finally:
        torch.set_num_threads(threads)
