"""How often MolmoE's padding rule zeroes a real crop, and whether the CPU and device preprocessing agree.

    python bench/padding_rule_frequency.py --out runs/bench/padding_rule.json [--device cuda] [--images 20]

The official model multiplies a crop's features by 0 when ANY of its normalised pixels equals exactly -1
(meant for padding crops; replicated as is, docs/MODEL.md). A real image's resized, normalised pixel can
land on -1.0 exactly, and the host path (numpy/torch on the CPU, the released processor's maths) and the
device path (the same maths on ``--device``, float rounding apart) can disagree on it. For random-pixel
1024x768-ish PNGs (as the benchmarks use) and smooth gradient images, at max_crops 12 / 6 / 3: how many
images have a crop with an exact -1 on each path, and on how many the paths disagree. Prints a table
and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.rollout_speed import QUESTION, png  # noqa: E402
from rollout_workers.molmoe.config import MolmoeConfig  # noqa: E402
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor  # noqa: E402
from rollout_workers.molmoe_backend import word_level_tokenizer  # noqa: E402


def gradient(seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:768, 0:1024]
    s = seed
    return np.stack([(xx * (s + 1) // 4) % 256, (yy * (s + 2) // 3) % 256, ((xx + yy) // (s + 1)) % 256],
                    -1).astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/padding_rule.json")
    ap.add_argument("--device", default="cpu", help="where the device path runs (cpu runs the same code on the CPU)")
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    cfg = MolmoeConfig.full()
    pre = MolmoPreprocessor(cfg, word_level_tokenizer(cfg, QUESTION.split()))
    kinds = {"random_pixels": lambda s: pre.load_image(png(1024 - 64 * (s % 5), 768, seed=100 + s)),
             "gradient": gradient}
    rows = []
    for kind, make in kinds.items():
        for max_crops in (12, 6, 3):
            host_hits = dev_hits = disagree = 0
            for s in range(args.images):
                rgb = make(s)
                a = pre.preprocess(QUESTION, rgb, max_crops=max_crops)
                b = pre.preprocess(QUESTION, rgb, max_crops=max_crops, device=args.device)
                ca = (a.images == -1).any(-1).any(-1)
                cb = (b.images.cpu() == -1).any(-1).any(-1)
                host_hits += int(ca.any())
                dev_hits += int(cb.any())
                disagree += int((ca != cb).any())
            rows.append({"images": kind, "max_crops": max_crops, "n": args.images, "host_path_zeroed": host_hits,
                         "device_path_zeroed": dev_hits, "paths_disagree": disagree})
    print(f"\n| images | max_crops | n | a crop zeroed (host path) | (device path, {args.device}) | paths disagree |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['max_crops']} | {r['n']} | {r['host_path_zeroed']} | {r['device_path_zeroed']} | "
              f"{r['paths_disagree']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": args.device,
                                          "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
