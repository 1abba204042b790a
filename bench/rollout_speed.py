"""Rollout speed on one GPU (issue 8): eager vs fast engine against the floor the card allows.

    python bench/rollout_speed.py --out runs/bench/rollout_speed.json [--repeats 20] [--skip-eager]

Full-size MolmoE architecture with RANDOM weights (bf16; timing only). For each tier and (top_k,
num_blocks) in {(8,16), (6,14), (4,12)} at p = 1, a fixed 1024x768 image and a 16-token answer (EOS
ignored): segment and end-to-end latency (median and CV over the repeats), rollouts/s of one
batch-1 worker, and the floor from the model's shapes and the card's measured bandwidth and matrix
rate (bytes that must move / operations that must run), printed side by side with the ratio.
Also: the fast engine's warm-up (graphs captured, seconds), that switching settings after warm-up
captures nothing, greedy tokens of the fast engine vs the eager engine on a few prompts, and the
controller-overhead A/B (controlled path vs the plain path with the same knobs) on the fast engine.
Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rollout_workers.executors import EagerEngine  # noqa: E402
from rollout_workers.fast_engine import FastEngine  # noqa: E402
from rollout_workers.molmoe.config import MolmoeConfig  # noqa: E402
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor  # noqa: E402
from rollout_workers.molmoe_backend import word_level_tokenizer  # noqa: E402
from rollout_workers.request_path import SEGMENT_ORDER, RequestEngine  # noqa: E402
from shared.controller import TwoStageController, UniformStream  # noqa: E402
from shared.knobs import ImportanceScores, KnobChoice, KnobSpace  # noqa: E402

QUESTION = "what colour is the small circle in the top left corner of the picture"
SETTINGS = ((8, 16), (6, 14), (4, 12))
TARGETS = {"vision_ms": 9.0, "prefill_ms": 10.0, "decode_ms_per_token": 1.8, "rollouts_per_s": 20.0,
           "decode_saving_vs_floor": 0.7, "warmup_s": 180.0}


def benchmark_space(n_layers: int = 16, num_experts: int = 64, native_top_k: int = 8) -> KnobSpace:
    """The benchmarks' knob space: tiers of 3 / 6 / 12 crops, p 1-5, top_k 4-8, 12-16 blocks (full-size MolmoE)."""
    return KnobSpace(("low", "medium", "high"), (3, 6, 12), (1, 2, 3, 4, 5), (4, 5, 6, 7, 8), (12, 13, 14, 15, 16),
                     n_layers, num_experts, native_top_k)


