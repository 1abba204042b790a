"""Shapes: a procedurally generated visual question set (DESIGN.md section 8, issue 6 point 1).

Every sample is a 224 x 224 PNG scene and one question about it, generated from (seed, split, index)
alone, so any sample can be regenerated without the others and the splits never share a scene.

Scenes hold LARGE shapes (40-56 px), MEDIUM shapes (24-34 px) and SMALL shapes (7-8 px) of circle,
square, triangle (small ones also cross) in six colours. A shape is drawn in one of three fills: "full"
(the saturated colour), "pastel" (the mean of the colour and white, solid) or "checker" (a 1-px
checkerboard of the colour and white over an axis-aligned box inside the shape, whose mean is exactly
the pastel; the rim stays pastel). Question families (FAMILIES; the held-out set cycles through them):

| family            | question                                          | answer      | needs                          |
|-------------------|---------------------------------------------------|-------------|--------------------------------|
| large_color       | What color is the big {shape}?                    | colour word | the global view                |
| large_count_color | How many big {color} shapes are there?            | 0..3        | the global view, counting      |
| checker_color     | What color is the checkered shape?                | colour word | crops at full scale (max_crops |
|                   |                                                   |             | 9): see "erasure" below        |
| checker_count     | How many checkered shapes are there?              | 0..3        | crops at full scale            |
| more_color        | Are there more {c1} shapes than {c2} shapes?      | yes / no    | the global view; two counts    |
|                   |                                                   |             | and a comparison (depth)       |
| right_color       | What color is the next shape right of the {c}     | colour word | the global view; two hops      |
|                   | shape?                                            |             | (find {c}, then its neighbour) |
| code_hop1         | red is 3 , blue is 1 , green is 4 , yellow is 2 . | 1..4        | the global view; a lookup in   |
|                   | What number is the big shape?                     |             | the question (LLM depth)       |

Erasure (DETAIL_FAMILIES): the tiny model's 112-px crops see the 224-px scene at half scale in the
global view and at max_crops 1 (1x1 tiling), at 3/4 scale at max_crops 4 (2x2) and at full scale at
max_crops 9 (3x3). Torch's antialiased bilinear 2:1 resize has taps (1, 3, 3, 1) / 8, which map a
1-px checkerboard (a, b, a, b) to exactly (a + b) / 2: at half scale a checkered shape is the same
pixels as a pastel one, except <= 1/16 of the contrast at the four corners of the checker box
(tests/test_shapes.py checks this through MolmoPreprocessor). At 3/4 scale the checkerboard keeps a
few percent of its contrast, aliased; at full scale all of it. Every shape in the checker families is
pastel or checkered, so from the global view only their colours, kinds and number are visible.

DEPTH_FAMILIES (more_color, right_color) are answered from the global view but combine two pieces of
evidence; they are meant to need more LLM blocks than the single-lookup families.

GRID_FAMILIES and ORDER_FAMILIES (relation chains, not in FAMILIES; tried for a fourth build and not
learned by the tiny model, see docs/RESULTS.md) place large shapes in the cells of a 4 x 4 grid of 56-px
cells, one global-view token per cell:

| family       | question                                                              | answer |
|--------------|-----------------------------------------------------------------------|--------|
| grid_hopN    | What color is the shape {r_N} ... the shape {r_1} the {c} shape?      | colour |
|              | (r: left of / right of / above / below; 6 shapes, N = 1..3 hops)       |        |
| order_hopN   | What color is the next shape {right of / left of} (N times) the {c}   | colour |
|              | shape? (one shape per column, 4 shapes, N = 1..2)                     |        |
| row_hopN     | as order_hopN, the four shapes in one grid row (adjacent tokens)      | colour |
| column_of    | Which column is the {c} shape in? (order_hop's layout)                | 1..4   |

CODE_FAMILIES (code_hop1 is in FAMILIES since the fourth build, code_hop2 is not) show one big shape and give a table in the question, in a random order:

| family       | question                                                              | answer |
|--------------|-----------------------------------------------------------------------|--------|
| code_hop1    | red is 3 , blue is 1 , green is 4 , yellow is 2 . What number is the  | 1..4   |
|              | big shape?                                                            |        |
| code_hop2    | red means green , ... . red is 3 , ... . What number does the big     | 1..4   |
|              | shape mean? (the shape's colour -> a colour -> its number)            |        |

Each step is a lookup in the question's own tokens (a number token must know the colour before it, the
answer position must match it against the shape's colour), so code_hop1 needs at least two attention steps
after the image is read and code_hop2 at least three: depth needed by the question, not put there by
training.

ROW_FAMILIES and POSITION_FAMILIES exist because a linear probe found no grid column in the tiny model's image tokens
(docs/RESULTS.md, "why the relation families are not learned"): in one row, "the next shape right of X"
is the next image token after X's, an offset that attention over RoPE positions can express; column_of
asks for the column directly (can the model be taught to keep it?).

Training-only auxiliary families (AUX_FAMILIES, never evaluated) and the families of the first two
builds (LEGACY_FAMILIES: large_exists, small_color, small_count, small_corner) can be generated with
`family=`. Answers are short strings scored with metric "exact" (shared/scorers.py).

    ds = shapes_dataset("validation", 600, seed=0)     # datasets.Dataset
    samples = shapes_samples("validation", 600)         # list[shared.backend.Sample]
    LOADERS["shapes"](source_cfg, "validation", run_cfg)
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
LARGE_SHAPES = ("circle", "square", "triangle")
SMALL_SHAPES = ("circle", "square", "triangle", "cross")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
FAMILIES = ("large_color", "large_count_color", "checker_color", "checker_count", "more_color", "right_color",
            "code_hop1")
DETAIL_FAMILIES = ("checker_color", "checker_count")      # need max_crops 9 (full-scale crops)
DEPTH_FAMILIES = ("more_color", "right_color")            # global view, two pieces of evidence
LOOKUP_FAMILIES = ("code_hop1",)                          # a table lookup in the question: needs blocks, not crops
# Relation-chain families tried for a fourth build (not in FAMILIES: the tiny model did not learn them
# in ~3,000 GPU steps, docs/RESULTS.md "Per-family gain: what was tried"); generate them with family=.
GRID_FAMILIES = ("grid_hop1", "grid_hop2", "grid_hop3")   # 1-3 relations on a 4 x 4 grid
ORDER_FAMILIES = ("order_hop1", "order_hop2")             # 1-2 "next shape left/right" hops, one shape per column
ROW_FAMILIES = ("row_hop1", "row_hop2")                   # the same, the four shapes in one grid row
POSITION_FAMILIES = ("column_of",)                        # the grid column of a named shape, supervised
# Lookups through a table given in the question (not in FAMILIES; a try at a family that needs depth by its
# nature: the answer is a chain of attention steps over the question's own tokens, not a spatial relation)
CODE_FAMILIES = ("code_hop1", "code_hop2")
LEGACY_FAMILIES = ("large_exists", "small_color", "small_count", "small_corner")  # builds 1 and 2
SPLITS = {"train": 0, "validation": 1, "test": 2, "calibration": 3}
DEFAULT_SIZES = {"train": 20000, "validation": 600, "test": 600, "calibration": 300}
METRIC = "exact"
MAX_NEW_TOKENS = 4

LARGE_PX = (40, 56)
MEDIUM_PX = (24, 34)
SMALL_PX = (7, 8)
RIGHT_GAP = 44          # right_color: centres at least this far apart in x (no ties, no overlap)
FILLS = ("full", "pastel", "checker")


@dataclass
class Shape:
    kind: str
    color: str
    x: float          # centre
    y: float
    size: float       # bounding-box side in px
    small: bool
    fill: str = "full"  # "full" | "pastel" | "checker" (see the module docstring)


@dataclass
class ShapesItem:
    image: bytes
    question: str
    answers: list[str]
    question_type: str
    shapes: list[Shape] = field(default_factory=list)
    index: int = 0
    split: str = ""


# ----------------------------------------------------------------------------------------------
# Scene layout and drawing
# ----------------------------------------------------------------------------------------------
def _place(rng: np.random.Generator, shapes: list[Shape], size: float, small: bool,
           region: Optional[tuple[float, float, float, float]] = None, gap: float = 6.0) -> tuple[float, float]:
    """A centre for a new shape that keeps `gap` px from every placed shape (rejection sampling)."""
    lo, hi = size / 2 + 4, IMAGE_SIZE - size / 2 - 4
    x0, y0, x1, y1 = region or (lo, lo, hi, hi)
    x0, y0, x1, y1 = max(x0, lo), max(y0, lo), min(x1, hi), min(y1, hi)
    for _ in range(400):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if all(max(abs(x - s.x), abs(y - s.y)) > (size + s.size) / 2 + gap for s in shapes):
            return float(x), float(y)
    raise RuntimeError("could not place a shape")  # pragma: no cover - layouts are sparse


def _draw(shapes: list[Shape], rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    _render(shapes, rng).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def pastel(color: str) -> tuple[int, int, int]:
    """The solid fill whose pixels equal the checkerboard's mean exactly: (c + 255) // 2 per channel."""
    return tuple((v + 255) // 2 for v in COLORS[color])


def checker_pair(color: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two checkerboard values (the colour, and 2 * pastel - colour, i.e. 254 or 255 per channel):
    their mean is exactly `pastel(color)`."""
    c, m = COLORS[color], pastel(color)
    return c, tuple(2 * mv - cv for cv, mv in zip(c, m))


def checker_box(s: Shape) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of a checkered shape's texture: an axis-aligned box at
    least 1 px inside the drawn shape (circle: the inscribed square; triangle, apex up: the lower
    half's central rectangle)."""
    h = s.size / 2
    if s.kind == "circle":
        ax, ay0, ay1 = h / math.sqrt(2) - 1, -h / math.sqrt(2) + 1, h / math.sqrt(2) - 1
    elif s.kind == "square":
        ax, ay0, ay1 = h - 1, -h + 1, h - 1
    elif s.kind == "triangle":
        ax, ay0, ay1 = h / 2 - 1, 1.0, h - 1
    else:  # pragma: no cover
        raise ValueError(f"no checker box for {s.kind}")
    return (math.ceil(s.x - ax), math.ceil(s.y + ay0), math.floor(s.x + ax), math.floor(s.y + ay1))


def _render(shapes: list[Shape], rng: np.random.Generator, checker: bool = True) -> Image.Image:
    """The scene. checker=False draws checkered shapes as pastel (the erasure tests' reference)."""
    bg = tuple(int(v) for v in rng.integers(235, 256, 3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(img)
    for s in shapes:
        c = COLORS[s.color] if s.fill == "full" else pastel(s.color)
        h = s.size / 2
        box = [s.x - h, s.y - h, s.x + h, s.y + h]
        if s.kind == "circle":
            d.ellipse(box, fill=c)
        elif s.kind == "square":
            d.rectangle(box, fill=c)
        elif s.kind == "triangle":
            d.polygon([(s.x, s.y - h), (s.x - h, s.y + h), (s.x + h, s.y + h)], fill=c)
        elif s.kind == "cross":
            w = max(2, int(round(s.size / 3.5)))
            d.line([(s.x - h, s.y - h), (s.x + h, s.y + h)], fill=c, width=w)
            d.line([(s.x - h, s.y + h), (s.x + h, s.y - h)], fill=c, width=w)
        else:  # pragma: no cover
            raise ValueError(s.kind)
    textured = [s for s in shapes if s.fill == "checker"] if checker else []
    if textured:
        arr = np.array(img)
        for s in textured:
            x0, y0, x1, y1 = checker_box(s)
            a, b = checker_pair(s.color)
            yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
            arr[y0:y1 + 1, x0:x1 + 1] = np.where(((xx + yy) % 2 == 0)[..., None], np.array(a, np.uint8),
                                                  np.array(b, np.uint8))
        img = Image.fromarray(arr)
    return img


def _large(rng, shapes, kind=None, color=None) -> Shape:
    size = float(rng.uniform(*LARGE_PX))
    kind = kind or str(rng.choice(LARGE_SHAPES))
    color = color or str(rng.choice(list(COLORS)))
    x, y = _place(rng, shapes, size, False)
    s = Shape(kind, color, x, y, size, False)
    shapes.append(s)
    return s


def _small(rng, shapes, kind=None, color=None, region=None) -> Shape:
    size = float(rng.uniform(*SMALL_PX))
    kind = kind or str(rng.choice(SMALL_SHAPES))
    color = color or str(rng.choice(list(COLORS)))
    x, y = _place(rng, shapes, size, True, region=region, gap=10.0)
    s = Shape(kind, color, x, y, size, True)
    shapes.append(s)
    return s


def _background_large(rng, shapes, n_lo=1, n_hi=3, avoid_kind=None) -> None:
    for _ in range(int(rng.integers(n_lo, n_hi + 1))):
        kinds = [k for k in LARGE_SHAPES if k != avoid_kind]
        _large(rng, shapes, kind=str(rng.choice(kinds)))


def _background_small(rng, shapes, n_lo=0, n_hi=2, avoid_kind=None, colors=None) -> None:
    for _ in range(int(rng.integers(n_lo, n_hi + 1))):
        kinds = [k for k in SMALL_SHAPES if k != avoid_kind]
        _small(rng, shapes, kind=str(rng.choice(kinds)), color=None if colors is None else str(rng.choice(colors)))


# ----------------------------------------------------------------------------------------------
# Question families
# ----------------------------------------------------------------------------------------------
def _q_large_color(rng):
    shapes: list[Shape] = []
    kind = str(rng.choice(LARGE_SHAPES))
    target = _large(rng, shapes, kind=kind)
    _background_large(rng, shapes, 0, 2, avoid_kind=kind)
    _background_small(rng, shapes, 1, 4)
    return shapes, f"What color is the big {kind}?", [target.color]


def _q_large_exists(rng):
    shapes: list[Shape] = []
    present = bool(rng.integers(0, 2))
    if present:
        _large(rng, shapes, kind="circle")
        _background_large(rng, shapes, 0, 2)
    else:
        _background_large(rng, shapes, 1, 3, avoid_kind="circle")
    _background_small(rng, shapes, 1, 4)  # small circles may exist: only BIG ones count
    return shapes, "Is there a big circle?", ["yes" if present else "no"]


def _q_large_count_color(rng):
    shapes: list[Shape] = []
    color = str(rng.choice(list(COLORS)))
    n = int(rng.integers(0, 4))
    others = [c for c in COLORS if c != color]
    for _ in range(n):
        _large(rng, shapes, color=color)
    for _ in range(int(rng.integers(max(0, 1 - n), 5 - n))):
        _large(rng, shapes, color=str(rng.choice(others)))
    _background_small(rng, shapes, 0, 3)
    return shapes, f"How many big {color} shapes are there?", [str(n)]


def _q_small_color(rng):
    shapes: list[Shape] = []
    _background_large(rng, shapes, 1, 2)
    kinds = list(rng.permutation(SMALL_SHAPES))        # every small shape of a distinct kind and colour
    colors = list(rng.permutation(list(COLORS)))
    n = int(rng.integers(3, 5))
    placed = [_small(rng, shapes, kind=str(kinds[i]), color=str(colors[i])) for i in range(n)]
    target = placed[int(rng.integers(0, n))]
    return shapes, f"What color is the small {target.kind}?", [target.color]


def _plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def _q_small_count(rng):
    shapes: list[Shape] = []
    _background_large(rng, shapes, 1, 2)
    kind = str(rng.choice(SMALL_SHAPES))
    color = str(rng.choice(list(COLORS)))      # one colour for every small shape: shape must be resolved
    n = int(rng.integers(1, 4))
    for _ in range(n):
        _small(rng, shapes, kind=kind, color=color)
    _background_small(rng, shapes, 1, 3, avoid_kind=kind, colors=[color])
    return shapes, f"How many small {_plural(kind)} are there?", [str(n)]


def _q_small_corner(rng):
    shapes: list[Shape] = []
    m = IMAGE_SIZE / 2
    regions = [(0, 0, m - 30, m - 30), (m + 30, 0, IMAGE_SIZE, m - 30), (0, m + 30, m - 30, IMAGE_SIZE),
               (m + 30, m + 30, IMAGE_SIZE, IMAGE_SIZE)]
    color = str(rng.choice(list(COLORS)))
    which = int(rng.integers(0, 4))
    for i, region in enumerate(regions):
        kind = "cross" if i == which else str(rng.choice(SMALL_SHAPES[:3]))
        _small(rng, shapes, kind=kind, color=color, region=region)
    _background_large(rng, shapes, 0, 1)
    return shapes, "Which corner has the small cross?", [CORNERS[which]]


def _medium(rng, shapes, color, kind=None, x=None, y=None) -> Shape:
    size = float(rng.uniform(*MEDIUM_PX))
    kind = kind or str(rng.choice(LARGE_SHAPES))
    if x is None:
        x, y = _place(rng, shapes, size, False)
    s = Shape(kind, color, float(x), float(y), size, False)
    shapes.append(s)
    return s


def _q_checker_color(rng):
    """2-4 big pastel shapes of distinct colours, exactly one checkered."""
    shapes: list[Shape] = []
    colors = list(rng.permutation(list(COLORS)))
    n = int(rng.integers(2, 5))
    placed = [_large(rng, shapes, color=str(colors[i])) for i in range(n)]
    for s in placed:
        s.fill = "pastel"
    target = placed[int(rng.integers(0, n))]
    target.fill = "checker"
    return shapes, "What color is the checkered shape?", [target.color]


def _q_checker_count(rng):
    """2-4 big pastel shapes (colours may repeat), 0-3 of them checkered (uniform)."""
    shapes: list[Shape] = []
    k = int(rng.integers(0, 4))
    n = int(rng.integers(max(2, k), 5))
    placed = [_large(rng, shapes) for _ in range(n)]
    for i, s in enumerate(placed):
        s.fill = "pastel"
    for i in rng.permutation(n)[:k]:
        placed[int(i)].fill = "checker"
    return shapes, "How many checkered shapes are there?", [str(k)]


def _q_more_color(rng):
    """n1 != n2 in 1..4 medium shapes of colours c1 and c2 (yes iff n1 > n2), 0-2 of other colours."""
    shapes: list[Shape] = []
    c1, c2, *others = [str(c) for c in rng.permutation(list(COLORS))]
    n1, n2 = (int(v) for v in rng.choice(np.arange(1, 5), 2, replace=False))
    for _ in range(n1):
        _medium(rng, shapes, c1)
    for _ in range(n2):
        _medium(rng, shapes, c2)
    for _ in range(int(rng.integers(0, 3))):
        _medium(rng, shapes, str(rng.choice(others)))
    return shapes, f"Are there more {c1} shapes than {c2} shapes?", ["yes" if n1 > n2 else "no"]


def _q_right_color(rng):
    """3-4 medium shapes of distinct colours whose centres are >= RIGHT_GAP px apart in x; ask for the
    colour of the next shape to the right of one of them (not the rightmost)."""
    shapes: list[Shape] = []
    n = int(rng.integers(3, 5))
    colors = [str(c) for c in rng.permutation(list(COLORS))[:n]]
    lo, hi = MEDIUM_PX[1] / 2 + 4, IMAGE_SIZE - MEDIUM_PX[1] / 2 - 4
    slack = hi - lo - (n - 1) * RIGHT_GAP
    xs = np.sort(rng.uniform(0, slack, n)) + lo + RIGHT_GAP * np.arange(n)
    order = rng.permutation(n)                       # colours are not sorted by x
    for i in range(n):
        _medium(rng, shapes, colors[order[i]], x=xs[i], y=rng.uniform(lo, hi))
    i = int(rng.integers(0, n - 1))
    return (shapes, f"What color is the next shape right of the {shapes[i].color} shape?",
            [shapes[i + 1].color])



# ----------------------------------------------------------------------------------------------
# Grid relation chains (fourth build): depth families answered from the global view
# ----------------------------------------------------------------------------------------------
GRID_CELLS = 4                      # a 4 x 4 grid of 56-px cells: one global-view token per cell
GRID_CELL_PX = IMAGE_SIZE // GRID_CELLS
GRID_PX = (34, 44)                  # shape size inside a cell
GRID_SHAPES = 6                     # shapes per scene, one per colour
RELATIONS = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}
_INVERSE = {"right of": "left of", "left of": "right of", "above": "below", "below": "above"}


def grid_cell(s: Shape) -> tuple[int, int]:
    """(row, col) of a shape's grid cell."""
    return int(s.y // GRID_CELL_PX), int(s.x // GRID_CELL_PX)


def _grid_chain(rng, hops: int):
    """A scene of GRID_SHAPES shapes of distinct colours in distinct cells of the 4 x 4 grid, holding a
    chain start -> r1 -> ... -> r_hops of adjacent occupied cells that never revisits a cell. Returns
    (shapes, relations, start shape, end shape)."""
    for _ in range(200):
        r, c = int(rng.integers(0, GRID_CELLS)), int(rng.integers(0, GRID_CELLS))
        cells, rels = [(r, c)], []
        ok = True
        for _h in range(hops):
            opts = [k for k, (dr, dc) in RELATIONS.items()
                    if 0 <= cells[-1][0] + dr < GRID_CELLS and 0 <= cells[-1][1] + dc < GRID_CELLS
                    and (cells[-1][0] + dr, cells[-1][1] + dc) not in cells]
            if not opts:
                ok = False
                break
            k = str(opts[int(rng.integers(0, len(opts)))])
            rels.append(k)
            cells.append((cells[-1][0] + RELATIONS[k][0], cells[-1][1] + RELATIONS[k][1]))
        if ok:
            break
    free = [(i, j) for i in range(GRID_CELLS) for j in range(GRID_CELLS) if (i, j) not in cells]
    extra = rng.permutation(len(free))[:GRID_SHAPES - len(cells)]
    cells = cells + [free[int(i)] for i in extra]
    colors = [str(c) for c in rng.permutation(list(COLORS))]
    shapes: list[Shape] = []
    for (i, j), color in zip(cells, colors):
        size = float(rng.uniform(*GRID_PX))
        slack = (GRID_CELL_PX - size) / 2 - 2
        x = GRID_CELL_PX * (j + 0.5) + float(rng.uniform(-slack, slack))
        y = GRID_CELL_PX * (i + 0.5) + float(rng.uniform(-slack, slack))
        shapes.append(Shape(str(rng.choice(LARGE_SHAPES)), color, x, y, size, False))
    return shapes, rels, shapes[0], shapes[hops]


def _q_grid_hops(hops: int):
    def fn(rng):
        shapes, rels, start, end = _grid_chain(rng, hops)
        q = "What color is " + "".join(f"the shape {r} " for r in reversed(rels)) + f"the {start.color} shape?"
        return shapes, q, [end.color]
    fn.__doc__ = f"Grid scene; the colour of the shape reached from the named one by {hops} relation(s)."
    return fn



COLUMN_SHAPES = 4                   # order families: one shape in each column of the 4 x 4 grid
ORDER_DIRECTIONS = {"right of": 1, "left of": -1}


def _q_order_hops(hops: int, one_row: bool = False):
    def fn(rng):
        """One big shape in each grid column (random rows, or one random row for all with `one_row`;
        distinct colours); the colour of the shape `hops` columns right (or left) of the named one, asked as
        a chain of "next shape" relations."""
        colors = [str(c) for c in rng.permutation(list(COLORS))[:COLUMN_SHAPES]]
        shapes: list[Shape] = []
        shared_row = int(rng.integers(0, GRID_CELLS)) if one_row else None
        for col, color in enumerate(colors):
            size = float(rng.uniform(*GRID_PX))
            slack = (GRID_CELL_PX - size) / 2 - 2
            row = shared_row if one_row else int(rng.integers(0, GRID_CELLS))
            x = GRID_CELL_PX * (col + 0.5) + float(rng.uniform(-slack, slack))
            y = GRID_CELL_PX * (row + 0.5) + float(rng.uniform(-slack, slack))
            shapes.append(Shape(str(rng.choice(LARGE_SHAPES)), color, x, y, size, False))
        rel = "right of" if rng.integers(0, 2) else "left of"
        d = ORDER_DIRECTIONS[rel]
        starts = [c for c in range(COLUMN_SHAPES) if 0 <= c + d * hops < COLUMN_SHAPES]
        start = starts[int(rng.integers(0, len(starts)))]
        q = "What color is " + f"the next shape {rel} " * hops + f"the {colors[start]} shape?"
        return shapes, q, [colors[start + d * hops]]
    return fn

def _q_column_of(rng):
    """order_hop's scene (one big shape per grid column, random rows); the named shape's column, 1..4 from
    the left."""
    shapes, _, _ = _q_order_hops(1)(rng)
    target = shapes[int(rng.integers(0, len(shapes)))]
    return shapes, f"Which column is the {target.color} shape in?", [str(grid_cell(target)[1] + 1)]


CODE_COLORS = 4                     # code families: the table's colours (the shape's among them)


def _q_code_hops(hops: int):
    def fn(rng):
        """One big shape; a table of the four colours (the shape's and three others) to the numbers 1..4 (a
        random permutation, listed in a random order); with hops = 2 a colour-to-colour table first."""
        colors = [str(c) for c in rng.permutation(list(COLORS))[:CODE_COLORS]]
        shapes: list[Shape] = []
        target = _large(rng, shapes, color=colors[int(rng.integers(0, CODE_COLORS))])
        numbers = {c: str(int(k) + 1) for c, k in zip(colors, rng.permutation(CODE_COLORS))}
        listed = " , ".join(f"{c} is {numbers[c]}" for c in (colors[int(i)] for i in rng.permutation(CODE_COLORS)))
        if hops == 1:
            return shapes, f"{listed} . What number is the big shape?", [numbers[target.color]]
        means = dict(zip(colors, (colors[int(i)] for i in rng.permutation(CODE_COLORS))))
        renamed = " , ".join(f"{c} means {means[c]}" for c in (colors[int(i)] for i in rng.permutation(CODE_COLORS)))
        return (shapes, f"{renamed} . {listed} . What number does the big shape mean?",
                [numbers[means[target.color]]])
    return fn


def _parse_chain(question: str) -> tuple[str, list[str]]:
    """'What color is the shape above the shape right of the red shape?' -> ('red', ['right of', 'above'])."""
    body = question.rstrip("?")[len("What color is "):]
    parts = body.split("the shape ")
    rels = [p.strip() for p in parts if p.strip()]
    last = rels.pop()                              # "... the red shape" stays in the last part
    *rel_tail, color_part = last.split(" the ")
    rels += [r.strip() for r in rel_tail]
    color = color_part.split()[0]
    return color, list(reversed(rels))


def _q_large_shape(rng):
    """Training-only auxiliary: name the big shape of a given colour (direct shape supervision)."""
    shapes: list[Shape] = []
    colors = list(rng.permutation(list(COLORS)))
    n = int(rng.integers(1, 4))
    placed = [_large(rng, shapes, color=str(colors[i])) for i in range(n)]
    _background_small(rng, shapes, 0, 3)
    target = placed[int(rng.integers(0, n))]
    return shapes, f"What shape is the big {target.color} object?", [target.kind]


def _q_small_shape(rng):
    """Training-only auxiliary: name the small shape of a given colour."""
    shapes: list[Shape] = []
    _background_large(rng, shapes, 1, 2)
    colors = list(rng.permutation(list(COLORS)))
    n = int(rng.integers(2, 5))
    placed = [_small(rng, shapes, color=str(colors[i])) for i in range(n)]
    target = placed[int(rng.integers(0, n))]
    return shapes, f"What shape is the small {target.color} object?", [target.kind]


AUX_FAMILIES = ("large_shape",)

_FAMILY_FN = {
    "large_shape": _q_large_shape,
    "small_shape": _q_small_shape,
    "checker_color": _q_checker_color,
    "checker_count": _q_checker_count,
    "more_color": _q_more_color,
    "right_color": _q_right_color,
    "grid_hop1": _q_grid_hops(1),
    "grid_hop2": _q_grid_hops(2),
    "grid_hop3": _q_grid_hops(3),
    "order_hop1": _q_order_hops(1),
    "order_hop2": _q_order_hops(2),
    "row_hop1": _q_order_hops(1, one_row=True),
    "row_hop2": _q_order_hops(2, one_row=True),
    "column_of": _q_column_of,
    "code_hop1": _q_code_hops(1),
    "code_hop2": _q_code_hops(2),
    "large_color": _q_large_color,
    "large_exists": _q_large_exists,
    "large_count_color": _q_large_count_color,
    "small_color": _q_small_color,
    "small_count": _q_small_count,
    "small_corner": _q_small_corner,
}
FAMILY_NAMES = tuple(_FAMILY_FN)                          # every family make_item can generate


def make_item(index: int, split: str = "train", seed: int = 0, family: Optional[str] = None) -> ShapesItem:
    """Sample `index` of `split` (families cycle by index, so every family is present in any
    len(FAMILIES) consecutive samples). Deterministic in (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; splits: {sorted(SPLITS)}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index), 0x5A4E])
    fam = family or FAMILIES[index % len(FAMILIES)]
    shapes, question, answers = _FAMILY_FN[fam](rng)
    return ShapesItem(image=_draw(shapes, rng), question=question, answers=answers, question_type=fam,
                      shapes=shapes, index=index, split=split)


def render_item(index: int, split: str = "train", seed: int = 0, family: Optional[str] = None,
                checker: bool = True) -> tuple[np.ndarray, str, list[str], str]:
    """The same sample as `make_item` without PNG encoding (training): (RGB uint8 [224, 224, 3],
    question, answers, question_type). Identical pixels to decoding `make_item(...).image`.
    `family` may also name a training-only auxiliary family (AUX_FAMILIES) or a LEGACY_FAMILIES one.
    checker=False draws checkered shapes as solid pastel (the same scene otherwise; tests)."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; splits: {sorted(SPLITS)}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index), 0x5A4E])
    fam = family or FAMILIES[index % len(FAMILIES)]
    shapes, question, answers = _FAMILY_FN[fam](rng)
    return np.asarray(_render(shapes, rng, checker=checker)), question, answers, fam


def answer_from_scene(question_type: str, question: str, shapes: list[Shape]) -> str:
    """Recompute the answer from the drawn shapes (the tests check it against the stored answers)."""
    words = question.rstrip("?").split()
    large = [s for s in shapes if not s.small]
    small = [s for s in shapes if s.small]
    if question_type == "large_color":
        (s,) = [s for s in large if s.kind == words[-1]]
        return s.color
    if question_type == "large_exists":
        return "yes" if any(s.kind == "circle" for s in large) else "no"
    if question_type == "large_count_color":
        return str(sum(s.color == words[3] for s in large))
    if question_type == "checker_color":
        (s,) = [s for s in shapes if s.fill == "checker"]
        return s.color
    if question_type == "checker_count":
        return str(sum(s.fill == "checker" for s in shapes))
    if question_type == "more_color":
        c1, c2 = words[3], words[6]
        return "yes" if sum(s.color == c1 for s in shapes) > sum(s.color == c2 for s in shapes) else "no"
    if question_type == "right_color":
        (ref,) = [s for s in shapes if s.color == words[-2]]
        return min((s for s in shapes if s.x > ref.x), key=lambda s: s.x).color
    if question_type.startswith("grid_hop"):
        color, rels = _parse_chain(question)
        cells = {grid_cell(s): s for s in shapes}
        (ref,) = [s for s in shapes if s.color == color]
        r, c = grid_cell(ref)
        for k in rels:
            r, c = r + RELATIONS[k][0], c + RELATIONS[k][1]
        return cells[(r, c)].color
    if question_type.startswith("code_hop"):
        (big,) = large
        tables = question.split(" . ")
        numbers = dict(pair.split(" is ") for pair in tables[-2].split(" , "))
        color = big.color
        if question_type == "code_hop2":
            color = dict(pair.split(" means ") for pair in tables[0].split(" , "))[color]
        return numbers[color]
    if question_type == "column_of":
        (ref,) = [s for s in shapes if s.color == words[-3]]
        return str(grid_cell(ref)[1] + 1)
    if question_type.startswith(("order_hop", "row_hop")):
        words_q = question.rstrip("?").split()
        hops = question.count("the next shape")
        d = ORDER_DIRECTIONS["right of" if "right of" in question else "left of"]
        (ref,) = [s for s in shapes if s.color == words_q[-2]]
        ordered = sorted(shapes, key=lambda s: s.x)
        return ordered[ordered.index(ref) + d * hops].color
    if question_type == "small_color":
        (s,) = [s for s in small if s.kind == words[-1]]
        return s.color
    if question_type == "small_count":
        kind = words[3][:-2] if words[3].endswith("ses") else words[3][:-1]
        return str(sum(s.kind == kind for s in small))
    if question_type == "small_corner":
        (s,) = [s for s in small if s.kind == "cross"]
        return ("top" if s.y < IMAGE_SIZE / 2 else "bottom") + " " + ("left" if s.x < IMAGE_SIZE / 2 else "right")
    raise ValueError(question_type)


# ----------------------------------------------------------------------------------------------
# datasets.Dataset and Sample views
# ----------------------------------------------------------------------------------------------
def shapes_items(split: str, n: int, seed: int = 0, start: int = 0) -> list[ShapesItem]:
    return [make_item(i, split, seed) for i in range(start, start + n)]


def shapes_dataset(split: str = "validation", n: Optional[int] = None, seed: int = 0):
    """The split as a `datasets.Dataset` with columns image (PNG bytes), question, answers,
    question_type, metric, sample_id."""
    import datasets
    n = DEFAULT_SIZES[split] if n is None else int(n)
    items = shapes_items(split, n, seed)
    return datasets.Dataset.from_dict({
        "sample_id": [_sample_id(split, seed, it.index) for it in items],
        "image": [it.image for it in items],
        "question": [it.question for it in items],
        "answers": [list(it.answers) for it in items],
        "question_type": [it.question_type for it in items],
        "metric": [METRIC] * len(items),
    })


def _sample_id(split: str, seed: int, index: int) -> str:
    return f"shapes-s{seed}-{split}-{index}"


def shapes_samples(split: str = "validation", n: Optional[int] = None, seed: int = 0):
    """The split as `list[shared.backend.Sample]`."""
    from shared.backend import Sample
    n = DEFAULT_SIZES[split] if n is None else int(n)
    return [Sample(sample_id=_sample_id(split, seed, it.index), question=it.question, answers=list(it.answers),
                   metric=METRIC, question_type=it.question_type, source="shapes", image=it.image,
                   max_new_tokens=MAX_NEW_TOKENS)
            for it in shapes_items(split, n, seed)]


_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "calib": "calibration"}


def load_shapes(source, split: str, cfg) -> list:
    """LOADERS["shapes"]: loader(source_cfg, split, run_cfg) -> list[Sample]. Size: source.max_samples
    or the split's default; seed: source.seed."""
    split = _SPLIT_ALIASES.get(split, split)
    n = int(getattr(source, "max_samples", 0) or 0) or DEFAULT_SIZES.get(split, 600)
    return shapes_samples(split, n, int(getattr(source, "seed", 0) or 0))


def _register() -> None:
    from shared.datasets import LOADERS
    LOADERS.setdefault("shapes", load_shapes)


_register()
