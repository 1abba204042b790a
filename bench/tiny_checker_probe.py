"""Diagnostic (third build, docs/RESULTS.md): can the tiny shapes ViT + connector learn the checker
families under direct supervision, and only from crops at full scale?

A freshly initialised vision tower + connector (tiny_shapes_config) reads every crop of a max_crops
tier; a learned-query attention pool over all image tokens (what one LLM attention layer can do) and a
linear head answer "What color is the checkered shape?" (6 colours) or "Is any shape checkered?"
(checker_count > 0). Trained separately per tier on the same scenes; held-out accuracy per tier.

    PYTHONPATH=. python bench/tiny_checker_probe.py --task color --seconds 150 --tiers 9,1
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, "jobs")
sys.path.insert(0, ".")
from build_tiny_model import Layouts, build_shapes_tokenizer, init_weights, tiny_shapes_config  # noqa: E402
from rollout_workers.molmoe import MolmoeModel, MolmoPreprocessor  # noqa: E402
from shared import shapes  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--task", default="color", choices=["color", "exists"])
ap.add_argument("--tiers", default="9,1")
ap.add_argument("--seconds", type=float, default=150)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--val", type=int, default=300)
args = ap.parse_args()
torch.set_num_threads(args.threads)
cfg = tiny_shapes_config()
pre = MolmoPreprocessor(cfg, build_shapes_tokenizer())
colors = list(shapes.COLORS)
fam = "checker_color" if args.task == "color" else "checker_count"


def data(start, n, split):
    its = [shapes.render_item(i, split, 0, family=fam) for i in range(start, start + n)]
    imgs = torch.from_numpy(np.stack([i[0] for i in its]))
    if args.task == "color":
        y = torch.tensor([colors.index(i[2][0]) for i in its])
    else:
        y = torch.tensor([i[2][0] != "0" for i in its]).long()
    return imgs, y


out = {}
for mc in [int(t) for t in args.tiers.split(",")]:
    torch.manual_seed(0)
    m = MolmoeModel(cfg)
    init_weights(m, 0)
    lay = Layouts(pre, "cpu")
    q = torch.nn.Parameter(torch.zeros(cfg.d_model))
    head = torch.nn.Linear(cfg.d_model, len(colors) if args.task == "color" else 2)
    params = list(m.vision.parameters()) + list(m.connector.parameters()) + list(head.parameters()) + [q]
    opt = torch.optim.AdamW(params, lr=2e-3)
    masks = lay.t[mc]["masks"]

    def forward(imgs):
        c = lay.crops(imgs, mc)
        B, n = c.shape[:2]
        f = m.encode_images(c.reshape(B * n, *c.shape[2:]), masks.repeat(B, 1)).reshape(B, -1, cfg.d_model)
        w = torch.softmax(f @ q / cfg.d_model ** 0.5, 1)
        return head((w[..., None] * f).sum(1))

    vx, vy = data(0, args.val, "validation")
    t0, step, curve = time.time(), 0, []
    while time.time() - t0 < args.seconds:
        x, y = data(step * args.batch, args.batch, "train")
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            with torch.no_grad():
                acc = float((forward(vx).argmax(-1) == vy).float().mean())
            curve.append((step, round(acc, 3)))
            print(f"max_crops {mc} step {step} loss {float(loss):.3f} val acc {acc:.3f} {time.time() - t0:.0f}s", flush=True)
    with torch.no_grad():
        acc = float((forward(vx).argmax(-1) == vy).float().mean())
    chance = float(max(np.bincount(vy.numpy())) / len(vy))
    out[mc] = {"steps": step, "samples": step * args.batch, "val_acc": acc, "majority": chance, "curve": curve}
    print(f"max_crops {mc}: {step} steps x {args.batch}, held-out acc {acc:.3f} (majority class {chance:.3f})", flush=True)
print(json.dumps({"task": args.task, "tiers": out}))