def png(w=1024, h=768, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- card rates
def measure_card(device) -> dict:
    """Copy bandwidth (read + write of a 2 GiB buffer) and dense bf16 matmul rate (8192^3)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 2 * reps / (time.perf_counter() - t0)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ y
    torch.cuda.synchronize()
    rate = 2 * m ** 3 * reps / (time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    return {"bandwidth_bytes_per_s": bw, "matmul_flop_per_s": rate}


# ---------------------------------------------------------------------------------------------- floors
def floors(cfg: MolmoeConfig, *, n_crops: int, prompt_tokens: int, top_k: int, num_blocks: int, p: int,
           answer_tokens: int, bw: float, rate: float, bytes_per_value: int = 2) -> dict:
    """Lower bounds (ms) from what must move and what must be computed; block j < p at native top_k."""
    D, I, E, V = cfg.d_model, cfg.expert_hidden_size, cfg.num_experts, cfg.embedding_size
    hd = D // cfg.n_heads
    attn_w = (2 * D * D + 2 * D * cfg.n_kv_heads * hd) * bytes_per_value
    router_w = E * D * bytes_per_value
    expert_w = 3 * D * I * bytes_per_value
    head_w = V * D * bytes_per_value
    ks = [cfg.top_k] * p + [top_k] * (num_blocks - p)
    T = prompt_tokens
    ctx = T + answer_tokens // 2
    kv = 2 * cfg.n_kv_heads * hd * ctx * bytes_per_value
    decode_bytes = sum(attn_w + router_w + k * expert_w + kv for k in ks) + head_w
    touched = [min(E, T * k) for k in ks]       # distinct experts a T-token prefill can touch
    prefill_bytes = sum(attn_w + router_w + t * expert_w for t in touched) + head_w
    prefill_flops = sum(2 * T * (4 * D * D + E * D + k * 3 * D * I) + 2 * T * T * D for k in ks)
    # vision: ViT layers up to the deepest one used, over n_crops x (patches + CLS)
    S, Dv, Fv = cfg.patches_per_crop + 1, cfg.vit_hidden_size, cfg.vit_mlp_size
    n_vit = max(cfg.vit_block_indices) + 1
    vision_flops = n_crops * n_vit * (2 * S * (4 * Dv * Dv + 2 * Dv * Fv) + 4 * S * S * Dv)
    vit_bytes = n_vit * (4 * Dv * Dv + 2 * Dv * Fv) * bytes_per_value
    out = {
        "decode_ms_per_token": decode_bytes / bw * 1e3,
        "prefill_ms": max(prefill_bytes / bw, prefill_flops / rate) * 1e3,
        "vision_ms": max(vit_bytes / bw, vision_flops / rate) * 1e3,
        "decode_bytes": decode_bytes, "prefill_bytes": prefill_bytes, "prefill_flops": prefill_flops,
        "vision_flops": vision_flops,
    }
    out["end_to_end_ms"] = out["vision_ms"] + out["prefill_ms"] + (answer_tokens - 1) * out["decode_ms_per_token"]
    return out


# ---------------------------------------------------------------------------------------------- runs
def time_settings(engine: RequestEngine, space: KnobSpace, image: bytes, args, label: str) -> list[dict]:
    rows = []
    for t_name, crops in zip(space.tier_names, space.tier_max_crops):
        for k, nb in SETTINGS:
            fixed = KnobChoice(t_name, crops, 1, k, nb)

            def run():
                return engine.serve(image, QUESTION, 1000.0, None, fixed=fixed, max_new_tokens=args.tokens,
                                    stop_at_eos=False)
            for _ in range(args.warmup):
                run()
            res = [run() for _ in range(args.repeats)]
            gc.collect()
            lat = [r.latency_ms for r in res]
            gpu = [r.latency_ms - r.segments_ms["preprocess_ms"] - r.segments_ms["postprocess_ms"] for r in res]
            seg = {s: statistics.median(r.segments_ms[s] for r in res) for s in SEGMENT_ORDER}
            n_tok = len(res[0].answer_ids)
            row = {"engine": label, "tier": t_name, "max_crops": crops, "top_k": k, "num_blocks": nb, "p": 1,
                   "num_crops": res[0].num_crops, "prompt_tokens": res[0].prompt_tokens, "answer_tokens": n_tok,
                   "latency_ms_median": statistics.median(lat),
                   "latency_cv": statistics.pstdev(lat) / statistics.mean(lat),
                   "model_ms_median": statistics.median(gpu),
                   "model_cv": statistics.pstdev(gpu) / statistics.mean(gpu),
                   "prefill_ms": seg["prefix_ms"] + seg["stage2_ms"] + seg["prefill_rest_ms"],
                   "decode_ms_per_token": seg["decode_ms"] / max(1, n_tok - 1),
                   **{f"{s}_median": v for s, v in seg.items()}}
            row["rollouts_per_s"] = 1e3 / row["latency_ms_median"]
            row["rollouts_per_s_model_only"] = 1e3 / row["model_ms_median"]
            rows.append(row)
            print(f"{label:5s} {t_name:6s} crops {row['num_crops']:2d} T {row['prompt_tokens']:5d} k {k} nb {nb:2d} | "
                  f"e2e {row['latency_ms_median']:8.2f} ms cv {row['latency_cv'] * 100:4.1f}% | model "
                  f"{row['model_ms_median']:7.2f} cv {row['model_cv'] * 100:4.1f}% | pre {seg['preprocess_ms']:6.2f} "
                  f"vis {seg['vision_ms']:6.2f} prefill {row['prefill_ms']:6.2f} dec/tok "
                  f"{row['decode_ms_per_token']:6.3f}", flush=True)
    return rows


def token_agreement(fast: RequestEngine, eager: RequestEngine, space: KnobSpace, n_prompts: int, tokens: int) -> list:
    """Greedy tokens of both engines on the same inputs: the eager engine cuts its crops on the CPU and the
    fast engine on the GPU (same maths, float rounding apart), so for the comparison the eager engine is
    given the fast engine's preprocessing; the crops' pixel difference between the two is reported."""
    out = []
    eager_pre_device = eager.executor.preprocess_device
    eager.executor.preprocess_device = fast.executor.preprocess_device
    questions = [QUESTION, "how many people are in the picture", "what is written on the sign", "describe the image"]
    for i in range(n_prompts):
        image = png(1024 - 128 * (i % 3), 768, seed=10 + i)
        for fixed in (space.full_compute(), KnobChoice("medium", space.tier_max_crops[1], 1, 4, 12)):
            q = questions[i % len(questions)]
            a = eager.serve(image, q, 1000.0, None, fixed=fixed, max_new_tokens=tokens, stop_at_eos=False,
                            return_logits=True)
            b = fast.serve(image, q, 1000.0, None, fixed=fixed, max_new_tokens=tokens, stop_at_eos=False,
                           return_logits=True)
            c = fast.serve(image, q, 1000.0, None, fixed=fixed, max_new_tokens=tokens, stop_at_eos=False)
            same = a.answer_ids == b.answer_ids
            first = next((j for j, (x, y) in enumerate(zip(a.answer_ids, b.answer_ids)) if x != y), None)
            upto = len(a.answer_ids) if first is None else first + 1
            diffs = [float((x - y).abs().max()) for x, y in zip(a.step_logits[:upto], b.step_logits[:upto])]
            top2 = torch.topk(a.step_logits[0], 2).values
            rgb = fast.pre.load_image(image)
            on_cpu = fast.pre.preprocess(q, rgb, max_crops=fixed.max_crops)
            on_dev = fast.pre.preprocess(q, rgb, max_crops=fixed.max_crops, device=fast.executor.preprocess_device)
            pixel_diff = float((on_dev.images.cpu().float() - on_cpu.images.float()).abs().max())
            out.append({"prompt": i, "knobs": str(fixed), "same_tokens": same, "first_divergence": first,
                        "device_loop_same_as_host_loop": c.answer_ids == b.answer_ids,
                        "crop_pixels_cpu_vs_device_max_abs_diff": pixel_diff,
                        "max_logit_diff_until_divergence": max(diffs), "first_step_top2_margin": float(top2[0] - top2[1])})
            print(f"tokens prompt {i} {fixed.top_k}/{fixed.num_blocks}: same={same} first_div={first} "
                  f"device-loop={c.answer_ids == b.answer_ids} crop-pixels cpu/gpu {pixel_diff:.1e} "
                  f"max|dlogit|={max(diffs):.4f} margin0={out[-1]['first_step_top2_margin']:.4f}", flush=True)
    eager.executor.preprocess_device = eager_pre_device
    return out


def group_throughput(model, pre, space: KnobSpace, importance, executor, ctl: TwoStageController, image: bytes,
                     groups: int, group_size: int, tokens: int) -> dict:
    """Rollouts/s as a training worker produces them: groups of G controlled requests (budget token, Stage2
    sync) on one image, preprocessing shared within a group (decoded once, its time charged to each
    rollout), a fresh bytes object per group so every group decodes; high tier, 8/16, p = 1 fixed."""
    engine = RequestEngine(model, pre, space, importance, executor=executor, reuse_preprocess=True)
    fixed = KnobChoice("high", space.tier_max_crops[-1], 1, 8, 16)

    def run_groups(n):
        lat = []
        for _ in range(n):
            img = bytes(bytearray(image))
            for _ in range(group_size):
                r = engine.serve(img, QUESTION, 1000.0, ctl, fixed=fixed, max_new_tokens=tokens, stop_at_eos=False)
                lat.append(r.latency_ms)
        return lat
    run_groups(1)
    t0 = time.perf_counter()
    lat = run_groups(groups)
    wall = time.perf_counter() - t0
    return {"groups": groups, "group_size": group_size, "rollouts": len(lat), "wall_s": wall,
            "rollouts_per_s": len(lat) / wall, "latency_ms_median": statistics.median(lat),
            "latency_ms_mean": statistics.mean(lat), "knobs": str(fixed)}


def token_agreement_float32(device, pre, space: KnobSpace, importance, args) -> list:
    """The token check in float32 on one full-size random model shared by both engines (bf16 rounding
    noise can flip near-ties of random weights; float32 shows whether the engines compute the same
    function). The fast engine runs uncompiled and without graphs here (same kernels and maths as
    deployed, without the compiler's fusion): compiled grouped GEMMs exist only in bf16."""
    from rollout_workers.molmoe.loader import random_full_size
    model = random_full_size(device, torch.float32, seed=0).eval()
    fast_exec = FastEngine(model, max_len=args.max_len, top_k_max=max(space.top_ks), use_graphs=False, compile=False)
    fast = RequestEngine(model, pre, space, importance, executor=fast_exec)
    eager = RequestEngine(model, pre, space, importance, executor=EagerEngine(model))
    print(f"float32 token check: grouped GEMMs {fast_exec.shape.grouped}, Triton {fast_exec.triton}", flush=True)
    res = token_agreement(fast, eager, space, args.prompts, args.tokens)
    del fast, eager, fast_exec, model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def controller_ab(engines: dict, ctl: TwoStageController, image: bytes, pairs: int, tokens: int,
                  variant_pairs: tuple = ()) -> dict:
    """Controlled path (the controller decides; budget token, split prefill, Stage2 sync) vs the plain
    path with the knobs it chose, one pair after the other; with several engines (e.g. Stage2 on the
    device and on the host, sharing one executor) their pairs interleave, in a shuffled order per round.
    Returns {engine name: stats}; and for each (x, y) of `variant_pairs`, "x minus y": the paired difference of
    the two variants' controlled arms (latency without preprocessing) in the rounds where they chose the same
    knobs."""
    # a value may be (engine, its generator or UniformStream, or the string "greedy": argmax decisions)
    pairs_of = {name: e if isinstance(e, tuple) else (e, torch.Generator().manual_seed(0)) for name, e in engines.items()}
    engines = {name: e for name, (e, _) in pairs_of.items()}
    gens = {name: g for name, (_, g) in pairs_of.items()}
    acc = {name: {k: [] for k in ("diffs", "a", "b", "s1", "s2", "model", "pre", "no_crops", "pre1", "a_model",
                                  "knobs")}
           for name in engines}
    order_rng = np.random.default_rng(1)
    names = list(engines)
    for i in range(pairs + 5):
        # the variants' order is shuffled per round: a fixed order biased the comparison by ~0.05 ms
        for name in order_rng.permutation(names):
            engine = engines[name]
            greedy = isinstance(gens[name], str)
            a = engine.serve(image, QUESTION, 250.0, ctl, max_new_tokens=tokens, stop_at_eos=False,
                             greedy=greedy, generator=None if greedy else gens[name])
            b = engine.serve(image, QUESTION, 250.0, None, fixed=a.knobs, max_new_tokens=tokens, stop_at_eos=False)
            if i < 5:
                continue
            r = acc[name]
            r["diffs"].append(a.latency_ms - b.latency_ms)
            r["a"].append(a.latency_ms)
            r["b"].append(b.latency_ms)
            r["s1"].append(a.segments_ms["stage1_ms"])
            r["s2"].append(a.segments_ms["stage2_ms"])
            # the same difference without the host's image decoding and crop cutting (identical work in
            # both arms, and the noisiest part of a request): resolves the overhead with fewer pairs
            r["model"].append((a.latency_ms - a.segments_ms["preprocess_ms"])
                              - (b.latency_ms - b.segments_ms["preprocess_ms"]))
            # what the controlled path adds to preprocessing: with the decode overlap its Stage1 window runs
            # inside it (a GIL-contended decode would show here, not in the difference without preprocessing)
            r["pre"].append(a.segments_ms["preprocess_ms"] - b.segments_ms["preprocess_ms"])
            # end to end without the crops (preprocessing's second part: the same tier's crops in both arms), so
            # the image decode, where the overlapped window runs, stays in
            r["no_crops"].append((a.latency_ms - a.preprocess_parts_ms[1]) - (b.latency_ms - b.preprocess_parts_ms[1]))
            r["pre1"].append(a.preprocess_parts_ms[0] - b.preprocess_parts_ms[0])
            r["a_model"].append(a.latency_ms - a.segments_ms["preprocess_ms"])     # for comparing variants
            r["knobs"].append(a.knobs)
    out = {name: _ab_stats(r) for name, r in acc.items()}
    for x, y in variant_pairs:      # the controlled arms of two variants, round by round (same knobs only)
        rx, ry = acc[x], acc[y]
        d = [u - v for u, v, kx, ky in zip(rx["a_model"], ry["a_model"], rx["knobs"], ry["knobs"]) if kx == ky]
        if d:
            boot = np.random.default_rng(0)
            meds = [float(np.median(boot.choice(d, len(d)))) for _ in range(1000)]
            out[f"{x} minus {y}"] = {"pairs": len(d), "controlled_excl_preprocess_diff_ms_median": statistics.median(d),
                                     "ci95": [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))]}
    return out


