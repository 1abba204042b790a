"""One-off engine diagnostics on a GPU (issue 8), kept so the figures they gave can be reproduced.

    OUT=runs/bench python bench/engine_diagnostics.py        # writes $OUT/diag.json and $OUT/greedy_trace.json

1. ``F.grouped_mm`` in float32 (torch's fallback) against per-expert matmuls.
2. Float32, one full-size random model shared by the eager and the fast engine (uncompiled, no graphs):
   vision features, first-token logits per setting through each engine's own request path (each with its
   own preprocessing: CPU crops for eager, GPU crops for fast), and hidden states after 1-16 prefill blocks
   from the SAME input embeddings.
3. bf16: a whole decode step's graph replayed back to back vs inside ``greedy_decode`` (the host's cost per
   token), a profiler table of a short greedy decode, and the vision tower (13 crops) compiled with flash
   attention vs the cuDNN attention op called explicitly.
``docs/bench/engine_diagnostics_h100_c359178.json`` (H100, engine code of commit c359178) came from a first,
flat version of this script with the same steps; this version has not been run on a GPU.
"""
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.rollout_speed import QUESTION, benchmark_space, png  # noqa: E402
from rollout_workers.executors import EagerEngine  # noqa: E402
from rollout_workers.fast_engine import FastEngine, vision_layer  # noqa: E402
from rollout_workers.molmoe.config import MolmoeConfig  # noqa: E402
from rollout_workers.molmoe.loader import random_full_size  # noqa: E402
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor  # noqa: E402
from rollout_workers.molmoe_backend import word_level_tokenizer  # noqa: E402
from rollout_workers.request_path import RequestEngine  # noqa: E402
from shared.knobs import ImportanceScores, KnobChoice  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    out_dir = Path(os.environ.get("OUT", "runs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {}

    def save():
        (out_dir / "diag.json").write_text(json.dumps(res, indent=1, default=str))
    dev = torch.device("cuda")
    cfg = MolmoeConfig.full()
    L = cfg.n_layers
    space = benchmark_space(L, cfg.num_experts, cfg.top_k)
    imp = ImportanceScores.by_index(L)
    pre = MolmoPreprocessor(cfg, word_level_tokenizer(cfg, QUESTION.split()))
    print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn tf32", torch.backends.cudnn.allow_tf32, flush=True)

    # 1. grouped_mm float32 fallback vs per-expert mm
    g = torch.Generator(device=dev).manual_seed(0)
    for rows_n in (3036, 9720):
        E, K, N = 64, 2048, 2048
        x = torch.randn(rows_n, K, device=dev, generator=g)
        w = torch.randn(E, N, K, device=dev, generator=g) * K ** -0.5
        counts = torch.bincount(torch.randint(0, E, (rows_n,), device=dev, generator=g), minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        y = F.grouped_mm(x, w.transpose(1, 2), offs=offs)
        ref = torch.cat([x[s:e] @ w[i].T for i, (s, e) in enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
        res[f"grouped_mm_fp32_rows{rows_n}_maxdiff"] = float((y - ref).abs().max())
    del x, w, y, ref
    save()

    # 2. float32 engines on one shared model
    model = random_full_size(dev, torch.float32, seed=0).eval()
    fx = FastEngine(model, max_len=2048, top_k_max=8, use_graphs=False, compile=False)
    fast = RequestEngine(model, pre, space, imp, executor=fx)
    eager = RequestEngine(model, pre, space, imp, executor=EagerEngine(model))
    image = png(1024 - 128, 768, seed=11)
    q = "how many people are in the picture"
    with torch.no_grad():
        inputs = pre.preprocess(q, pre.load_image(image), max_crops=12).to(dev)
        va = model.encode_images(inputs.images, inputs.image_masks)
        vb = fx._encode_images(inputs.images, inputs.image_masks)
        res["vision_fp32_maxdiff"] = float((va.float() - vb.float()).abs().max())
    rows = []
    for tier, k, nb in (("high", 8, 16), ("high", 8, 12), ("high", 4, 16), ("high", 4, 12), ("medium", 8, 16),
                        ("low", 8, 16)):
        fixed = KnobChoice(tier, {"low": 3, "medium": 6, "high": 12}[tier], 1, k, nb)
        a = eager.serve(image, q, 1000.0, None, fixed=fixed, max_new_tokens=3, stop_at_eos=False, return_logits=True)
        b = fast.serve(image, q, 1000.0, None, fixed=fixed, max_new_tokens=3, stop_at_eos=False, return_logits=True)
        d = [float((x - y).abs().max()) for x, y in zip(a.step_logits, b.step_logits)]
        rows.append({"tier": tier, "k": k, "nb": nb, "T": a.prompt_tokens, "diffs": d, "same": a.answer_ids == b.answer_ids})
        print(rows[-1], flush=True)
    res["fp32_first_tokens"] = rows
    with torch.no_grad():
        xe = fast.executor.encode(pre.preprocess(q, pre.load_image(image), max_crops=12).to(dev))
        blocks = list(range(16))
        per_block = []
        for nb_run in (1, 2, 4, 8, 16):
            fx.begin()
            hb = fx.prefill(xe, blocks[:nb_run], {}).clone()
            eager.executor.begin()
            ha = eager.executor.prefill(xe, blocks[:nb_run], {}).clone()
            per_block.append({"blocks": nb_run, "maxdiff": float((ha - hb).abs().max()), "scale": float(ha.abs().max())})
    res["fp32_prefill_per_blocks"] = per_block
    save()
    del fast, eager, fx, model
    gc.collect()
    torch.cuda.empty_cache()

    # 3. bf16: decode step gap, profile, vision attention op
    model = random_full_size(dev, torch.bfloat16, seed=0).eval()
    fx = FastEngine(model, max_len=256, top_k_max=8)
    blocks = list(range(16))
    t0 = time.perf_counter()
    fx.warmup(None, crop_counts=[], block_lists=[blocks])
    res["warmup_small_s"] = time.perf_counter() - t0
    graph = fx._graphs[("step", tuple(blocks))]
    x = torch.randn(1, 100, cfg.d_model, device=dev, dtype=torch.bfloat16)
    fx.prefill(x, blocks, {})
    fx._pos.fill_(100)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(50):
        graph.replay()
    ev[1].record()
    ev[1].synchronize()
    res["replay_back_to_back_ms"] = ev[0].elapsed_time(ev[1]) / 50
    launch, step = [], []
    for _ in range(50):
        fx._pos.fill_(100)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        t1 = time.perf_counter()
        fx._tok_host.copy_(fx._tok, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        t2 = time.perf_counter()
        launch.append((t1 - t0) * 1e3)
        step.append((t2 - t0) * 1e3)
    res["replay_launch_host_ms_median"] = statistics.median(launch)
    res["step_with_sync_ms_median"] = statistics.median(step)
    logits = fx.head(fx.prefill(x, blocks, {})[:, -1:])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fx.greedy_decode(logits, 100, blocks, {}, 33, None)
    torch.cuda.synchronize()
    res["greedy_decode_ms_per_token"] = (time.perf_counter() - t0) * 1e3 / 32
    save()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        logits = fx.head(fx.prefill(x, blocks, {})[:, -1:])
        fx.greedy_decode(logits, 100, blocks, {}, 6, None)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(out_dir / "greedy_trace.json"))
    res["profile_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)[:6000]
    save()

    heads, eps = cfg.vit_num_heads, float(cfg.vit_layer_norm_eps)

    def layer_cudnn(w, xx):
        n, S, width = xx.shape
        h = F.layer_norm(xx, (width,), w.ln1_w, w.ln1_b, eps)
        qq, kk, vv = F.linear(h, w.wqkv, w.bqkv).view(n, S, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        a = torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, False)[0]
        xx = xx + F.linear(a.transpose(1, 2).reshape(n, S, width), w.wo, w.bo)
        u = F.linear(F.layer_norm(xx, (width,), w.ln2_w, w.ln2_b, eps), w.w1, w.b1)
        return xx + F.linear(u * torch.sigmoid(1.702 * u), w.w2, w.b2)

    def enc_cudnn(imgs, masks):
        return model.encode_images(imgs, masks, layer_fn=lambda i, h: layer_cudnn(fx.vision_weights[i], h))

    def enc_flash(imgs, masks):
        return model.encode_images(imgs, masks, layer_fn=lambda i, h: vision_layer(fx.vision_weights[i], h, heads, eps))
    from bench.vision_speed import time_graph
    imgs = (torch.rand(13, cfg.patches_per_crop, cfg.patch_dim, device=dev) * 1.8 - 0.9).bfloat16()
    masks = torch.ones(13, cfg.patches_per_crop, device=dev, dtype=torch.bfloat16)
    yref = None
    for name, f in (("flash", enc_flash), ("cudnn", enc_cudnn)):
        torch._dynamo.reset()
        try:
            fn = torch.compile(f, dynamic=True)
            with torch.no_grad():
                y = fn(imgs, masks).float()
                res[f"vision13_{name}_ms"] = time_graph(lambda: fn(imgs, masks), 50)
                res.setdefault("vision13_ref", y.abs().max().item())
                if yref is None:
                    yref = y
                else:
                    res["vision13_cudnn_maxdiff"] = float((y - yref).abs().max())
        except Exception as exc:      # noqa: BLE001 - a diagnostic: record why a variant could not run
            res[f"vision13_{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
    save()
    print({k: v for k, v in res.items() if k != "profile_table"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
