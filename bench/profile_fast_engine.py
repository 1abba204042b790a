"""Where the fast engine's time goes on a GPU: CUDA kernels of one decode step, of one prefill and of
the vision tower (torch.profiler), and the expert GEMM against a plain read of the same weights.

    python bench/profile_fast_engine.py --out runs/bench/profile_fast_engine.json

Full-size MolmoE architecture with random weights (bf16). Prints the top kernels by CUDA time per
phase and writes them as JSON. A diagnostic for docs/PERFORMANCE.md, not a target check.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from rollout_workers.fast_engine import FastEngine  # noqa: E402
from rollout_workers.molmoe.config import MolmoeConfig  # noqa: E402


def top_kernels(prof, n: int = 20) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key and not e.key.startswith(("ProfilerStep", "cudaGraph")):
            rows.append({"kernel": e.key[:110], "calls": e.count, "cuda_us": t})
    rows.sort(key=lambda r: -r["cuda_us"])
    kernels = [r for r in rows if not r["kernel"].startswith("aten::")]
    return kernels[:n]


def cuda_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def set_triton(eng: FastEngine, on: bool) -> None:
    """Switch the engine's Triton kernels on or off; its LLM graphs are captured again on next use."""
    eng.shape = eng.shape._replace(triton=on)
    eng.triton = on
    for key in [k for k in eng._graphs if k[0] in ("block", "prefill", "step")]:
        del eng._graphs[key]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/profile_fast_engine.json")
    ap.add_argument("--prompt", type=int, default=1215)
    args = ap.parse_args()
    from rollout_workers.molmoe.loader import random_full_size
    dev = torch.device("cuda")
    cfg = MolmoeConfig.full()
    model = random_full_size(dev, torch.bfloat16, seed=0).eval()
    eng = FastEngine(model, max_len=2048, top_k_max=8)
    t0 = time.perf_counter()
    rep = eng.warmup(None, crop_counts=[13], block_lists=[list(range(16)), list(range(12))])
    out: dict = {"card": torch.cuda.get_device_name(0), "warmup": rep, "warmup_s": time.perf_counter() - t0}
    print(out, flush=True)
    blocks = list(range(16))
    x = torch.randn(1, args.prompt, cfg.d_model, device=dev, dtype=torch.bfloat16) * 0.02
    with torch.no_grad():
        out["prefill_ms"] = cuda_ms(lambda: eng.prefill(x, blocks, {}), 5)
        T = args.prompt
        out["decode_graph_ms"] = cuda_ms(lambda: eng.decode_step(5, T, blocks, {}), 50)
        out["decode_graph_ms_4_12"] = cuda_ms(lambda: eng.decode_step(5, T, blocks[:12], {b: 4 for b in blocks[1:12]}), 50)
        out["triton"] = eng.triton
        if eng.triton:     # the generic path (grouped GEMM, SDPA over the whole cache, compiled epilogues)
            set_triton(eng, False)
            out["prefill_ms_generic"] = cuda_ms(lambda: eng.prefill(x, blocks, {}), 5)
            out["decode_graph_ms_generic"] = cuda_ms(lambda: eng.decode_step(5, T, blocks, {}), 50)
            out["decode_graph_ms_4_12_generic"] = cuda_ms(
                lambda: eng.decode_step(5, T, blocks[:12], {b: 4 for b in blocks[1:12]}), 50)
            for pos in (256, 640, 1215, 2000):
                out[f"decode_graph_ms_generic_pos{pos}"] = cuda_ms(lambda: eng.decode_step(5, pos, blocks, {}), 20)
            set_triton(eng, True)
            for pos in (256, 640, 1215, 2000):
                out[f"decode_graph_ms_pos{pos}"] = cuda_ms(lambda: eng.decode_step(5, pos, blocks, {}), 20)
        eng.use_graphs = False
        out["decode_nograph_ms"] = cuda_ms(lambda: eng.decode_step(5, T, blocks, {}), 20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.decode_step(5, T, blocks, {})
            torch.cuda.synchronize()
        out["decode_kernels"] = top_kernels(prof, 25)
        out["decode_kernel_launches"] = sum(r["calls"] for r in top_kernels(prof, 10_000))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.prefill(x, blocks, {})
            torch.cuda.synchronize()
        out["prefill_kernels"] = top_kernels(prof, 15)
        eng.use_graphs = True
        imgs = torch.randn(13, cfg.patches_per_crop, cfg.patch_dim, device=dev)
        masks = torch.ones(13, cfg.patches_per_crop, device=dev)
        out["vision_graph_ms_13"] = cuda_ms(lambda: eng._encode_images(imgs, masks), 10)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng._vision_fn(imgs.to(torch.bfloat16), masks.to(torch.bfloat16))     # compiled, outside its graph
            torch.cuda.synchronize()
        out["vision_kernels"] = top_kernels(prof, 15)
        # the expert GEMM at decode (8 rows, 8 experts) against a plain read of the same bytes
        w = model.llm.model.layers[3].mlp.experts.gate_up_proj            # [E, 2I, D]
        rows = torch.randn(8, cfg.d_model, device=dev, dtype=torch.bfloat16)
        offs = torch.arange(1, 65, device=dev, dtype=torch.int32).clamp(max=8)   # experts 0..7, one row each
        out["grouped_mm_8rows_us"] = cuda_ms(lambda: F.grouped_mm(rows, w.transpose(1, 2), offs=offs), 50) * 1e3
        flat = w[:8].reshape(-1, cfg.d_model)
        out["dense_gemv_same_bytes_us"] = cuda_ms(lambda: F.linear(rows[:1], flat), 50) * 1e3
        out["copy_same_bytes_us"] = cuda_ms(lambda: flat.clone(), 50) * 1e3
        # the Triton expert GEMV's own time needs graph replays (its op wrapper's host dispatch exceeds the
        # kernel): bench/triton_kernels_tune.py
    for phase in ("decode_kernels", "prefill_kernels", "vision_kernels"):
        print(f"\n== {phase}")
        for r in out[phase]:
            print(f"{r['cuda_us']:10.1f} us {r['calls']:5d}x  {r['kernel']}")
    print({k: v for k, v in out.items() if not k.endswith("kernels")})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
