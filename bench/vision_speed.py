"""Vision tower speed on one GPU (issue 8): the fast engine's ViT layer variants against transformers'.

    python bench/vision_speed.py --out runs/bench/vision_speed.json [--crops 13 7 3] [--repeats 50]

Full-size MolmoE with RANDOM weights, bf16. For each crop count, each variant is compiled
(``torch.compile``, dynamic shapes, as the fast engine does) and captured as one CUDA graph; the
table gives the median replay time and the largest |difference| of its output from the transformers
layers' (compiled the same way):

* ``transformers``: the model's ``encode_images`` with transformers' CLIPEncoderLayer;
* ``stacked``: ``fast_engine.vision_layer`` (one q/k/v GEMM); flash attention in both;
* ``stacked-mlpN``: ``stacked`` with the MLP over N row slices (``mlp_row_chunks``: a slice's
  [rows, 4096] activation can stay in L2 between the GEMMs and the quick-GELU pass);
* ``stacked-autotune``: ``stacked`` compiled for each crop count's static shape with inductor's GEMM
  autotuning (cuBLAS against its Triton templates, persistent TMA ones included; the quick-GELU can then be
  fused into a template's epilogue). On an H100 cuBLAS won every large GEMM, nothing was fused, and the tower
  was 2% slower (docs/PERFORMANCE.md);
* ``stacked+cudnn``: the same compiled and captured with only cuDNN's attention enabled (eagerly
  it is faster than flash attention at these shapes; inside the compiled, captured tower it changed
  nothing on an H100, so the engine does not select it).

Also the attention alone for the high tier (13 crops x 577 positions x 16 heads x 64) per SDPA backend,
and the floor of the vision encoder (GEMM and attention FLOPs at the card's measured matmul rate).
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rollout_workers.fast_engine import capture_graph  # noqa: E402


def time_graph(fn, repeats: int) -> float:
    """Median ms of a CUDA graph of fn() (`fast_engine.capture_graph`: two eager runs on a side stream first)."""
    g = capture_graph(fn)
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/vision_speed.json")
    ap.add_argument("--crops", type=int, nargs="+", default=[13, 7, 3])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--mlp-row-chunks", type=int, nargs="*", default=[2, 4],
                    help="also time vision_layer with its MLP over this many row slices (L2 reuse)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="only these variants (transformers, stacked, stacked+cudnn, stacked-mlpN, stacked-autotune; "
                         "default: all); "
                         "the first one run is the reference of the diff column")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from bench.rollout_speed import measure_card
    from rollout_workers.fast_engine import FastEngine
    from rollout_workers.molmoe.config import MolmoeConfig
    from rollout_workers.molmoe.loader import random_full_size
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(0)
    rates = measure_card(dev)
    cfg = MolmoeConfig.full()
    model = random_full_size(dev, torch.bfloat16, seed=0).eval()
    eng = FastEngine(model, max_len=256, top_k_max=8)
    heads, eps = cfg.vit_num_heads, float(cfg.vit_layer_norm_eps)
    from rollout_workers.fast_engine import vision_layer

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def stacked(imgs, masks):
        return model.encode_images(imgs, masks,
                                   layer_fn=lambda i, h: vision_layer(eng.vision_weights[i], h, heads, eps))

    def mlp_chunked(chunks):
        def f(imgs, masks):
            return model.encode_images(imgs, masks, layer_fn=lambda i, h: vision_layer(
                eng.vision_weights[i], h, heads, eps, mlp_row_chunks=chunks))
        return f
    # (name, function, SDPA backend context entered around compile, capture and calls)
    variants = [("transformers", model.encode_images, lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
                ("stacked", stacked, lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
                ("stacked+cudnn", stacked, lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))]
    variants += [(f"stacked-mlp{c}", mlp_chunked(c), lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
                 for c in args.mlp_row_chunks]
    # inductor's own GEMM autotuning (cuBLAS against Triton templates, persistent TMA ones included, with the
    # quick-GELU fused into a template's epilogue where that benchmarks faster), one static shape per crop count
    variants += [("stacked-autotune", stacked, lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]))]
    compile_kwargs = {"stacked-autotune": dict(dynamic=False, options={
        "max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON", "triton.enable_persistent_tma_matmul": True,
        "triton.cudagraphs": False})}
    variants = [v for v in variants if not args.variants or v[0] in args.variants]
    S, Dv, Fv = cfg.patches_per_crop + 1, cfg.vit_hidden_size, cfg.vit_mlp_size
    n_vit = max(cfg.vit_block_indices) + 1
    rows, out = [], {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                     "card_rates": rates}
    gen = torch.Generator(device=dev).manual_seed(0)
    # normalised pixels in (-0.9, 0.9): a crop with a pixel exactly -1 is padding (zero features)
    inputs = {n: ((torch.rand(n, cfg.patches_per_crop, cfg.patch_dim, device=dev, generator=gen) * 1.8 - 0.9).bfloat16(),
                  torch.ones(n, cfg.patches_per_crop, device=dev, dtype=torch.bfloat16)) for n in args.crops}
    refs = {}
    for name, f, backends in variants:
        torch._dynamo.reset()          # each variant traced afresh (compiled code is cached per function)
        fn = torch.compile(f, **compile_kwargs.get(name, dict(dynamic=True)))
        for n, (x, m) in inputs.items():
            with torch.no_grad(), backends():
                y = fn(x, m).float()
                refs.setdefault(n, y)
                ms = time_graph(lambda: fn(x, m), args.repeats)
            flops = n * n_vit * (2 * S * (4 * Dv * Dv + 2 * Dv * Fv) + 4 * S * S * Dv)
            diff = float((y - refs[n]).abs().max())
            rows.append({"crops": n, "variant": name, "ms": ms, "floor_ms": flops / rates["matmul_flop_per_s"] * 1e3,
                         "max_abs_diff_vs_transformers": diff, "ref_abs_max": float(refs[n].abs().max())})
            print(f"| {n} | {name} | {ms:.3f} | {rows[-1]['floor_ms']:.3f} | {diff:.4f} |", flush=True)
    out["vision"] = rows
    # attention alone, per SDPA backend (high tier)
    q, k, v = (torch.randn(13, heads, S, Dv // heads, device=dev, dtype=torch.bfloat16) for _ in range(3))
    attn = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                ms = time_graph(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
            attn[backend.name] = ms
        except RuntimeError as exc:
            attn[backend.name] = f"unavailable: {exc}"[:200]
        print(f"attention 13 crops, {backend.name}: {attn[backend.name]} ms per layer", flush=True)
    out["attention_ms_per_layer"] = attn
    print("\n| crops | variant | ms (graph replay) | floor ms | max abs diff vs transformers |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['crops']} | {r['variant']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{r['max_abs_diff_vs_transformers']:.4f} (of {r['ref_abs_max']:.2f}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
