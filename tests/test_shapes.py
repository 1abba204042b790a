"""The procedural shapes question set (shared/shapes.py)."""
import io

import pytest
from PIL import Image

from shared import shapes
from shared.scorers import score


def test_deterministic_by_seed():
    a = shapes.make_item(7, "train", seed=3)
    b = shapes.make_item(7, "train", seed=3)
    c = shapes.make_item(7, "train", seed=4)
    assert (a.image, a.question, a.answers) == (b.image, b.question, b.answers)
    assert a.image != c.image


def test_splits_disjoint():
    images = {}
    for split in shapes.SPLITS:
        images[split] = {it.image for it in shapes.shapes_items(split, 24)}
    names = list(images)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not images[x] & images[y], (x, y)


def test_every_family_present_and_answers_match_scene():
    items = shapes.shapes_items("validation", 60)
    assert {it.question_type for it in items} == set(shapes.FAMILIES)
    for it in items:
        truth = shapes.answer_from_scene(it.question_type, it.question, it.shapes)
        assert it.answers == [truth]
        assert score("exact", truth, it.answers) == 1.0
        img = Image.open(io.BytesIO(it.image))
        assert img.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and img.mode == "RGB"
        # the drawn pixel at each shape's centre has its colour (crosses: the centre is on both strokes;
        # pastel shapes: the pastel; checkered circles and squares: one of the two checker values)
        for s in it.shapes:
            if s.kind == "triangle":
                continue
            px = img.getpixel((int(round(s.x)), int(round(s.y))))
            if s.fill == "full":
                assert px == shapes.COLORS[s.color]
            elif s.fill == "pastel":
                assert px == shapes.pastel(s.color)
            else:
                assert px in shapes.checker_pair(s.color)


@pytest.mark.parametrize("family", shapes.AUX_FAMILIES + shapes.LEGACY_FAMILIES + shapes.GRID_FAMILIES
                         + shapes.ORDER_FAMILIES + shapes.ROW_FAMILIES + shapes.POSITION_FAMILIES
                         + shapes.CODE_FAMILIES)
def test_aux_and_legacy_families_generate(family):
    for i in range(6):
        it = shapes.make_item(i, "train", family=family)
        assert it.question_type == family and it.answers
        if family not in shapes.AUX_FAMILIES:
            assert it.answers == [shapes.answer_from_scene(family, it.question, it.shapes)]


def test_grid_hop_scenes():
    """Grid relation chains: one shape per colour in distinct 56-px cells (one global-view token each),
    every hop lands on an occupied cell, the chain never revisits a cell, and the question names
    as many relations as the family's hop count."""
    for hops in (1, 2, 3):
        fam = f"grid_hop{hops}"
        answers = set()
        for i in range(60):
            it = shapes.make_item(i, "validation", family=fam)
            assert len(it.shapes) == shapes.GRID_SHAPES
            assert len({s.color for s in it.shapes}) == len(it.shapes)
            cells = [shapes.grid_cell(s) for s in it.shapes]
            assert len(set(cells)) == len(cells)
            for s in it.shapes:              # the whole shape lies inside its cell
                r, c = shapes.grid_cell(s)
                assert c * shapes.GRID_CELL_PX <= s.x - s.size / 2 and s.x + s.size / 2 <= (c + 1) * shapes.GRID_CELL_PX
                assert r * shapes.GRID_CELL_PX <= s.y - s.size / 2 and s.y + s.size / 2 <= (r + 1) * shapes.GRID_CELL_PX
            color, rels = shapes._parse_chain(it.question)
            assert len(rels) == hops and all(r in shapes.RELATIONS for r in rels)
            occupied = dict(zip(cells, it.shapes))
            (start,) = [s for s in it.shapes if s.color == color]
            here = shapes.grid_cell(start)
            seen = [here]
            for r in rels:
                here = (here[0] + shapes.RELATIONS[r][0], here[1] + shapes.RELATIONS[r][1])
                assert here in occupied and here not in seen
                seen.append(here)
            assert it.answers == [occupied[here].color] != [color]
            answers.add(it.answers[0])
        assert answers == set(shapes.COLORS)


