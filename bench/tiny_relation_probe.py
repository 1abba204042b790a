"""Linear probes of the SHIPPED tiny MolmoE (assets/tiny_molmoe, frozen) on the relation families
(docs/RESULTS.md, "Per-family gain: what was tried after the third build", next step 1: "a linear probe
of whether the connector's global-view tokens carry their grid column").

Samples of order_hop1 (and grid_hop1) are generated deterministically (shapes split `train` for the
probes' training set, `validation` for the held-out set, seed --seed) and run at max_crops 1, full depth
(8 blocks), native top_k, float32 on the CPU, batch size 1 through the model's own segments
(`encode_images` -> `embed` -> `run_blocks` one block at a time -> `head`).

1. Position probe, on the 16 global-view tokens (4 x 4 pooled tokens; each covers one 56-px grid cell of
   the scene, so a shape lies inside exactly one token's region): the connector output, and the LLM hidden
   state at the same positions after every block (the LLM sees positions only through RoPE, so a position
   in the FEATURE can only come from the ViT's position embeddings or from attention; a row with each
   connector token minus its image's mean token shows what is left once the scene's random background
   colour is removed, something one attention head could do). Targets: the
   token's grid column, row, whether its cell holds a shape, the shape's colour (cells with a shape), and
   the column again on the cells with a shape only. The ViT output the connector pools (the two
   `vit_layers` concatenated, averaged over each token's 2 x 2 patches) is probed too, to tell whether a
   position signal is lost in the ViT or in the connector. The 1x1 crop's 16 tokens (the same half-scale
   pixels at max_crops 1, another mask) are probed at the connector output as well.
2. Relation probe, at the answer position (the last prompt position, whose logits give the first answer
   token), the hidden state after each block 0..7: the correct answer colour, the colour named in the
   question (the anchor), the anchor's column and the answer's column; plus a baseline that knows which
   colours are in the scene, the anchor colour and the relation but no positions, and the model's own
   answer.

Probes: multinomial logistic regression (torch, L-BFGS, standardised features, L2 chosen on a 20% split
of the training images), fitted on the `train` images, scored on the held-out `validation` images;
chance = always predicting the training set's most frequent class; +- = bootstrap standard error over
held-out images (tokens of one image are not independent).

    PYTHONPATH=. python bench/tiny_relation_probe.py --n-train 3000 --n-test 1000 --threads 2 \
        --families order_hop1,grid_hop1 \
        --out-json docs/tiny_fourth_build_tries/relation_probe.json \
        --out-md docs/tiny_fourth_build_tries/relation_probe.md

The markdown file's "## Interpretation" section (written by hand after a run) is kept when the file is
rewritten.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared import shapes  # noqa: E402

COLORS = list(shapes.COLORS)
SIDE = 4                     # 4 x 4 pooled tokens per crop; one per 56-px grid cell at max_crops 1
N_TOK = SIDE * SIDE
POS_TARGETS = ("col", "row", "has_shape", "color", "col_shape")
REL_TARGETS = ("answer_color", "anchor_color", "anchor_col", "answer_col")


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
def scene_labels(item) -> dict:
    """Per-token labels of the global view and per-sample relation labels."""
    occ = {}
    for s in item.shapes:
        r, c = shapes.grid_cell(s)
        occ[(r, c)] = s.color
    tok_has = np.zeros(N_TOK, np.int64)
    tok_color = np.full(N_TOK, -1, np.int64)
    for (r, c), col in occ.items():
        tok_has[r * SIDE + c] = 1
        tok_color[r * SIDE + c] = COLORS.index(col)
    words = item.question.rstrip("?").split()
    anchor = words[-2]
    (ref,) = [s for s in item.shapes if s.color == anchor]
    (ans,) = [s for s in item.shapes if s.color == item.answers[0]]
    if "right of" in item.question:
        rel = "right of"
    elif "left of" in item.question:
        rel = "left of"
    elif "above" in item.question:
        rel = "above"
    else:
        rel = "below"
    return dict(tok_has=tok_has, tok_color=tok_color,
                answer_color=COLORS.index(item.answers[0]), anchor_color=COLORS.index(anchor),
                anchor_col=shapes.grid_cell(ref)[1], answer_col=shapes.grid_cell(ans)[1],
                relation=rel, present=[COLORS.index(s.color) for s in item.shapes])


def saturated_tokens(images: torch.Tensor, cfg) -> np.ndarray:
    """Sanity check of the token <-> cell mapping from the pixels: [16] bool, the global crop's 2x2-patch
    groups (row-major) in which >= 5% of the pixels are saturated (a shape; the background is near grey)."""
    p = cfg.patch_size_px
    x = images[0].reshape(8, 8, p, p, 3)                              # patch rows, cols, dh, dw, c
    mean = torch.tensor(cfg.image_mean).view(1, 1, 1, 1, 3)
    std = torch.tensor(cfg.image_std).view(1, 1, 1, 1, 3)
    rgb = x * std + mean
    sat = (rgb.max(-1).values - rgb.min(-1).values) > 0.3           # [8, 8, p, p]
    frac = sat.reshape(SIDE, 2, SIDE, 2, p, p).permute(0, 2, 1, 3, 4, 5).reshape(N_TOK, -1).float().mean(1)
    return (frac >= 0.05).numpy()


@torch.no_grad()
def extract(m, family: str, split: str, n: int, seed: int, check_first: int = 3) -> dict:
    model, pre, cfg = m.model, m.preprocessor, m.model.config
    n_layers = cfg.n_layers
    colour_ids = []
    for c in COLORS:
        ids = m.tokenizer.encode(" " + c)
        assert len(ids) == 1, (c, ids)
        colour_ids.append(ids[0])
    colour_ids = torch.tensor(colour_ids)
    wanted = list(cfg.vit_block_indices)
    vit_g = np.zeros((n, N_TOK, len(wanted) * cfg.vit_hidden_size), np.float32)
    conn_g = np.zeros((n, N_TOK, cfg.d_model), np.float32)
    conn_c = np.zeros((n, N_TOK, cfg.d_model), np.float32)
    img_h = np.zeros((n_layers, n, N_TOK, cfg.d_model), np.float32)
    last_h = np.zeros((n_layers, n, cfg.d_model), np.float32)
    labels, model_full, model_col, sat_agree = [], [], [], []
    for i in range(n):
        it = shapes.make_item(i, split, seed, family=family)
        lab = scene_labels(it)
        inp = pre.preprocess(it.question, image=it.image, max_crops=1)
        assert inp.tiling == (1, 1) and tuple(inp.image_input_idx.shape) == (2, N_TOK), (inp.tiling,)
        sat_agree.append(float((saturated_tokens(inp.images, cfg) == lab["tok_has"].astype(bool)).mean()))
        vit_out = {}

        def layer_fn(j, hid):                                          # the ViT layer, output kept
            o = model.vision.encoder.layers[j](hid, None)
            o = o[0] if isinstance(o, tuple) else o
            vit_out[j] = o
            return o

        feats = model.encode_images(inp.images, inp.image_masks, layer_fn=layer_fn)   # [2, 16, d]
        v = torch.cat([vit_out[j] for j in wanted], -1)[0, 1:]       # global crop, CLS dropped: [64, 2w]
        vit_g[i] = v.reshape(SIDE, 2, SIDE, 2, -1).mean((1, 3)).reshape(N_TOK, -1).numpy()
        x = model.embed(inp.input_ids, image_features=feats, image_input_idx=inp.image_input_idx)
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        h = x
        gidx = inp.image_input_idx[0]
        for b in range(n_layers):
            h = model.run_blocks(h, [b], position_ids=pos)
            img_h[b, i] = h[0, gidx].numpy()
            last_h[b, i] = h[0, -1].numpy()
        logits = model.head(h[:, -1:])[0, 0]
        if i < check_first:   # one block at a time == the model's own forward (all blocks at once)
            ref = model(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx)[0, -1]
            assert torch.allclose(ref, logits, atol=1e-4), float((ref - logits).abs().max())
        conn_g[i] = feats[0].numpy()
        conn_c[i] = feats[1].numpy()
        model_full.append(int(logits.argmax()))
        model_col.append(int(logits[colour_ids].argmax()))
        labels.append(lab)
    ans_tok = [int(colour_ids[lab["answer_color"]]) for lab in labels]
    return dict(vit_g=vit_g, conn_g=conn_g, conn_c=conn_c, img_h=img_h, last_h=last_h, labels=labels,
                model_full=np.array(model_full), model_col=np.array(model_col), ans_tok=np.array(ans_tok),
                sat_agree=float(np.mean(sat_agree)))


# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------
def _fit(X: torch.Tensor, y: torch.Tensor, k: int, lam: float, iters: int = 150) -> torch.nn.Linear:
    lin = torch.nn.Linear(X.shape[1], k)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(X), y) + lam * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def probe(Xtr, ytr, gtr, Xte, yte, gte, lams=(1e-4, 1e-3, 1e-2, 1e-1), boot: int = 300, seed: int = 0) -> dict:
    """Multinomial logistic regression. X [N, d] float, y [N] int, g [N] image ids (for the L2 split and
    the bootstrap). Returns held-out accuracy, chance, bootstrap SE and the chosen L2."""
    Xtr = torch.as_tensor(Xtr, dtype=torch.float32)
    Xte = torch.as_tensor(Xte, dtype=torch.float32)
    ytr_np, yte_np = np.asarray(ytr), np.asarray(yte)
    classes = np.unique(ytr_np)
    remap = {c: j for j, c in enumerate(classes)}
    ytr_t = torch.tensor([remap[c] for c in ytr_np])
    k = len(classes)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    # L2 on a split of the training IMAGES
    ug = np.unique(gtr)
    cut = ug[int(len(ug) * 0.8)]
    a, b = torch.from_numpy(gtr < cut), torch.from_numpy(gtr >= cut)
    best = None
    for lam in lams:
        lin = _fit(Xtr[a], ytr_t[a], k, lam)
        with torch.no_grad():
            acc = float((lin(Xtr[b]).argmax(-1) == ytr_t[b]).float().mean())
        if best is None or acc > best[0] + 1e-9:
            best = (acc, lam)
    lin = _fit(Xtr, ytr_t, k, best[1])
    with torch.no_grad():
        pred = classes[lin(Xte).argmax(-1).numpy()]
        train_acc = float((lin(Xtr).argmax(-1) == ytr_t).float().mean())
    correct = (pred == yte_np).astype(np.float64)
    majority = classes[np.bincount(ytr_t.numpy()).argmax()]
    # bootstrap over held-out images
    rng = np.random.default_rng(seed)
    imgs = np.unique(gte)
    per_img = {g: np.nonzero(gte == g)[0] for g in imgs}
    accs = []
    for _ in range(boot):
        pick = rng.choice(imgs, len(imgs))
        idx = np.concatenate([per_img[g] for g in pick])
        accs.append(correct[idx].mean())
    return dict(acc=float(correct.mean()), se=float(np.std(accs)), chance=float((yte_np == majority).mean()),
                n_classes=int(k), l2=float(best[1]), train_acc=train_acc,
                n_train=int(len(ytr_np)), n_test=int(len(yte_np)),
                n_train_images=int(len(ug)), n_test_images=int(len(imgs)))


def token_targets(D: dict) -> dict:
    n = len(D["labels"])
    idx = np.arange(N_TOK)
    row = np.tile(idx // SIDE, n)
    col = np.tile(idx % SIDE, n)
    has = np.concatenate([lab["tok_has"] for lab in D["labels"]])
    color = np.concatenate([lab["tok_color"] for lab in D["labels"]])
    img = np.repeat(np.arange(n), N_TOK)
    return dict(row=row, col=col, has=has, color=color, img=img)


def position_probes(Dtr: dict, Dte: dict, n_layers: int) -> dict:
    ttr, tte = token_targets(Dtr), token_targets(Dte)
    def centred(a):       # minus the mean of the image's 16 tokens: the scene's background removed
        return a - a.mean(1, keepdims=True)

    layers = [("ViT output (connector input), 2x2 mean", Dtr["vit_g"], Dte["vit_g"]),
              ("connector (global view)", Dtr["conn_g"], Dte["conn_g"]),
              ("connector, centred per image", centred(Dtr["conn_g"]), centred(Dte["conn_g"])),
              ("connector (1x1 crop)", Dtr["conn_c"], Dte["conn_c"])]
    layers += [(f"LLM after block {b}", Dtr["img_h"][b], Dte["img_h"][b]) for b in range(n_layers)]
    out = {}
    for name, Ftr, Fte in layers:
        Xtr, Xte = Ftr.reshape(-1, Ftr.shape[-1]), Fte.reshape(-1, Fte.shape[-1])
        res = {}
        for tgt in POS_TARGETS:
            if tgt in ("col", "row", "has_shape"):
                key = {"col": "col", "row": "row", "has_shape": "has"}[tgt]
                mtr, mte = np.ones(len(Xtr), bool), np.ones(len(Xte), bool)
            else:
                key = "color" if tgt == "color" else "col"
                mtr, mte = ttr["has"] == 1, tte["has"] == 1
            res[tgt] = probe(Xtr[mtr], ttr[key][mtr], ttr["img"][mtr], Xte[mte], tte[key][mte], tte["img"][mte])
        out[name] = res
        print(f"  {name:40s} " + "  ".join(f"{t} {100 * res[t]['acc']:.1f}" for t in POS_TARGETS), flush=True)
    return out


def relation_probes(Dtr: dict, Dte: dict, n_layers: int) -> dict:
    ytr = {t: np.array([lab[t] for lab in Dtr["labels"]]) for t in REL_TARGETS}
    yte = {t: np.array([lab[t] for lab in Dte["labels"]]) for t in REL_TARGETS}
    gtr, gte = np.arange(len(Dtr["labels"])), np.arange(len(Dte["labels"]))
    out = {}
    for b in range(n_layers):
        res = {t: probe(Dtr["last_h"][b], ytr[t], gtr, Dte["last_h"][b], yte[t], gte) for t in REL_TARGETS}
        out[f"block {b}"] = res
        print(f"  answer position, block {b}: " + "  ".join(f"{t} {100 * res[t]['acc']:.1f}" for t in REL_TARGETS),
              flush=True)
    # baseline without positions: which colours are present, the anchor colour, the relation (one-hot)
    rels = sorted({lab["relation"] for lab in Dtr["labels"] + Dte["labels"]})

    def nopos(D):
        rows = []
        for lab in D["labels"]:
            v = np.zeros(2 * len(COLORS) + len(rels), np.float32)
            v[lab["present"]] = 1
            v[len(COLORS) + lab["anchor_color"]] = 1
            v[2 * len(COLORS) + rels.index(lab["relation"])] = 1
            rows.append(v)
        return np.stack(rows)

    base = probe(nopos(Dtr), ytr["answer_color"], gtr, nopos(Dte), yte["answer_color"], gte)
    # the exact optimum without positions: uniform over the scene's other colours
    n_other = np.array([len(lab["present"]) - 1 for lab in Dte["labels"]])
    return dict(per_block=out, no_position_baseline=base, uniform_other_scene_colour=float(np.mean(1 / n_other)))


def model_answers(D: dict) -> dict:
    lab = D["labels"]
    ans = np.array([x["answer_color"] for x in lab])
    anc = np.array([x["anchor_color"] for x in lab])
    col = D["model_col"]
    present = [set(x["present"]) for x in lab]
    in_scene = np.array([c in p for c, p in zip(col, present)])
    return dict(n=int(len(lab)), exact_first_token=float((D["model_full"] == D["ans_tok"]).mean()),
                colour_argmax_correct=float((col == ans).mean()),
                colour_argmax_is_anchor=float((col == anc).mean()),
                colour_argmax_other_scene=float((in_scene & (col != ans) & (col != anc)).mean()),
                colour_argmax_absent=float((~in_scene).mean()))


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def fmt(r: dict) -> str:
    return f"{100 * r['acc']:.1f} ±{100 * r['se']:.1f} ({100 * r['chance']:.0f})"


def markdown(res: dict) -> str:
    L = []
    a = res["args"]
    L.append("# Linear probes of the shipped tiny MolmoE on the relation families\n")
    what = ("third build, frozen; it was trained on `shapes.FAMILIES`, i.e. right_color, never on "
            "order_hop/grid_hop" if a["model"] == "assets/tiny_molmoe" else "frozen")
    L.append(f"`bench/tiny_relation_probe.py`, model `{a['model']}` ({what}), max_crops 1, 8 blocks, native "
             f"top_k, float32, CPU ({res['env']['machine']}, {a['threads']} torch threads), "
             f"{res['wall_s']:.0f} s wall. Probe training set: shapes `train` indices 0..{a['n_train'] - 1}; "
             f"held-out: `validation` indices 0..{a['n_test'] - 1} (seed {a['seed']}).\n")
    L.append("    " + res["command"] + "\n")
    L.append("Cells: held-out accuracy % ± bootstrap SE over held-out images (chance = most frequent training "
             "class, in parentheses). Multinomial logistic regression on the standardised feature vector (64-d; 128-d for the ViT output), L2 "
             "picked on a 20% split of the training images.\n")
    for fam, fr in res["families"].items():
        n_tr, n_te = a["n_train"], a["n_test"]
        L.append(f"## {fam}\n")
        L.append(f"{n_tr} training / {n_te} held-out images; token-level probes use 16 tokens per image "
                 f"({16 * n_tr} / {16 * n_te}; cells with a shape only for 'colour' and 'column, shape "
                 f"cells'). Pixel check of the token <-> grid-cell mapping: {100 * fr['pixel_check']:.2f}% of "
                 "tokens agree (saturated pixels in the token's region iff the cell holds a shape).\n")
        L.append("### 1. Position probe (global-view image tokens)\n")
        L.append("| features | column | row | cell holds a shape | shape colour | column, shape cells only |")
        L.append("|---|---|---|---|---|---|")
        for name, r in fr["position"].items():
            L.append(f"| {name} | " + " | ".join(fmt(r[t]) for t in POS_TARGETS) + " |")
        L.append("")
        rp = fr["relation"]
        L.append("### 2. Relation probe (hidden state at the answer position)\n")
        L.append("| after block | answer colour | anchor colour (named in the question) | anchor column | "
                 "answer column |")
        L.append("|---|---|---|---|---|")
        for name, r in rp["per_block"].items():
            L.append(f"| {name.split()[-1]} | " + " | ".join(fmt(r[t]) for t in REL_TARGETS) + " |")
        L.append("")
        b = rp["no_position_baseline"]
        ma = fr["model_answers"]
        L.append(f"- Baseline without positions (probe on: colours present, anchor colour, relation): answer "
                 f"colour {fmt(b)}; exact optimum without positions (uniform over the scene's other colours) "
                 f"{100 * rp['uniform_other_scene_colour']:.1f}%.")
        L.append(f"- The model's own first answer token on the {ma['n']} held-out questions: exact "
                 f"{100 * ma['exact_first_token']:.1f}%; argmax over the six colour tokens: correct "
                 f"{100 * ma['colour_argmax_correct']:.1f}%, the anchor colour {100 * ma['colour_argmax_is_anchor']:.1f}%, "
                 f"another colour of the scene {100 * ma['colour_argmax_other_scene']:.1f}%, a colour not in the "
                 f"scene {100 * ma['colour_argmax_absent']:.1f}%.\n")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/tiny_molmoe")
    ap.add_argument("--families", default="order_hop1,grid_hop1")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from rollout_workers.molmoe import load_molmoe

    t0 = time.time()
    folder = Path(args.model)
    if not folder.is_absolute():
        folder = ROOT / folder
    m = load_molmoe(folder, device="cpu", dtype=torch.float32)
    m.model.eval()
    n_layers = m.model.config.n_layers
    res = {"command": "PYTHONPATH=. python bench/tiny_relation_probe.py " + " ".join(sys.argv[1:]),
           "args": vars(args), "families": {},
           "env": {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__}}
    for fam in args.families.split(","):
        t = time.time()
        Dtr = extract(m, fam, "train", args.n_train, args.seed)
        Dte = extract(m, fam, "validation", args.n_test, args.seed)
        t_feat = time.time() - t
        print(f"{fam}: features of {args.n_train} + {args.n_test} images in {t_feat:.0f} s; pixel check "
              f"{100 * Dte['sat_agree']:.2f}%", flush=True)
        print(" position probe (held-out acc %):", flush=True)
        pos = position_probes(Dtr, Dte, n_layers)
        print(" relation probe (held-out acc %):", flush=True)
        rel = relation_probes(Dtr, Dte, n_layers)
        res["families"][fam] = dict(position=pos, relation=rel, model_answers=model_answers(Dte),
                                    pixel_check=min(Dtr["sat_agree"], Dte["sat_agree"]),
                                    feature_seconds=t_feat, seconds=time.time() - t)
    res["wall_s"] = time.time() - t0
    md = markdown(res)
    print()
    print(md)
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(res, indent=1) + "\n")
    if args.out_md:
        p = Path(args.out_md)
        keep = ""
        if p.is_file():
            old = p.read_text()
            if "\n## Interpretation" in old:
                keep = old[old.index("\n## Interpretation"):]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(md + keep + ("" if keep.endswith("\n") or not keep else "\n"))


if __name__ == "__main__":
    main()