def _ab_stats(r: dict) -> dict:
    diffs, model_diffs = r["diffs"], r["model"]
    srt = sorted(diffs)
    lo, hi = srt[int(0.025 * len(srt))], srt[int(0.975 * len(srt)) - 1]
    boot = np.random.default_rng(0)
    meds = [float(np.median(boot.choice(diffs, len(diffs)))) for _ in range(1000)]
    meds_m = [float(np.median(boot.choice(model_diffs, len(model_diffs)))) for _ in range(1000)]
    meds_p = [float(np.median(boot.choice(r["pre"], len(r["pre"])))) for _ in range(1000)]
    meds_nc = [float(np.median(boot.choice(r["no_crops"], len(r["no_crops"])))) for _ in range(1000)]
    meds_p1 = [float(np.median(boot.choice(r["pre1"], len(r["pre1"])))) for _ in range(1000)]
    return {"pairs": len(diffs), "overhead_ms_median": statistics.median(diffs), "overhead_ms_mean": statistics.mean(diffs),
            "overhead_excl_preprocess_ms_median": statistics.median(model_diffs),
            "overhead_excl_preprocess_ms_median_ci95": [float(np.percentile(meds_m, 2.5)),
                                                        float(np.percentile(meds_m, 97.5))],
            "overhead_ms_median_ci95": [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))],
            "diff_p2.5_p97.5": [lo, hi], "controlled_ms_median": statistics.median(r["a"]),
            "plain_ms_median": statistics.median(r["b"]), "stage1_ms_median": statistics.median(r["s1"]),
            "stage2_ms_median": statistics.median(r["s2"]),
            "preprocess_diff_ms_median": statistics.median(r["pre"]),
            "preprocess_diff_ms_median_ci95": [float(np.percentile(meds_p, 2.5)), float(np.percentile(meds_p, 97.5))],
            "overhead_excl_crops_ms_median": statistics.median(r["no_crops"]),
            "overhead_excl_crops_ms_median_ci95": [float(np.percentile(meds_nc, 2.5)),
                                                  float(np.percentile(meds_nc, 97.5))],
            "decode_part_diff_ms_median": statistics.median(r["pre1"]),
            "decode_part_diff_ms_median_ci95": [float(np.percentile(meds_p1, 2.5)),
                                               float(np.percentile(meds_p1, 97.5))]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/rollout_speed.json")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--eager-repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4, help="prompts of the fast-vs-eager token check")
    ap.add_argument("--ab-pairs", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--triton", choices=["auto", "off"], default="auto",
                    help="fast engine decode through the Triton kernels (auto) or the generic grouped-GEMM path")
    ap.add_argument("--ab-host-stage1", action="store_true",
                    help="also the A/B with Stage1 decided on the host (numpy act path; Stage2 on the device)")
    ap.add_argument("--ab-host-stage2", action="store_true",
                    help="also the A/B with both stages decided on the host (the numpy act path), pairs interleaved")
    ap.add_argument("--ab-stream", action="store_true",
                    help="also the A/B with the controller's draws from a UniformStream (as rollout workers do)")
    ap.add_argument("--ab-no-overlap", action="store_true",
                    help="also the A/B with the Stage1 window after the image decode (overlap_decode=False), "
                         "draws from a generator")
    ap.add_argument("--ab-early", action="store_true",
                    help="also the A/B without early_rest_prefill (the rest of the prefill queued after Stage2's "
                         "decision is read), and the default's controlled arm against it round by round")
    ap.add_argument("--ab-s1-helper", action="store_true",
                    help="also the A/B with Stage1's decision read back on the request thread after the decode "
                         "(stage1_read_in_helper=False; the default reads it in the helper), greedy")
    ap.add_argument("--ab-greedy", action="store_true",
                    help="also the A/B with greedy decisions (no draws: what the serving path runs)")
    ap.add_argument("--ab-only", action="store_true",
                    help="warm-up, graph-capture check and the controller A/B only (no setting sweep, no eager)")
    ap.add_argument("--agreement-only", action="store_true",
                    help="warm-up and the fast-vs-eager token checks only (bf16; float32 too with --float32-check)")
    ap.add_argument("--groups", type=int, default=6, help="GRPO groups timed for the training rollout rate")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--float32-check", action="store_true",
                    help="also the fast-vs-eager token check in float32 (one shared full-size model, ~30 GB)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    torch.set_num_threads(args.threads)
    gc.disable()
    device = torch.device("cuda")
    from rollout_workers.molmoe.loader import random_full_size
    cfg = MolmoeConfig.full()
    card = torch.cuda.get_device_name(0)
    rates = measure_card(device)
    print(f"{card}: copy bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{rates['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    L = cfg.n_layers
    space = benchmark_space(L, cfg.num_experts, cfg.top_k)
    importance = ImportanceScores.by_index(L)
    tok = word_level_tokenizer(cfg, QUESTION.split())
    pre = MolmoPreprocessor(cfg, tok)
    image = png()
    out: dict = {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "card_rates": rates,
                 "repeats": args.repeats, "answer_tokens": args.tokens, "targets": TARGETS}

    # ---------------- fast engine
    model = random_full_size(device, torch.bfloat16, seed=0).eval()
    fast_exec = FastEngine(model, max_len=args.max_len, top_k_max=max(space.top_ks),
                           triton=None if args.triton == "auto" else False)
    fast = RequestEngine(model, pre, space, importance, executor=fast_exec)
    ctl = TwoStageController(space, cfg.d_model, token_rms=fast.token_rms())
    t0 = time.perf_counter()
    warm = fast_exec.warmup(space, importance=importance)
    for t_name, crops in zip(space.tier_names, space.tier_max_crops):       # first requests per tier
        fast.serve(image, QUESTION, 1000.0, ctl, max_new_tokens=4)
    warm["seconds_with_first_requests"] = time.perf_counter() - t0
    warm["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"fast warm-up: compiled={warm['compiled']} {warm.get('compile_error', '')}")
    print(f"fast warm-up: {warm['graphs']} graphs in {warm['seconds']:.1f} s "
          f"({warm['seconds_with_first_requests']:.1f} s with first requests); peak memory {warm['gpu_memory_gib']:.1f} GiB",
          flush=True)
    def save() -> None:      # after every phase: a run cut by a time limit keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))

    fast_rows = [] if args.ab_only or args.agreement_only else time_settings(fast, space, image, args, "fast")
    out.update({"fast_warmup": warm, "fast": fast_rows})
    save()
    if not args.agreement_only:     # --agreement-only: straight to the token checks
        # switching settings after warm-up must capture nothing
        rng = np.random.default_rng(0)
        for _ in range(40):
            t, pi, ki, ni = (int(rng.integers(len(x))) for x in (space.tier_names, space.positions, space.top_ks,
                                                                   space.num_blocks))
            fixed = space.choice(t, pi, ki, ni)
            if fixed.p < fixed.num_blocks:
                fast.serve(image, QUESTION, 1000.0, ctl, fixed=fixed, max_new_tokens=4)
        warm["captures_after_warmup"] = fast_exec.captures_after_warmup
        print(f"graphs captured after warm-up while switching 40 random settings: {fast_exec.captures_after_warmup}")
        # the variants share one executor; their pairs interleave
        engines = {"stages on the device": fast}
        if args.ab_stream:           # the same engine, the draws from a UniformStream (as rollout workers do)
            engines["stages on the device, uniform stream"] = (fast, UniformStream(torch.Generator().manual_seed(0)))
        if args.ab_greedy:           # the same engine, argmax decisions (the serving path)
            engines["stages on the device, greedy"] = (fast, "greedy")
        if args.ab_early:            # the rest of the prefill queued after the decision (the default before 2026-11-27)
            late = RequestEngine(model, pre, space, importance, executor=fast_exec, early_rest_prefill=False)
            engines["stages on the device, rest of the prefill after the decision"] = late
            if args.ab_greedy:
                engines["stages on the device, rest of the prefill after the decision, greedy"] = (late, "greedy")
        if args.ab_s1_helper:        # greedy, Stage1's decision read back on the request thread (before 2026-11-27)
            engines["stages on the device, stage1 read after the decode, greedy"] = (RequestEngine(
                model, pre, space, importance, executor=fast_exec, stage1_read_in_helper=False), "greedy")
        if args.ab_no_overlap:       # both stages on the device, the Stage1 window after the decode
            engines["stages on the device, no decode overlap"] = RequestEngine(
                model, pre, space, importance, executor=fast_exec, overlap_decode=False)
        if args.ab_host_stage1:      # Stage1 (and the language feature) on the host, Stage2 on the device
            engines["stage1 on the host"] = RequestEngine(model, pre, space, importance, executor=fast_exec,
                                                          device_stage1=False)
        if args.ab_host_stage2:      # both stages on the host (the numpy act path)
            engines["stages on the host"] = RequestEngine(model, pre, space, importance, executor=fast_exec,
                                                          device_stage1=False, device_stage2=False)
        late_name = "stages on the device, rest of the prefill after the decision{}"
        variant_pairs = tuple((f"stages on the device{g}", late_name.format(g))
                              for g in ("", ", greedy") if late_name.format(g) in engines)
        if args.ab_s1_helper and args.ab_greedy:
            variant_pairs += (("stages on the device, greedy", "stages on the device, stage1 read after the decode, greedy"),)
        abs_ = controller_ab(engines, ctl, image, args.ab_pairs, args.tokens, variant_pairs)
        for name in [n for n in abs_ if " minus " in n]:
            d = abs_.pop(name)
            out.setdefault("variant_differences", {})[name] = d
            print(f"{name}: controlled arm without preprocessing {d['controlled_excl_preprocess_diff_ms_median']:+.3f} "
                  f"ms (95% CI {d['ci95'][0]:+.3f}..{d['ci95'][1]:+.3f}) over {d['pairs']} rounds with the same knobs",
                  flush=True)
        for name, ab in abs_.items():
            print(f"controller overhead on the fast engine ({name}): median {ab['overhead_ms_median']:.3f} ms (95% CI "
                  f"{ab['overhead_ms_median_ci95'][0]:.3f}..{ab['overhead_ms_median_ci95'][1]:.3f}) over {ab['pairs']} "
                  f"pairs; stage1 {ab['stage1_ms_median']:.3f} ms, stage2 {ab['stage2_ms_median']:.3f} ms; without "
                  f"preprocess: {ab['overhead_excl_preprocess_ms_median']:.3f} ms (95% CI "
                  f"{ab['overhead_excl_preprocess_ms_median_ci95'][0]:.3f}.."
                  f"{ab['overhead_excl_preprocess_ms_median_ci95'][1]:.3f}); preprocess difference "
                  f"{ab['preprocess_diff_ms_median']:.3f} ms (95% CI {ab['preprocess_diff_ms_median_ci95'][0]:.3f}.."
                  f"{ab['preprocess_diff_ms_median_ci95'][1]:.3f}); without the crops "
                  f"{ab['overhead_excl_crops_ms_median']:.3f} ms (95% CI {ab['overhead_excl_crops_ms_median_ci95'][0]:.3f}.."
                  f"{ab['overhead_excl_crops_ms_median_ci95'][1]:.3f}); decode part difference "
                  f"{ab['decode_part_diff_ms_median']:.3f} ms", flush=True)
        ab = abs_["stages on the device"]
        warm["triton"] = fast_exec.triton
        out.update({"fast_warmup": warm, "fast": fast_rows, "controller_ab_fast": ab,
                    "stage1_on_device": fast.stage1_on_device is not None,
                    "stage2_on_device": fast.stage2_on_device is not None,
                    "controller_ab_variants": abs_})
        save()
        gt = group_throughput(model, pre, space, importance, fast_exec, ctl, image, args.groups, args.group_size,
                              args.tokens)
        print(f"training rollouts (groups of {gt['group_size']}, shared preprocessing, controlled path, {gt['knobs']}): "
              f"{gt['rollouts_per_s']:.1f} rollouts/s over {gt['rollouts']} rollouts; latency median "
              f"{gt['latency_ms_median']:.2f} ms", flush=True)
        out["group_throughput"] = gt
        save()

    # ---------------- eager engine (same weights in a second copy) and token agreement
    eager_rows, agreement = [], []
    if not args.skip_eager and not args.ab_only:
        eager_model = random_full_size(device, torch.bfloat16, seed=0).eval()
        eager = RequestEngine(eager_model, pre, space, importance, executor=EagerEngine(eager_model))
        args_e = argparse.Namespace(**{**vars(args), "repeats": args.eager_repeats, "warmup": 1})
        eager_rows = [] if args.agreement_only else time_settings(eager, space, image, args_e, "eager")
        out["eager"] = eager_rows
        save()
        eager_model.vision.to(torch.bfloat16)       # same vision dtype as the fast engine for the token check
        eager_model.connector.to(torch.bfloat16)
        agreement = token_agreement(fast, eager, space, args.prompts, args.tokens)
    out.update({"eager": eager_rows, "token_agreement": agreement})
    save()
    if args.float32_check:
        if not args.skip_eager and not args.ab_only:
            del eager, eager_model
        del fast, fast_exec, model
        gc.collect()
        torch.cuda.empty_cache()
        try:
            out["token_agreement_float32"] = token_agreement_float32(device, pre, space, importance, args)
        except torch.OutOfMemoryError as exc:
            out["token_agreement_float32"] = f"out of memory: {exc}"[:300]
            print(out["token_agreement_float32"], flush=True)
        save()

    if args.agreement_only:
        for key in ("token_agreement", "token_agreement_float32"):
            rows = out.get(key) or []
            print(f"{key}: {sum(r['same_tokens'] for r in rows)} of {len(rows)} sequences equal", flush=True)
        print(f"wrote {args.out}")
        return 0

    # ---------------- floors and the table
    bw, rate = rates["bandwidth_bytes_per_s"], rates["matmul_flop_per_s"]
    table = []
    for r in fast_rows:
        f = floors(cfg, n_crops=r["num_crops"], prompt_tokens=r["prompt_tokens"], top_k=r["top_k"],
                   num_blocks=r["num_blocks"], p=1, answer_tokens=r["answer_tokens"], bw=bw, rate=rate)
        e = next((x for x in eager_rows if (x["tier"], x["top_k"], x["num_blocks"]) ==
                  (r["tier"], r["top_k"], r["num_blocks"])), None)
        row = {"tier": r["tier"], "top_k": r["top_k"], "num_blocks": r["num_blocks"], "crops": r["num_crops"],
               "prompt_tokens": r["prompt_tokens"],
               "vision_ms": r["vision_ms_median"], "vision_floor_ms": f["vision_ms"],
               "prefill_ms": r["prefill_ms"], "prefill_floor_ms": f["prefill_ms"],
               "decode_ms_per_token": r["decode_ms_per_token"], "decode_floor_ms": f["decode_ms_per_token"],
               "preprocess_ms": r["preprocess_ms_median"],
               "e2e_ms": r["latency_ms_median"], "e2e_cv": r["latency_cv"], "e2e_floor_ms": f["end_to_end_ms"],
               "rollouts_per_s": r["rollouts_per_s"], "rollouts_per_s_model_only": r["rollouts_per_s_model_only"],
               "eager_e2e_ms": e["latency_ms_median"] if e else None,
               "eager_decode_ms_per_token": e["decode_ms_per_token"] if e else None, "floor": f}
        table.append(row)
    print("\n| tier | top_k/blocks | vision ms (floor) | prefill ms (floor) | decode ms/token (floor) | preprocess ms | "
          "end-to-end ms (floor) | CV | rollouts/s (model only) | eager e2e ms | eager decode ms/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['tier']} | {r['top_k']}/{r['num_blocks']} | {r['vision_ms']:.2f} ({r['vision_floor_ms']:.2f}) | "
              f"{r['prefill_ms']:.2f} ({r['prefill_floor_ms']:.2f}) | {r['decode_ms_per_token']:.3f} "
              f"({r['decode_floor_ms']:.3f}) | {r['preprocess_ms']:.2f} | {r['e2e_ms']:.2f} ({r['e2e_floor_ms']:.2f}) | "
              f"{r['e2e_cv'] * 100:.1f}% | {r['rollouts_per_s']:.1f} ({r['rollouts_per_s_model_only']:.1f}) | "
              + (f"{r['eager_e2e_ms']:.1f} | {r['eager_decode_ms_per_token']:.2f} |" if r["eager_e2e_ms"] else "- | - |"))
    out["table"] = table
    hi = {(r["top_k"], r["num_blocks"]): r for r in table if r["tier"] == "high"}
    if (8, 16) in hi and (4, 12) in hi:
        saved = hi[(8, 16)]["decode_ms_per_token"] - hi[(4, 12)]["decode_ms_per_token"]
        floor_saved = hi[(8, 16)]["decode_floor_ms"] - hi[(4, 12)]["decode_floor_ms"]
        full = hi[(8, 16)]
        checks = {
            "vision_ms_high_full": (full["vision_ms"], TARGETS["vision_ms"]),
            "prefill_ms_high_full": (full["prefill_ms"], TARGETS["prefill_ms"]),
            "decode_ms_per_token_high_full": (full["decode_ms_per_token"], TARGETS["decode_ms_per_token"]),
            "rollouts_per_s_high_full": (full["rollouts_per_s"], TARGETS["rollouts_per_s"]),
            "rollouts_per_s_training_groups": (gt["rollouts_per_s"], TARGETS["rollouts_per_s"]),
            "decode_saving_share_of_floor_saving": (saved / floor_saved, TARGETS["decode_saving_vs_floor"]),
            "warmup_s": (warm["seconds"], TARGETS["warmup_s"]),
        }
        out["checks"] = {k: {"measured": v, "target": t} for k, (v, t) in checks.items()}
        print("\n| check (high tier, 8/16 unless named) | measured | target |\n|---|---|---|")
        for k, (v, t) in checks.items():
            print(f"| {k} | {v:.3f} | {t} |")
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
