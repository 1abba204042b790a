"""Train the embedded tiny MolmoE on the shapes question set (issue 6 point 2, DESIGN.md section 8).

    PYTHONPATH=. python jobs/build_tiny_model.py --device cuda --out assets/tiny_molmoe --steps 4600 --minutes 8.0

`--steps N` fixes the schedule (exact rebuilds); `--minutes` is then only a wall-clock guard that ends
training early (recorded as "stopped_early" in build_info.json). Without `--steps` the step count is set
from the measured speed after 70 steps so that training fills `--minutes`.

Same model code as the full MolmoE (rollout_workers/molmoe), small sizes: a 3-block ViT (64 wide) over
112-px crops, 8 LLM blocks (64 wide) of 8 experts (width 128) with native top-4. Written in the hub
layout that `load_molmoe` reads (weights in bfloat16), with its own tokenizer (a byte-level BPE of the
shipped tiny tokenizer's shape whose merges are learned on the shapes prompts, so every answer is one
or two tokens) and `knobs.json` (the knob ranges; also in jobs/configs/tiny_model.yaml).

Training (teacher-forced next-token loss on the answer tokens + EOS) draws the knobs per batch as a
request would see them, so reduced settings degrade gracefully rather than collapse:
  - tier -> max_crops in {1, 4, 9} (the crops are cut on the GPU, bit-compatible with MolmoPreprocessor);
  - p in the insertion positions, num_blocks in the feasible options; blocks 0..p-1 always run, then
    (num_blocks - p) of the rest: half the time the first ones, half a random subset (importance
    scores are computed after training, so every order must work);
  - top_k in {1, 2, 4} for the blocks >= p (the prefix keeps native top-4);
  - a quarter of the batches run full compute.
Experiments can restrict the families (`--families`), weight a family's loss by depth (`--depth-families`),
or put a slow-to-learn family first (`--lead-families`, `--lead-steps`, `--lead-frac`, `--lead-full-depth`:
a curriculum over time; `--lead-until` ends it once the family is learned). These are off by default.
`--deterministic` makes GPU builds bit-identical. The shipped model's command is in its MODEL_CARD.md.
A Switch-style load-balancing loss keeps all experts in use. Batches of one tier share one image
layout, so sequences differ only in the question and are right-padded (causal attention: padding at
the end never reaches a real position).

Accuracy is reported as greedy exact match, computed teacher-forced (every answer token and EOS is
the argmax), which is what greedy decoding returns.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rollout_workers.molmoe import MolmoeConfig, MolmoeModel, MolmoPreprocessor, MolmoTokenizer, save_checkpoint  # noqa: E402
from shared import shapes  # noqa: E402

KNOBS = {
    "tier_names": ["low", "mid", "high"],
    "tier_max_crops": [1, 4, 9],
    "insertion_positions": [1, 2, 3],
    "top_k_options": [1, 2, 4],
    "num_blocks_options": [2, 3, 4, 6, 8],
}


def tiny_shapes_config() -> MolmoeConfig:
    return MolmoeConfig.tiny(
        d_model=64, n_layers=8, n_heads=4, n_kv_heads=4, expert_hidden_size=128, num_experts=8, top_k=4,
        vit_hidden_size=64, vit_num_layers=3, vit_num_heads=4, vit_head_dim=16, vit_mlp_size=256,
        vit_layers=(-1, -2), max_crops=9, name="tiny_shapes")


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
# The merges are learned on these families' questions (shapes.FAMILIES of the third build), so families
# added later (code_hop1) do not change the shipped tokenizer; their words are in it already.
TOKENIZER_FAMILIES = ("large_color", "large_count_color", "checker_color", "checker_count", "more_color",
                      "right_color")


def build_shapes_tokenizer(vocab_size: int = 448) -> MolmoTokenizer:
    """The tiny tokenizer's layout (EOS 0, pad 1, 256 bytes, merges up to 448, the five image tokens at
    448..452) with merges learned on the shapes prompts and answers first, then the tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from rollout_workers.molmoe.config import EOS_TOKEN, IMAGE_SPECIAL_TOKENS, PAD_TOKEN
    from rollout_workers.molmoe.tokenizer import _tiny_corpus

    qs, ans = set(), set()
    for i in range(600):
        _, q, a, _ = shapes.render_item(i, "train", 0, family=TOKENIZER_FAMILIES[i % len(TOKENIZER_FAMILIES)])
        qs.add(q)
        ans.update(a)
    for fam in shapes.AUX_FAMILIES:
        for i in range(60):
            _, q, a, _ = shapes.render_item(i, "train", 0, family=fam)
            qs.add(q)
            ans.update(a)
    lines = [f" User: {q} Assistant: {a}" for q in sorted(qs) for a in sorted(ans)] * 20
    lines += [" ".join(str(i) for i in range(10))] * 50
    lines += _tiny_corpus()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                  min_frequency=1)
    tok.train_from_iterator(lines, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"shapes tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    tok.add_special_tokens(list(IMAGE_SPECIAL_TOKENS))
    return MolmoTokenizer(tok)


# ----------------------------------------------------------------------------------------------
# Data: scenes rendered by worker processes, crops cut on the device
# ----------------------------------------------------------------------------------------------
class SceneBatches(torch.utils.data.IterableDataset):
    """Batch `step` holds train samples step*B .. step*B+B-1 (deterministic; workers split the steps)."""

    def __init__(self, batch: int, steps: int, seed: int, start_step: int = 0, aux_frac: float = 0.0,
                 families: tuple[str, ...] = (), lead: tuple[str, ...] = (), lead_steps: int = 0,
                 lead_frac: float = 0.0):
        self.batch, self.steps, self.seed, self.start = batch, steps, seed, start_step
        self.aux_frac, self.families = aux_frac, tuple(families)
        self.lead, self.lead_steps, self.lead_frac = tuple(lead), int(lead_steps), float(lead_frac)

    def family(self, i: int):
        """None (the set's own cycle), a restricted family, a training-only auxiliary one, or, in the first
        `lead_steps` steps, a lead family for a `lead_frac` share of the samples (a curriculum over time)."""
        u = ((i * 2654435761 + 12345) % 2**32) / 2**32
        if u < self.aux_frac:
            return shapes.AUX_FAMILIES[i % len(shapes.AUX_FAMILIES)]
        if self.lead and i // self.batch < self.lead_steps:
            v = ((i * 2246822519 + 3266489917) % 2**32) / 2**32
            if v < self.lead_frac:
                return self.lead[(i // 7) % len(self.lead)]
        if self.families:
            return self.families[(i // 7) % len(self.families)]
        return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + wid, self.steps, nw):
            imgs, qs, ans, fams = [], [], [], []
            for i in range(step * self.batch, (step + 1) * self.batch):
                img, q, a, fam = shapes.render_item(i, "train", self.seed, family=self.family(i))
                imgs.append(img)
                qs.append(q)
                ans.append(a[0])
                fams.append(fam)
            yield step, torch.from_numpy(np.stack(imgs)), qs, ans, fams


class Layouts:
    """Per max_crops: the token template, image_input_idx and masks shared by every 224-px scene."""

    def __init__(self, pre: MolmoPreprocessor, device):
        self.pre, self.cfg, self.device = pre, pre.config, device
        blank = np.full((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), 255, np.uint8)
        self.t = {}
        for mc in KNOBS["tier_max_crops"]:
            inp = pre.preprocess("x", blank, max_crops=mc)
            n_img = 1 + inp.num_image_tokens                       # BOS + image tokens
            self.t[mc] = dict(prefix=inp.input_ids[:n_img].to(device), idx=inp.image_input_idx.to(device),
                              masks=inp.image_masks.to(device), tiling=inp.tiling, n_crops=inp.num_crops)
        mean = torch.tensor(self.cfg.image_mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.image_std, device=device).view(1, 3, 1, 1)
        self.mean, self.std = mean, std

    def crops(self, imgs_u8: torch.Tensor, mc: int) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised patches [B, n_crops, 64, 588] exactly as image_to_crops."""
        cfg = self.cfg
        x = imgs_u8.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        crop, p = cfg.crop_size_px, cfg.patch_size_px
        win = (cfg.crop_patches - sum(cfg.overlap_margins)) * p
        margin = p * sum(cfg.overlap_margins)

        def rs(size):
            y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            return (y.clamp(0.0, 1.0) - self.mean) / self.std

        rows, cols = self.t[mc]["tiling"]
        big = rs(rows * win + margin)
        parts = [rs(crop)] + [big[:, :, i * win:i * win + crop, j * win:j * win + crop]
                              for i in range(rows) for j in range(cols)]
        c = torch.stack(parts, 1)                                   # [B, n, 3, crop, crop]
        B, n, s = c.shape[0], c.shape[1], crop // p
        c = c.view(B, n, 3, s, p, s, p).permute(0, 1, 3, 5, 4, 6, 2)  # B n h w dh dw c
        return c.reshape(B, n, s * s, p * p * 3)


def encode_text(tok: MolmoTokenizer, cache: dict, q: str, a: str | None):
    key = (q, a)
    if key not in cache:
        prompt = tok.encode(" User: " + q + " Assistant:")
        answer = [] if a is None else tok.encode(" " + a) + [tok.eos_id]
        cache[key] = (prompt, answer)
    return cache[key]


def make_batch(lay: Layouts, tok, cache, imgs, qs, ans, mc: int):
    """input ids [B, T], targets [B, T] (-100 except answer/EOS positions), crops."""
    t = lay.t[mc]
    prefix = t["prefix"].tolist()
    seqs, tgts = [], []
    for q, a in zip(qs, ans):
        prompt, answer = encode_text(tok, cache, q, a)
        ids = prefix + prompt + answer
        tgt = [-100] * len(ids)
        start = len(prefix) + len(prompt)          # logits at position j predict ids[j + 1]
        for j, tid in enumerate(answer):
            tgt[start - 1 + j] = tid
        seqs.append(ids)
        tgts.append(tgt)
    T = max(len(s) for s in seqs)
    pad = tok.pad_id if tok.pad_id is not None else 1
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    tg = torch.tensor([s + [-100] * (T - len(s)) for s in tgts])
    return ids.to(lay.device), tg.to(lay.device), lay.crops(imgs, mc)


# ----------------------------------------------------------------------------------------------
# Batched forward with knobs (the same modules as MolmoeModel.run_blocks)
# ----------------------------------------------------------------------------------------------
class RouterProbe:
    """Collects router probabilities of the executed blocks for the load-balancing loss."""

    def __init__(self, model: MolmoeModel):
        self.items = []
        self.on = False
        for layer in model.layers:
            layer.mlp.gate.register_forward_hook(self._hook)

    def _hook(self, module, inputs, outputs):
        if self.on:
            logits, _, idx = outputs
            self.items.append((torch.softmax(logits.float(), -1), idx, module.num_experts))

    def loss(self) -> torch.Tensor:
        out = 0.0
        for probs, idx, E in self.items:
            frac = F.one_hot(idx, E).float().sum(1).mean(0) / idx.shape[1]
            out = out + E * (frac * probs.mean(0)).sum()
        self.items = []
        return out / 8.0


def forward_batch(model: MolmoeModel, lay: Layouts, ids, crops, mc, block_ids, top_k_map):
    cfg = model.config
    t = lay.t[mc]
    B, n = crops.shape[:2]
    feats = model.encode_images(crops.reshape(B * n, *crops.shape[2:]), t["masks"].repeat(B, 1))
    feats = feats.reshape(B, n * cfg.tokens_per_crop, -1)
    idx = t["idx"].reshape(-1)
    valid = idx >= 0
    x = model.llm.model.embed_tokens(ids)
    x = x.index_add(1, idx[valid], feats[:, valid].to(x.dtype))
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    llm = model.llm.model
    pe = llm.rotary_emb(x, pos)
    saved = {}
    try:
        for b, k in top_k_map.items():
            saved[b] = model.layers[b].mlp.gate.top_k
            model.layers[b].mlp.gate.top_k = k
        for b in block_ids:
            out = llm.layers[b](x, attention_mask=None, position_ids=pos, use_cache=False, position_embeddings=pe)
            x = out[0] if isinstance(out, tuple) else out
    finally:
        for b, k in saved.items():
            model.layers[b].mlp.gate.top_k = k
    return model.llm.lm_head(llm.norm(x))


def draw_knobs(rng: random.Random, L: int, native: int, full_frac: float, tiers=None, block_weights=None):
    """block_weights: {num_blocks: weight} for the num_blocks draw (None: uniform over the feasible
    options, the third build's draw)."""
    tiers = tiers or KNOBS["tier_max_crops"]
    if rng.random() < full_frac:
        return tiers[-1], list(range(L)), {}
    mc = rng.choice(tiers)
    p = rng.choice(KNOBS["insertion_positions"])
    feasible = [b for b in KNOBS["num_blocks_options"] if p < b <= L]
    if block_weights:
        nb = rng.choices(feasible, weights=[block_weights.get(b, 1.0) for b in feasible])[0]
    else:
        nb = rng.choice(feasible)
    k = rng.choice(KNOBS["top_k_options"])
    rest = list(range(p, L))
    chosen = rest[: nb - p] if rng.random() < 0.5 else sorted(rng.sample(rest, nb - p))
    blocks = list(range(p)) + chosen
    return mc, blocks, {b: k for b in blocks if b >= p}


# ----------------------------------------------------------------------------------------------
# Evaluation (teacher-forced greedy exact match, batched)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, lay, tok, cache, items, settings, amp, batch=200):
    """settings: {name: (max_crops, block_ids, top_k_map)} -> {name: {family: acc, "all": acc}}."""
    model.eval()
    out = {}
    for name, (mc, blocks, kmap) in settings.items():
        correct: dict[str, list[float]] = {}
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            imgs = torch.from_numpy(np.stack([c[0] for c in chunk]))
            ids, tg, crops = make_batch(lay, tok, cache, imgs, [c[1] for c in chunk], [c[2][0] for c in chunk], mc)
            with amp():
                logits = forward_batch(model, lay, ids, crops, mc, blocks, kmap)
            pred = logits.argmax(-1)
            mask = tg != -100
            ok = ((pred == tg) | ~mask).all(1).float().tolist()
            for c, v in zip(chunk, ok):
                correct.setdefault(c[3], []).append(v)
        res = {f: float(np.mean(v)) for f, v in sorted(correct.items())}
        res["all"] = float(np.mean([v for vs in correct.values() for v in vs]))
        out[name] = res
    model.train()
    return out


def init_weights(model: MolmoeModel, seed: int) -> None:
    """N(0, 0.02)-style init of the tiny model (transformers' init), routers small, norms 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layer_norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif "gate_up_proj" in name or "down_proj" in name:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                std = 0.02 if ("embed" in name or "embedding" in name) else 1 / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


# arguments that may differ between the calls of one build split by --state / --resume
# (the rendering workers only prefetch: batches arrive in step order whatever their number; the CPU thread
# count stays fixed, since it changes float reductions on the CPU)
_RUN_ONLY_ARGS = {"state", "resume", "pause_step", "minutes", "out", "workers", "stop_step", "final_eval",
                  "eval_every"}


def save_train_state(path: Path, args, next_step: int, model, opt, rng, lead_end: int, history, ema,
                     train_s: float) -> None:
    """Everything the next step depends on (weights, optimizer, RNGs, the lead switch), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": next_step, "model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized()
             else None,
             "lead_end": lead_end, "history": history, "ema": ema, "train_s": train_s,
             "args": {k: v for k, v in vars(args).items() if k not in _RUN_ONLY_ARGS}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_train_state(path: Path, args) -> dict:
    """The state saved by save_train_state; refuses one saved with other training arguments."""
    if not path.is_file():
        raise SystemExit(f"--resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)   # RNG states must stay on the CPU
    except Exception as e:                                  # truncated or not a torch file
        raise SystemExit(f"--resume: {path} is not a readable training state ({type(e).__name__}: {e})")
    if not isinstance(state, dict) or "args" not in state or "step" not in state:
        raise SystemExit(f"--resume: {path} is not a training state written by build_tiny_model.py")
    mine = {k: v for k, v in vars(args).items() if k not in _RUN_ONLY_ARGS}
    diff = sorted(k for k in set(mine) | set(state["args"]) if mine.get(k) != state["args"].get(k))
    if diff:
        raise SystemExit("--resume: the state was saved with other training arguments: "
                         + ", ".join(f"{k} {state['args'].get(k)!r} there vs {mine.get(k)!r} here" for k in diff))
    return state


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "tiny_molmoe"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=0, help="training steps (0 = as many as fit in --minutes)")
    ap.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget for the training loop")
    ap.add_argument("--stop-step", type=int, default=0,
                    help="end training before this step of the --steps schedule (reproduces a build that the "
                         "wall-clock guard stopped: its lr schedule still spans --steps)")
    ap.add_argument("--state", default="",
                    help="training-state file: with it, the wall-clock guard and --pause-step save the state there "
                         "and exit instead of ending training, and --resume continues from it (a build split over "
                         "several calls gives the same weights as one run)")
    ap.add_argument("--pause-step", type=int, default=0, help="with --state: save the state before this step and exit")
    ap.add_argument("--resume", action="store_true", help="continue the build saved in --state (same arguments)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--full-frac", type=float, default=0.25)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--eval-samples", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--aux-frac", type=float, default=0.0,
                    help="fraction of training questions replaced by the training-only shape-naming "
                         "families (shapes.AUX_FAMILIES)")
    ap.add_argument("--families", default="", help="comma list: train only these families (experiments)")
    ap.add_argument("--tiers", default="", help="comma list of max_crops to train with (experiments)")
    ap.add_argument("--block-weights", default="",
                    help="comma list of weights for num_blocks_options in the training draw "
                         f"({KNOBS['num_blocks_options']}; empty = uniform), e.g. 1,1,1,2,4 to favour depth")
    ap.add_argument("--depth-families", default="",
                    help="comma list of families whose loss is weighted by --depth-weights (a depth curriculum)")
    ap.add_argument("--depth-weights", default="",
                    help="comma list of loss weights for the --depth-families samples of a batch that runs "
                         f"{KNOBS['num_blocks_options']} blocks, e.g. 0.1,0.2,0.35,1,1")
    ap.add_argument("--lead-families", default="",
                    help="comma list of families that take a --lead-frac share of the samples in the first "
                         "--lead-steps steps (a curriculum over time, e.g. a slow-to-learn lookup first)")
    ap.add_argument("--lead-steps", type=int, default=0)
    ap.add_argument("--lead-frac", type=float, default=0.0)
    ap.add_argument("--lead-full-depth", action="store_true",
                    help="run every batch of the first --lead-steps steps at full compute")
    ap.add_argument("--lead-until", type=float, default=0.0,
                    help="end the lead early, at the first check where the lead families reach this accuracy at "
                         "full compute (0 = always run --lead-steps steps)")
    ap.add_argument("--lead-check-every", type=int, default=100, help="steps between --lead-until checks")
    ap.add_argument("--lead-check-samples", type=int, default=200,
                    help="held-out lead-family questions per --lead-until check (validation split, disjoint "
                         "from the reported validation questions)")
    ap.add_argument("--final-eval", default="grid", choices=["grid", "short"])
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True) (CUBLAS_WORKSPACE_CONFIG=:4096:8): bit-identical "
                         "rebuilds on the same GPU type (~1.3x slower per step on an H100); an op without a deterministic "
                         "kernel raises when first called")
    args = ap.parse_args(argv)
    if (args.resume or args.pause_step) and not args.state:
        raise SystemExit("--resume and --pause-step need --state FILE")
    if args.state and not args.steps:
        raise SystemExit("--state needs --steps: a paused build resumes on a fixed schedule")
    if args.deterministic:
        # must be set before the first cuBLAS call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    t0 = time.time()
    cfg = tiny_shapes_config()
    tok = build_shapes_tokenizer()
    tok.check_matches(cfg)
    pre = MolmoPreprocessor(cfg, tok)
    model = MolmoeModel(cfg)
    init_weights(model, args.seed)
    model.to(device).train()
    lay = Layouts(pre, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; device {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})", flush=True)

    # the device-side crops must equal the preprocessor's
    for i in range(2):
        img, q, _, _ = shapes.render_item(i, "validation", args.seed)
        for mc in KNOBS["tier_max_crops"]:
            ref = pre.preprocess(q, img, max_crops=mc).images
            got = lay.crops(torch.from_numpy(img[None]), mc)[0].cpu()
            err = float((ref - got).abs().max())
            if err > 1e-3:
                raise AssertionError(f"device crops differ from MolmoPreprocessor by {err} at max_crops {mc}")

    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    probe = RouterProbe(model)
    val_items = [shapes.render_item(i, "validation", args.seed) for i in range(args.eval_samples)]
    cache: dict = {}
    L = cfg.n_layers
    full = (KNOBS["tier_max_crops"][-1], list(range(L)), {})
    cheap = (KNOBS["tier_max_crops"][0], [0, 1], {1: 1})

    max_steps = args.steps or 10**7
    fams = tuple(f for f in args.families.split(",") if f)
    tiers = [int(t) for t in args.tiers.split(",") if t] or None
    bw = [float(w) for w in args.block_weights.split(",") if w]
    if bw and len(bw) != len(KNOBS["num_blocks_options"]):
        raise SystemExit(f"--block-weights needs {len(KNOBS['num_blocks_options'])} weights")
    block_weights = dict(zip(KNOBS["num_blocks_options"], bw)) or None
    depth_fams = {f for f in args.depth_families.split(",") if f}
    dw = [float(w) for w in args.depth_weights.split(",") if w]
    if depth_fams and len(dw) != len(KNOBS["num_blocks_options"]):
        raise SystemExit(f"--depth-weights needs {len(KNOBS['num_blocks_options'])} weights")
    depth_weights = dict(zip(KNOBS["num_blocks_options"], dw))
    if fams:
        # families outside shapes.FAMILIES (e.g. shapes.ORDER_FAMILIES) are rendered on purpose
        val_items = [shapes.render_item(i, "validation", args.seed, family=fams[i % len(fams)])
                     for i in range(args.eval_samples)]
    lead = tuple(f for f in args.lead_families.split(",") if f)
    if lead and not (args.lead_steps > 0 and 0.0 < args.lead_frac <= 1.0):
        raise SystemExit("--lead-families needs --lead-steps > 0 and 0 < --lead-frac <= 1")
    unknown = [f for f in lead if f not in shapes.FAMILY_NAMES]
    if unknown:
        raise SystemExit(f"unknown --lead-families {unknown}; known: {sorted(shapes.FAMILY_NAMES)}")
    if args.lead_until and not lead:
        raise SystemExit("--lead-until needs --lead-families")

    def make_loader(start_step: int, lead_steps: int):
        """Batches start_step.. of the stream; the lead share applies to steps < lead_steps."""
        return torch.utils.data.DataLoader(SceneBatches(args.batch, max_steps, args.seed, start_step=start_step,
                                                        aux_frac=args.aux_frac, families=fams, lead=lead,
                                                        lead_steps=lead_steps, lead_frac=args.lead_frac),
                                           batch_size=None, num_workers=args.workers,
                                           pin_memory=device.type == "cuda",
                                           prefetch_factor=8 if args.workers else None, persistent_workers=False)

    # --lead-until: the lead ends at the first check where the lead families, at full compute, reach that
    # accuracy (at the latest after --lead-steps); the data stream then restarts at the next step without the
    # lead share, so the switch is deterministic given the training (--deterministic)
    lead_end = args.lead_steps
    lead_val = [shapes.render_item(100_000 + i, "validation", args.seed, family=lead[i % len(lead)])
                for i in range(args.lead_check_samples)] if args.lead_until else []
    rng = random.Random(args.seed)
    budget_s = args.minutes * 60
    planned = args.steps
    history = []
    step = 0
    start_step = 0
    ema = None
    stopped_early = False
    train_s_before = 0.0                         # training seconds of the earlier calls of a resumed build
    if args.resume:
        state = load_train_state(Path(args.state), args)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_step, lead_end, history, ema = state["step"], state["lead_end"], state["history"], state["ema"]
        train_s_before = state["train_s"]
        step = start_step - 1
        print(f"resumed from {args.state} at step {start_step} (lead ends at {lead_end})", flush=True)
    loader = make_loader(start_step, lead_end)
    t_train = time.time()
    batches = iter(loader)
    while True:
        try:
            step_idx, imgs, qs, ans, batch_fams = next(batches)
        except StopIteration:
            break
        if args.stop_step and step_idx >= args.stop_step:
            print(f"--stop-step: stopping at step {step_idx} of {args.steps}", flush=True)
            stopped_early = True
            break
        elapsed = time.time() - t_train
        pause = args.pause_step and step_idx >= args.pause_step
        if args.state and (pause or elapsed > budget_s):
            save_train_state(Path(args.state), args, step_idx, model, opt, rng, lead_end, history, ema,
                             train_s_before + elapsed)
            print(f"paused before step {step_idx} of {args.steps} after {elapsed:.0f}s: state in {args.state} "
                  f"(continue with the same arguments and --resume)", flush=True)
            return 0
        if args.steps and elapsed > budget_s:
            # --steps fixes the schedule; --minutes is then a guard (the GPU call has a hard limit)
            print(f"wall-clock guard: stopping at step {step_idx} of {args.steps} after {elapsed:.0f}s", flush=True)
            stopped_early = True
            break
        step = step_idx
        if not args.steps and step == 20:
            t20 = time.time()
        if not args.steps and step == 70:
            # fix the schedule length from the measured speed (recorded for exact rebuilds: --steps)
            per_step = (time.time() - t20) / 50
            planned = 70 + int((budget_s - elapsed) / per_step)
            print(f"{per_step * 1e3:.1f} ms/step -> {planned} steps in {args.minutes} min", flush=True)
        horizon = planned or 10**9
        if step >= horizon:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if planned:
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / horizon)))
        for g in opt.param_groups:
            g["lr"] = lr
        full_frac = 1.0 if args.lead_full_depth and step < lead_end else args.full_frac
        mc, blocks, kmap = draw_knobs(rng, L, cfg.top_k, full_frac, tiers, block_weights)
        ids, tg, crops = make_batch(lay, tok, cache, imgs, qs, ans, mc)
        probe.on = True
        with amp():
            logits = forward_batch(model, lay, ids, crops, mc, blocks, kmap)
            if depth_fams:
                # depth curriculum: the --depth-families samples count with the weight of this batch's depth
                ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tg.reshape(-1),
                                     ignore_index=-100, reduction="none").view(tg.shape)
                w = torch.tensor([depth_weights[len(blocks)] if f in depth_fams else 1.0 for f in batch_fams],
                                 device=ce.device)[:, None]
                mask = (tg != -100).float()
                loss = (ce * mask * w).sum() / mask.sum().clamp(min=1.0)
            else:
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tg.reshape(-1), ignore_index=-100)
        aux = probe.loss()
        probe.on = False
        opt.zero_grad(set_to_none=True)
        (loss + args.aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss)
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % 100 == 0:
            print(f"step {step} loss {lv:.3f} (ema {ema:.3f}) aux {float(aux):.3f} lr {lr:.2e} "
                  f"t {time.time() - t_train:.0f}s", flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            r = evaluate(model, lay, tok, cache, val_items[:600], {"full": full, "cheap": cheap}, amp)
            history.append({"step": step, **{k: v["all"] for k, v in r.items()},
                            "families": {k: {f: round(a, 3) for f, a in v.items()} for k, v in r.items()}})
            print(f"  eval step {step}: full {r['full']['all']:.3f} cheap {r['cheap']['all']:.3f} "
                  f"{json.dumps({k: round(v, 2) for k, v in r['full'].items()})} "
                  f"cheap {json.dumps({k: round(v, 2) for k, v in r['cheap'].items()})}", flush=True)
        if lead_val and step + 1 < lead_end and (step + 1) % args.lead_check_every == 0:
            acc = evaluate(model, lay, tok, cache, lead_val, {"full": full}, amp)["full"]["all"]
            print(f"  lead check step {step + 1}: {'+'.join(lead)} at full compute {acc:.3f}", flush=True)
            if acc >= args.lead_until:
                lead_end = step + 1
                print(f"  lead ends at step {lead_end}", flush=True)
                del batches, loader               # its workers rendered batches ahead with the lead share
                loader = make_loader(lead_end, lead_end)
                batches = iter(loader)
    train_s = train_s_before + time.time() - t_train
    print(f"trained {step + 1} steps x {args.batch} in {train_s:.0f}s", flush=True)

    # final evaluation on the bf16-rounded weights that ship
    model.set_dtypes(torch.bfloat16, vision_dtype=torch.bfloat16)
    model.set_dtypes(torch.float32, vision_dtype=torch.float32)
    settings = {"full": full, "cheap": cheap}
    if args.final_eval == "short":
        settings.update({"mc1_nb8": (1, list(range(L)), {}), "mc4_nb8": (4, list(range(L)), {}),
                         "mc9_nb2": (9, [0, 1], {}), "mc1_nb2": (1, [0, 1], {})})
    for mc in (KNOBS["tier_max_crops"] if args.final_eval == "grid" else []):
        for k in KNOBS["top_k_options"]:
            for nb in (2, 3, 4, 6, 8):
                settings[f"mc{mc}_k{k}_nb{nb}"] = (mc, list(range(nb)), {b: k for b in range(1, nb)})
    final = evaluate(model, lay, tok, cache, val_items, settings, amp)
    for name, r in final.items():
        print(f"  final {name}: {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.set_dtypes(torch.bfloat16, vision_dtype=torch.bfloat16)
    save_checkpoint(model.cpu(), out, tok, max_shard_bytes=16 * 2**20)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    knobs = dict(KNOBS, num_layers=L, num_experts=cfg.num_experts, native_top_k=cfg.top_k)
    (out / "knobs.json").write_text(json.dumps(knobs, indent=2))
    (out / "build_info.json").write_text(json.dumps({
        "command": "PYTHONPATH=. python jobs/build_tiny_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "steps": step + 1, "planned_steps": planned, "samples": (step + 1) * args.batch,
        "stopped_early": stopped_early, "resumed": bool(args.resume), "lead_end_step": lead_end if lead else None,
        "families": list(dict.fromkeys(fams or shapes.FAMILIES)), "aux_families": list(shapes.AUX_FAMILIES),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1), "device": dev_name,
        "torch": torch.__version__, "parameters": n_params, "history": history,
        "validation_accuracy": final, "validation_samples": len(val_items),
        "note": "validation = teacher-forced greedy exact match on the shapes 'validation' split, bf16 weights",
    }, indent=2))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.2f} MiB) in {time.time() - t0:.0f}s total", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