@pytest.mark.parametrize("prefix", ["order_hop", "row_hop"])
def test_order_hop_scenes(prefix):
    """Order families: one shape per grid column (distinct colours; row_hop: all in one row, and every row
    occurs), the answer is the shape `hops` columns right or left of the named one, and both directions and
    every start occur."""
    for hops in (1, 2):
        fam = f"{prefix}{hops}"
        seen = set()
        rows_seen = set()
        for i in range(80):
            it = shapes.make_item(i, "validation", family=fam)
            cols = sorted(shapes.grid_cell(s)[1] for s in it.shapes)
            assert cols == list(range(shapes.COLUMN_SHAPES))
            rows = {shapes.grid_cell(s)[0] for s in it.shapes}
            if prefix == "row_hop":
                assert len(rows) == 1
                rows_seen |= rows
            assert len({s.color for s in it.shapes}) == len(it.shapes)
            assert it.question.count("the next shape") == hops
            by_col = {shapes.grid_cell(s)[1]: s for s in it.shapes}
            color = it.question.rstrip("?").split()[-2]
            (start,) = [c for c, s in by_col.items() if s.color == color]
            d = 1 if "right of" in it.question else -1
            assert it.answers == [by_col[start + d * hops].color]
            seen.add((d, start))
        assert len(seen) == 2 * (shapes.COLUMN_SHAPES - hops)
        if prefix == "row_hop":
            assert rows_seen == set(range(shapes.GRID_CELLS))


def test_column_of_scenes():
    """column_of: the named shape's grid column, 1..4; every column is asked for."""
    asked = set()
    for i in range(60):
        it = shapes.make_item(i, "validation", family="column_of")
        color = it.question.split()[-3]
        (target,) = [s for s in it.shapes if s.color == color]
        assert it.answers == [str(shapes.grid_cell(target)[1] + 1)]
        asked.add(it.answers[0])
    assert asked == {"1", "2", "3", "4"}


def test_code_lookup_scenes():
    """code_hop1/2: one big shape; its number through the question's table(s), computed here independently of
    answer_from_scene; every number is asked for, and the tables are permutations of four colours."""
    import re
    for fam, hops in (("code_hop1", 1), ("code_hop2", 2)):
        asked = set()
        for i in range(60):
            it = shapes.make_item(i, "validation", family=fam)
            (big,) = [s for s in it.shapes if not s.small]
            numbers = dict(re.findall(r"(\w+) is (\d)", it.question))
            means = dict(re.findall(r"(\w+) means (\w+)", it.question))
            assert sorted(numbers.values()) == ["1", "2", "3", "4"] and big.color in numbers
            assert len(means) == (4 if hops == 2 else 0) and set(means.values()) <= set(numbers)
            color = means[big.color] if hops == 2 else big.color
            assert it.answers == [numbers[color]]
            asked.add(it.answers[0])
        assert asked == {"1", "2", "3", "4"}
    # code_hop1 is served (the tiny model learned it, a family that needs blocks, not crops); code_hop2 is not
    assert set(shapes.CODE_FAMILIES) & set(shapes.FAMILIES) == {"code_hop1"}
    assert set(shapes.LOOKUP_FAMILIES) <= set(shapes.FAMILIES)


def test_family_scenes():
    import numpy as np
    for i in range(40):
        it = shapes.make_item(i, "validation", family="right_color")
        xs = sorted(s.x for s in it.shapes)
        assert min(np.diff(xs)) >= shapes.RIGHT_GAP - 1e-6 and len({s.color for s in it.shapes}) == len(it.shapes)
        it = shapes.make_item(i, "validation", family="more_color")
        c1, c2 = it.question.split()[3], it.question.split()[6]
        n1, n2 = (sum(s.color == c for s in it.shapes) for c in (c1, c2))
        assert n1 != n2 and min(n1, n2) >= 1
        for fam in shapes.DETAIL_FAMILIES:       # only pastel / checkered shapes: no colour gives it away
            it = shapes.make_item(i, "validation", family=fam)
            assert {s.fill for s in it.shapes} <= {"pastel", "checker"}
    answers = [shapes.make_item(i, "train", family="checker_count").answers[0] for i in range(200)]
    assert set(answers) == {"0", "1", "2", "3"}
    answers = [shapes.make_item(i, "train", family="more_color").answers[0] for i in range(200)]
    assert 70 < answers.count("yes") < 130


