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
        # the drawn pixel at each shape's centre has its colour (crosses: the centre is on both strokes)
        for s in it.shapes:
            if s.kind != "triangle":
                assert img.getpixel((int(round(s.x)), int(round(s.y)))) == shapes.COLORS[s.color]


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
