"""Whether the decode overlap (RequestEngine overlap_decode) slows the image decode on a GPU host: host times
(perf_counter) of a 1024x768 PNG decode alone and with the device Stage1 window in a helper thread, step by
step, on the tiny model (CUDA; on CPU the same code runs without graphs).

    python3 bench/decode_overlap_probe.py --out decode_overlap_probe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rollout_speed import png  # noqa: E402
from rollout_workers.molmoe.loader import load_molmoe  # noqa: E402
from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from rollout_workers.molmoe.preprocessing import decode_image  # noqa: E402
from rollout_workers.request_path import RequestEngine  # noqa: E402
from shared.controller import TwoStageController, uniform_pair  # noqa: E402
from shared.knobs import ImportanceScores, KnobSpace  # noqa: E402

QUESTION = "what colour is the small circle"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/decode_overlap_probe.json")
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_molmoe(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=3), device)
    cfg = bundle.model.config
    L = cfg.n_layers
    space = KnobSpace(("low", "medium", "high"), (1, 2, 4), tuple(range(1, L)), tuple(range(1, cfg.top_k + 1)),
                      tuple(range(2, L + 1)), L, cfg.num_experts, cfg.top_k)
    eng = RequestEngine(bundle.model, bundle.preprocessor, space, ImportanceScores.by_index(L), device_stage1=True)
    ctl = TwoStageController(space, cfg.d_model, token_rms=eng.token_rms())
    image = png()
    gen = torch.Generator().manual_seed(0)
    ds = eng.stage1_on_device
    q_ids = eng.question_ids(QUESTION)
    tiers = [int(c[1]) for c in eng.pre.tier_token_counts(1024, 768, space.tier_max_crops)]
    tmask, pmask = space.tier_mask(tiers), [True] * len(space.positions)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    pool = ThreadPoolExecutor(1)
    helper_ms: list = []

    def window(use_stream: bool = True):
        t0 = time.perf_counter()
        ctx = torch.cuda.stream(stream) if (use_stream and stream is not None) else nullcontext()
        with torch.no_grad(), ctx:
            ds.prepare(ctl, 40.0)
            ds.queue(q_ids, tiers, tmask, pmask, uniform_pair(gen))
        helper_ms.append((time.perf_counter() - t0) * 1e3)

    def window_python_only():
        t0 = time.perf_counter()
        uniform_pair(gen)
        ds._scal_np[:5] = [1, 2, 3, 4, 5]
        helper_ms.append((time.perf_counter() - t0) * 1e3)

    def sequential():
        decode_image(image)
        window()
        ds.result()

    def overlapped(fn):
        def run():
            f = pool.submit(fn)
            decode_image(image)
            f.result()
            if fn is window or fn is window_no_stream:
                ds.result()
        return run

    def window_no_stream():
        window(use_stream=False)

    for _ in range(3):
        eng.serve(image, QUESTION, 40.0, ctl, max_new_tokens=2)
    variants = {
        "decode alone": lambda: decode_image(image),
        "decode, then the window (sequential)": sequential,
        "decode + helper no-op": overlapped(lambda: None),
        "decode + helper python only": overlapped(window_python_only),
        "decode + helper window": overlapped(window),
        "decode + helper window, no stream context": overlapped(window_no_stream),
    }
    rows = {}
    for name, fn in variants.items():
        helper_ms.clear()
        ts = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        rows[name] = {"host_ms_median": statistics.median(ts), "host_ms_p90": float(np.percentile(ts, 90)),
                      "helper_ms_median": statistics.median(helper_ms) if helper_ms else None}
        print(f"{name:45s} {rows[name]['host_ms_median']:8.2f} ms (p90 {rows[name]['host_ms_p90']:.2f}); helper "
              f"{rows[name]['helper_ms_median']}", flush=True)
    for overlap in (False, True, False, True):
        eng.overlap_decode = overlap
        pre, tot = [], []
        for _ in range(args.repeats):
            r = eng.serve(image, QUESTION, 40.0, ctl, max_new_tokens=2, generator=gen)
            pre.append(r.segments_ms["preprocess_ms"])
            tot.append(r.host_latency_ms)
        key = f"serve, overlap_decode={overlap}"
        assert eng.decode_overlapped > 0 or not overlap, "the overlap did not run"
        rows.setdefault(key, []).append({"preprocess_ms_median": statistics.median(pre),
                                         "host_latency_ms_median": statistics.median(tot)})
        print(f"{key}: preprocess {statistics.median(pre):.2f} ms, host latency {statistics.median(tot):.2f} ms",
              flush=True)
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d"), "png_bytes": len(image), "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
