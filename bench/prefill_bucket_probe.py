"""How much the prefill pays for padding to its length bucket (issue 8), full-size MolmoE, random bf16 weights.

    python bench/prefill_bucket_probe.py --out runs/bench/prefill_bucket.json [--tokens 1215] [--buckets 1216 1280]

The fast engine pads a prompt to a multiple of ``model.fast_prefill_bucket`` positions (one prefill graph per
block and bucket; 128 by default until this probe, 64 since). For the high tier's 1,215-token prompt that is
1,280 positions at 128 and 1,216 at 64. This
captures the 16 blocks' prefill graphs at each padded length given and times them (CUDA events around the
replays of all 16 blocks at native top_k, median of 20). Prints a table and writes JSON.

``--real-prompt`` instead feeds the high tier's real prompt embeddings (the rollout benchmark's 1024x768 PNG
and question, cut to 12 crops and encoded by the engine) and times ``FastEngine.prefill`` itself (the copy into
the bucket's buffer, the padding's zeroing and the 16 blocks' graphs, as the request path runs it) for each
bucket SIZE in ``--bucket-sizes``, interleaved round by round so that drift of the card affects all alike:

    python bench/prefill_bucket_probe.py --real-prompt --bucket-sizes 64 128 --rounds 60
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/prefill_bucket.json")
    ap.add_argument("--tokens", type=int, default=1215)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1216, 1280])
    ap.add_argument("--real-prompt", action="store_true")
    ap.add_argument("--bucket-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from rollout_workers.fast_engine import FastEngine
    from rollout_workers.molmoe.loader import random_full_size
    dev = torch.device("cuda")
    model = random_full_size(dev, torch.bfloat16, seed=0).eval()
    eng = FastEngine(model, max_len=2048, top_k_max=8)
    torch.set_grad_enabled(False)
    # the first padded length compiled gets a shape-specialised kernel, every later one the dynamic kernel:
    # compile a short prompt first, as FastEngine.warmup does, so that the timed lengths all run the dynamic
    # kernel, as they do in the request path (the first version of this probe did not, and favoured 1,216)
    for T in (17, 33):
        eng.prefill(torch.zeros(1, T, model.config.d_model, device=dev, dtype=torch.bfloat16), [0], {})
    if args.real_prompt:
        return real_prompt(args, eng, model)
    x = torch.randn(1, args.tokens, model.config.d_model, device=dev, dtype=torch.bfloat16)
    rows = []
    for Tb in args.buckets:
        t0 = time.perf_counter()
        buf = eng._prefill_buffers(Tb)[0]
        graphs = [eng._prefill_graph(b, Tb) for b in range(eng.n_layers)]
        capture_s = time.perf_counter() - t0
        times = []
        for _ in range(23):
            buf[:, :args.tokens].copy_(x)
            buf[:, args.tokens:].zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for g in graphs:
                g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        rows.append({"tokens": args.tokens, "padded_to": Tb, "prefill_16_blocks_ms": statistics.median(times[3:]),
                     "capture_s": capture_s})
        print(rows[-1], flush=True)
    print("\n| prompt tokens | padded to | 16 blocks' prefill ms (graph replays) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['padded_to']} | {r['prefill_16_blocks_ms']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
                                          "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


def real_prompt(args, eng, model) -> int:
    from bench.rollout_speed import QUESTION, png
    from rollout_workers.molmoe.preprocessing import MolmoPreprocessor
    from rollout_workers.molmoe_backend import word_level_tokenizer
    cfg = model.config
    pre = MolmoPreprocessor(cfg, word_level_tokenizer(cfg, QUESTION.split()))
    rgb = pre.load_image(png())
    inputs = pre.preprocess(QUESTION, rgb, max_crops=12, device=eng.preprocess_device).to(eng.device)
    x = eng.encode(inputs).clone()
    T, blocks = x.shape[1], list(range(eng.n_layers))
    for size in args.bucket_sizes:           # capture each bucket's graphs before timing
        eng.prefill_bucket = size
        eng.prefill(x, blocks, {})
    times: dict = {size: [] for size in args.bucket_sizes}
    for r in range(args.rounds):
        for size in (args.bucket_sizes if r % 2 == 0 else args.bucket_sizes[::-1]):
            eng.prefill_bucket = size
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            eng.prefill(x, blocks, {})
            b.record()
            b.synchronize()
            times[size].append(a.elapsed_time(b))
    rows = []
    for size, ts in times.items():
        eng.prefill_bucket = size
        ts = sorted(ts[5:])
        rows.append({"tokens": T, "bucket": size, "padded_to": eng._prefill_bucket(T),
                     "prefill_ms_median": statistics.median(ts), "prefill_ms_p10": ts[len(ts) // 10],
                     "prefill_ms_p90": ts[len(ts) * 9 // 10]})
    print("\n| prompt tokens | bucket | padded to | FastEngine.prefill ms, median (p10-p90) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['bucket']} | {r['padded_to']} | {r['prefill_ms_median']:.3f} "
              f"({r['prefill_ms_p10']:.3f}-{r['prefill_ms_p90']:.3f}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
                                          "torch": torch.__version__, "mode": "real_prompt", "rounds": args.rounds,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
