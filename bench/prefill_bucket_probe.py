"""How much the prefill pays for padding to its length bucket (issue 8), full-size MolmoE, random bf16 weights.

    python bench/prefill_bucket_probe.py --out runs/bench/prefill_bucket.json [--tokens 1215] [--buckets 1216 1280]

The fast engine pads a prompt to a multiple of ``model.fast_prefill_bucket`` positions (one prefill graph per
block and bucket; 128 by default until this probe, 64 since). For the high tier's 1,215-token prompt that is
1,280 positions at 128 and 1,216 at 64. This
captures the 16 blocks' prefill graphs at each padded length given and times them (CUDA events around the
replays of all 16 blocks at native top_k, median of 20). Prints a table and writes JSON.
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
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from rollout_workers.fast_engine import FastEngine
    from rollout_workers.molmoe.loader import random_full_size
    dev = torch.device("cuda")
    model = random_full_size(dev, torch.bfloat16, seed=0).eval()
    eng = FastEngine(model, max_len=2048, top_k_max=8)
    x = torch.randn(1, args.tokens, model.config.d_model, device=dev, dtype=torch.bfloat16)
    rows = []
    torch.set_grad_enabled(False)
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


if __name__ == "__main__":
    sys.exit(main())
