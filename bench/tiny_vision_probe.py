"""Diagnostic (docs/RESULTS.md): can the tiny shapes ViT + connector learn 'is there a big circle?' from the
global view under DIRECT supervision? Freshly initialised tower, max-pooled connector output, linear head.
    PYTHONPATH=. python bench/tiny_vision_probe.py conn
"""
import sys, time, torch, numpy as np, torch.nn.functional as F
torch.set_num_threads(2); torch.manual_seed(0)
sys.path.insert(0, "jobs"); sys.path.insert(0, ".")
from build_tiny_model import tiny_shapes_config, build_shapes_tokenizer, init_weights, Layouts
from rollout_workers.molmoe import MolmoeModel, MolmoPreprocessor
from shared import shapes
cfg = tiny_shapes_config(); tok = build_shapes_tokenizer(); pre = MolmoPreprocessor(cfg, tok)
m = MolmoeModel(cfg); init_weights(m, 0); lay = Layouts(pre, "cpu")
mode = sys.argv[1]  # "vit" (mean-pooled raw ViT feats) or "conn" (connector output)
head = torch.nn.Linear(cfg.image_feature_dim if mode=="vit" else cfg.d_model, 2)
params = list(m.vision.parameters()) + list(m.connector.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=2e-3)
def batch(start, n, split="train"):
    its = [shapes.render_item(i*6+1, split, 0) for i in range(start, start+n)]
    imgs = torch.from_numpy(np.stack([i[0] for i in its])); y = torch.tensor([i[2][0]=="yes" for i in its]).long()
    return lay.crops(imgs, 1)[:, 0], y    # global crop only
def feats(c):
    if mode == "conn":
        f = m.encode_images(c, lay.t[1]["masks"][:1].repeat(c.shape[0], 1)); return f.max(1).values
    x = c; n = x.shape[0]; s=cfg.crop_patches; p=cfg.patch_size_px
    px = x.view(n, s, s, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(n, 3, s*p, s*p)
    h = m.vision.pre_layrnorm(m.vision.embeddings(px))
    for l in m.vision.encoder.layers: h = l(h, None); h = h[0] if isinstance(h, tuple) else h
    return torch.cat([h, h], -1)[:, 1:].max(1).values
vx, vy = batch(0, 300, "validation")
t=time.time()
for step in range(1500):
    c, y = batch(step*32, 32)
    loss = F.cross_entropy(head(feats(c)), y)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 250 == 249:
        with torch.no_grad(): acc = (head(feats(vx)).argmax(-1) == vy).float().mean().item()
        print(mode, step+1, "loss %.3f" % loss.item(), "val acc %.3f" % acc, "%.0fs" % (time.time()-t), flush=True)
