"""Can the tiny MolmoE's LLM learn an in-context lookup at all? A text-only check (issue 6, per-family gain).

The code_hop families (shared/shapes.py CODE_FAMILIES) stayed at chance in a 617k-question GPU build, as
every family that needs attention to a position relative to another token did (docs/RESULTS.md). This probe
takes the image out: the shipped tiny model's LLM configuration (assets/tiny_molmoe/config.json through
`olmoe_config`, the same transformers OLMoE blocks: 8 blocks 64 wide, 4 heads of 16, QK-norm, 8 experts top-4) is trained from scratch
on token sequences

    c_a is d_a , c_b is d_b , c_c is d_c , c_d is d_d . c_q ?   ->  d_q

(four of six colour tokens, the numbers 1-4 permuted, c_q one of the four; chance 25%), loss on the answer
only, under variants that isolate the suspects:
  - as built: full depth, top_k 4;
  - random depth: per batch blocks and top_k drawn as `jobs/build_tiny_model.py` draws them (its draw_knobs);
  - QK-norm gains x4 at initialisation (sharper attention from the start);
  - no QK-norm (the q/k RMS norms replaced by identities).
Prints held-out accuracy per variant over training and writes JSON.

    PYTHONPATH=. python bench/tiny_lookup_probe.py --steps 1500 --out runs/bench/tiny_lookup_probe.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rollout_workers.molmoe.config import MolmoeConfig  # noqa: E402
from rollout_workers.molmoe.modeling import olmoe_config  # noqa: E402

COLORS, NUMBERS = 6, 4
# token ids: colours 0..5, numbers 6..9, then "is", ",", ".", "?"
IS, COMMA, DOT, QMARK = 10, 11, 12, 13
VOCAB = 16
VARIANTS = ("as built", "random depth", "qk-norm gains x4", "no qk-norm")


def make_batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences [n, 18] and their answers [n] (token ids of the numbers)."""
    seqs, answers = [], []
    for _ in range(n):
        colors = torch.randperm(COLORS, generator=gen)[:NUMBERS].tolist()
        numbers = (torch.randperm(NUMBERS, generator=gen) + COLORS).tolist()
        seq = []
        for c, d in zip(colors, numbers):
            seq += [c, IS, d, COMMA]
        seq[-1] = DOT
        q = int(torch.randint(NUMBERS, (1,), generator=gen))
        seqs.append(seq + [colors[q], QMARK])
        answers.append(numbers[q])
    return torch.tensor(seqs), torch.tensor(answers)


def build(variant: str, seed: int) -> nn.Module:
    from transformers import OlmoeForCausalLM
    torch.manual_seed(seed)
    hub = json.loads((Path(__file__).resolve().parents[1] / "assets" / "tiny_molmoe" / "config.json").read_text())
    cfg = olmoe_config(MolmoeConfig.from_hub_dict(hub))
    cfg.vocab_size = VOCAB
    model = OlmoeForCausalLM(cfg)
    for layer in model.model.layers:
        attn = layer.self_attn
        if variant == "qk-norm gains x4":
            with torch.no_grad():
                attn.q_norm.weight.fill_(4.0)
                attn.k_norm.weight.fill_(4.0)
        elif variant == "no qk-norm":
            attn.q_norm, attn.k_norm = nn.Identity(), nn.Identity()
    return model


def forward(model, ids: torch.Tensor, blocks=None, top_k=None) -> torch.Tensor:
    """Logits at the last position [n, VOCAB], running only `blocks` (all if None) at `top_k` experts."""
    all_layers = model.model.layers
    if blocks is not None:
        model.model.layers = nn.ModuleList([all_layers[i] for i in blocks])
    old_k = [layer.mlp.gate.top_k for layer in all_layers] if top_k else None
    try:
        if top_k:
            for layer in all_layers:
                layer.mlp.gate.top_k = top_k
        out = model(input_ids=ids, use_cache=False).logits[:, -1]
    finally:
        model.model.layers = all_layers
        if old_k:
            for layer, k in zip(all_layers, old_k):
                layer.mlp.gate.top_k = k
    return out


def accuracy(model, ids, answers, blocks=None) -> float:
    with torch.no_grad():
        return float((forward(model, ids, blocks).argmax(-1) == answers).float().mean())


def train(variant: str, args) -> dict:
    from jobs.build_tiny_model import draw_knobs
    model = build(variant, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    test_ids, test_ans = make_batch(torch.Generator().manual_seed(10_000 + args.seed), args.test)
    rng = random.Random(args.seed)
    L = len(model.model.layers)
    curve, t0 = [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            model.eval()
            row = {"step": step, "full": accuracy(model, test_ids, test_ans),
                   "first_2_blocks": accuracy(model, test_ids, test_ans, [0, 1]),
                   "seconds": round(time.perf_counter() - t0, 1)}
            curve.append(row)
            print(f"  {variant:18s} step {step:5d}: held-out {row['full']:.3f} (2 blocks {row['first_2_blocks']:.3f})",
                  flush=True)
            model.train()
        if step == args.steps:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, ans = make_batch(gen, args.batch)
        blocks = top_k = None
        if variant == "random depth":
            _, blocks, k_map = draw_knobs(rng, L, 4, 0.25)
            top_k = next(iter(k_map.values()), None)
        loss = nn.functional.cross_entropy(forward(model, ids, blocks, top_k), ans)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"variant": variant, "curve": curve, "final": curve[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default="runs/bench/tiny_lookup_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [train(v, args) for v in args.variants]
    print("\n| variant | held-out accuracy, full depth | first 2 blocks | steps x batch | seconds |")
    print("|---|---|---|---|---|")
    for r in results:
        f = r["final"]
        print(f"| {r['variant']} | {f['full']:.3f} | {f['first_2_blocks']:.3f} | {args.steps} x {args.batch} | "
              f"{f['seconds']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "chance": 1 / NUMBERS, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
