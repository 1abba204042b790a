"""Host-side preprocessing speed of one request: decode (``MolmoPreprocessor.load_image``) and
preprocessing (``MolmoPreprocessor.preprocess``) for the full-size MolmoE config, per tier.

    python bench/preprocess_speed.py --out runs/bench/preprocess_speed.json [--device cuda] [--baseline]

A fixed 1024x768 image (random pixels, as bench/request_latency.py uses) encoded as PNG and as JPEG
(quality 90); tiers max_crops 3 / 6 / 12 (3 / 7 / 13 crops). Paths:

* ``cpu``: ``preprocess(q, rgb, max_crops)``, tensors on the CPU (what the request path runs now,
  before its ``.to(device)``);
* ``cpu+to``: the same followed by ``.to(device)`` (with ``--device``): the request path today;
* ``device``: ``preprocess(q, rgb, max_crops, device=device)``: the uint8 image is uploaded and
  resized/normalised/cut on the device, every tensor returned there;
* ``cpu-old`` (with ``--baseline``): the implementation before the fast path (frozen copy in
  tests/test_preprocess_fast.py), for a before/after on the same machine.

Times are wall-clock medians over ``--repeats`` after ``--warmup``, with a device synchronisation
before the clock stops (device work is included). ``--stages`` adds a per-step breakdown of the
``cpu`` (and ``device``) paths. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from PIL import Image

from rollout_workers.molmoe import preprocessing as pp
from rollout_workers.molmoe.config import MolmoeConfig
from rollout_workers.molmoe_backend import word_level_tokenizer

QUESTION = "what colour is the small circle in the top left corner of the picture"
TIER_NAMES = {3: "low", 6: "medium", 12: "high"}


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG or JPEG (quality 90) bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def synchroniser(device: torch.device | None) -> Callable[[], None]:
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn()`` (synchronised) in milliseconds."""
    for _ in range(warmup):
        fn()
    sync()
    times_ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times_ms)