def test_checker_mean_is_the_pastel():
    for c in shapes.COLORS:
        a, b = shapes.checker_pair(c)
        assert all(0 <= v <= 255 for v in a + b)
        assert tuple((x + y) / 2 for x, y in zip(a, b)) == shapes.pastel(c)


def _preprocessed_diff(pre, a, b, mc, std):
    import torch
    x = pre.preprocess("q", a, max_crops=mc).images
    y = pre.preprocess("q", b, max_crops=mc).images
    return ((x - y).reshape(*x.shape[:2], -1, 3) * torch.tensor(std)).abs()   # [0, 1] pixel units


def test_global_view_erases_the_checkerboard():
    """The property the detail families rely on, through the real preprocessing of the tiny model's
    geometry (112-px crops, 14-px patches): at max_crops 1 (the global view and the 1x1 crop, both at
    half scale) a checkered scene equals the same scene with the shape solid pastel, except at most
    1/16 of the checker contrast at 2 x 2 output pixels around each corner of each checker box; at max_crops 9 (full scale)
    the checkerboard is there at full contrast; at max_crops 4 (3/4 scale) at part of it."""
    from rollout_workers.molmoe import MolmoeConfig, MolmoPreprocessor, MolmoTokenizer

    cfg = MolmoeConfig.tiny(d_model=64, n_layers=8, n_heads=4, n_kv_heads=4, expert_hidden_size=128,
                            num_experts=8, top_k=4, vit_hidden_size=64, vit_num_layers=3, vit_num_heads=4,
                            vit_head_dim=16, vit_mlp_size=256, vit_layers=(-1, -2), max_crops=9)
    assert (cfg.crop_size_px, cfg.patch_size_px) == (112, 14)
    pre = MolmoPreprocessor(cfg, MolmoTokenizer.tiny())
    for fam in shapes.DETAIL_FAMILIES:
        for i in range(8):
            it = shapes.make_item(i, "validation", family=fam)
            n_chk = sum(s.fill == "checker" for s in it.shapes)
            a, *_ = shapes.render_item(i, "validation", family=fam)
            b, *_ = shapes.render_item(i, "validation", family=fam, checker=False)
            if n_chk == 0:
                assert (a == b).all()
                continue
            d1 = _preprocessed_diff(pre, a, b, 1, cfg.image_std)
            assert float(d1.max()) < 0.03                      # <= 1/16 of 0.45 contrast
            # pixels changed at all: 2 crops x 4 corners x 2 x 2 output pixels per checker box
            assert int((d1.amax(-1) > 0.005).sum()) <= 2 * 4 * 4 * n_chk
            d9 = _preprocessed_diff(pre, a, b, 9, cfg.image_std)
            assert float(d9[1:].max()) > 0.3 and int((d9[1:] > 0.1).sum()) > 100 * n_chk
            assert float(d9[0].max()) < 0.03                   # the global crop is still half scale
            d4 = _preprocessed_diff(pre, a, b, 4, cfg.image_std)
            assert 0.03 < float(d4[1:].max()) < float(d9[1:].max())


def test_dataset_columns():
    ds = shapes.shapes_dataset("test", 12)
    assert len(ds) == 12
    for col in ("image", "question", "answers", "question_type", "metric"):
        assert col in ds.column_names
    assert isinstance(ds[0]["image"], bytes) and isinstance(ds[0]["answers"], list)
    assert set(ds["metric"]) == {"exact"}


def test_loader_registered():
    from types import SimpleNamespace
    from shared.datasets import LOADERS, _import_loaders
    _import_loaders()
    src = SimpleNamespace(max_samples=10, seed=0, name="shapes")
    out = LOADERS["shapes"](src, "calibration", None)
    assert len(out) == 10 and out[0].image and out[0].metric == "exact"
    assert len({s.sample_id for s in out}) == 10
    val = LOADERS["shapes"](src, "validation", None)
    assert not {s.sample_id for s in out} & {s.sample_id for s in val}
    with pytest.raises(ValueError):
        LOADERS["shapes"](src, "nope", None)


def test_render_matches_png():
    import numpy as np
    for i in range(6):
        arr, q, a, fam = shapes.render_item(i, "train", 1)
        it = shapes.make_item(i, "train", 1)
        assert (q, a, fam) == (it.question, it.answers, it.question_type)
        assert np.array_equal(arr, np.asarray(Image.open(io.BytesIO(it.image)).convert("RGB")))