def stage_ms(
    pre: pp.MolmoPreprocessor, rgb: np.ndarray, max_crops: int, device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median ms of each step of the fast path (the steps of ``preprocess`` / ``crop_pixels``)."""
    cfg = pre.config
    dev = torch.device(device) if device is not None else torch.device("cpu")
    sync = synchroniser(dev)
    height, width = rgb.shape[:2]
    plan = pp.crop_plan(height, width, cfg, max_crops)
    norm = pp.Normalisation.build(cfg, dev)
    host_u8 = pp._host_tensor(rgb)
    image_u8 = host_u8.to(dev)
    image01 = pp.unit_float_image(image_u8)
    s, p = plan.crop_patches, plan.patch_px
    rows, cols = plan.tiling
    tiled = pp.normalised_canvas(image01, plan.tiled_pad, norm)
    out = torch.empty((plan.num_crops, s * s, p * p * 3), device=dev)

    def cut():
        view = out[1:].view(rows, cols, s, s, p, p, 3)
        view.copy_(pp.patch_windows(tiled, (rows, cols), plan.window_px, plan.crop_px, p))

    steps = {
        "tokenise": lambda: pre.prompt_ids(QUESTION),
        "plan+layout (cached)": lambda: (
            pp.crop_plan(height, width, cfg, max_crops),
            pp.token_layout(cfg, plan.tiling),
            pp.image_layout(width, height, cfg, max_crops),
        ),
        "masks": lambda: pp.crop_masks(plan),
        "upload u8": (lambda: host_u8.to(dev)) if dev.type != "cpu" else None,
        "u8->float/255": lambda: pp.unit_float_image(image_u8),
        "global canvas (resize+norm+pad)": lambda: pp.normalised_canvas(image01, plan.global_pad, norm),
        "tiled canvas (resize+norm+pad)": lambda: pp.normalised_canvas(image01, plan.tiled_pad, norm),
        "cut+patchify tiled crops": cut,
    }
    return {k: median_ms(f, repeats, warmup, sync) for k, f in steps.items() if f is not None}


def request_paths(
    pre: pp.MolmoPreprocessor, rgb: np.ndarray, max_crops: int, device, baseline
) -> dict[str, Callable[[], object]]:
    """The timed variants of one request's preprocessing (see the module docstring)."""
    paths = {"cpu": lambda: pre.preprocess(QUESTION, rgb, max_crops=max_crops)}
    if baseline is not None:
        paths["cpu-old"] = lambda: baseline(pre, QUESTION, rgb, max_crops)
    if device is not None:
        paths["cpu+to"] = lambda: pre.preprocess(QUESTION, rgb, max_crops=max_crops).to(device)
        paths["device"] = lambda: pre.preprocess(QUESTION, rgb, max_crops=max_crops, device=device)
    return paths


def load_baseline():
    """The frozen pre-change implementation from tests/test_preprocess_fast.py (None if absent)."""
    try:
        sys.path.insert(0, str(REPO / "tests"))
        import test_preprocess_fast as frozen

        return frozen._frozen_preprocess
    except Exception as e:  # noqa: BLE001 - the baseline is optional
        print(f"(no baseline: {e})")
        return None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    gc.disable()  # no collector pauses inside measurements
    device = torch.device(args.device) if args.device else None
    sync = synchroniser(device)
    cfg = MolmoeConfig.full()
    pre = pp.MolmoPreprocessor(cfg, word_level_tokenizer(cfg, QUESTION.split()))
    width, height = (int(v) for v in args.size.lower().split("x"))
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    baseline = load_baseline() if args.baseline else None
    rows = []
    for fmt in args.formats.upper().split(","):
        data = encode(rgb, fmt)
        decode_ms = median_ms(lambda d=data: pre.load_image(d), args.repeats, args.warmup, lambda: None)
        decoded = pre.load_image(data)
        for mc in (int(t) for t in args.tiers.split(",")):
            crops = pre.image_layout(width, height, mc).num_crops
            for path, fn in request_paths(pre, decoded, mc, device, baseline).items():
                gc.collect()
                ms = median_ms(fn, args.repeats, args.warmup, sync)
                rows.append(
                    {
                        "tier": TIER_NAMES.get(mc, str(mc)),
                        "max_crops": mc,
                        "crops": crops,
                        "format": fmt,
                        "path": path,
                        "decode_ms": round(decode_ms, 3),
                        "preprocess_ms": round(ms, 3),
                        "total_ms": round(decode_ms + ms, 3),
                    }
                )
    stages = {}
    if args.stages:
        for mc in (int(t) for t in args.tiers.split(",")):
            stages[f"cpu/{mc}"] = stage_ms(pre, rgb, mc, None, args.repeats, args.warmup)
            if device is not None:
                stages[f"device/{mc}"] = stage_ms(pre, rgb, mc, device, args.repeats, args.warmup)
    cuda = device is not None and device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "image": f"{width}x{height} random pixels",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "stages_ms": stages,
    }


def print_table(result: dict) -> None:
    print(
        f"{result['device']} | torch {result['torch']} | {result['torch_threads']} threads of "
        f"{result['cpu_count']} CPUs | {result['image']} | median of {result['repeats']}"
    )
    print("| tier | crops | format | path | decode ms | preprocess ms | total ms |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['tier']} | {r['crops']} | {r['format']} | {r['path']} | {r['decode_ms']:.2f} "
            f"| {r['preprocess_ms']:.2f} | {r['total_ms']:.2f} |"
        )
    for key, steps in result["stages_ms"].items():
        print(f"stages {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/preprocess_speed.json")
    ap.add_argument("--device", default=None, help="e.g. cuda: also time the device path")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads (the workers use 4)")
    ap.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the test image")
    ap.add_argument("--tiers", default="3,6,12", help="comma list of max_crops")
    ap.add_argument("--formats", default="png,jpeg")
    ap.add_argument("--baseline", action="store_true", help="also time the pre-change implementation")
    ap.add_argument("--stages", action="store_true", help="per-step breakdown of the fast path")
    args = ap.parse_args(argv)
    result = run(args)
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
