"""Answer one request with a trained controller: the answer, the chosen knobs and the segment latencies.

Usage:
    python jobs/infer.py runs/default/bundle --image cat.jpg --question "what colour is it?" --budget-ms 250
    python jobs/infer.py runs/default --image cat.jpg --question "..." --budget-ms 250 --json
    python jobs/infer.py BUNDLE --config my.yaml --image X --question Y --budget-ms Z [key.sub=value ...]

BUNDLE is a bundle folder (bundle.json + controller.safetensors) or a run folder holding bundle/. The
config is the run's config.yaml beside the bundle unless --config is given; the bundle is refused when
its metadata (model, engine, device, calibration, knob spaces, importance hash, budget normalisation)
does not match what this config on this machine gives (budgets in ms are engine- and GPU-specific).

--image may be omitted: the MolmoE backend then serves a text-only request; the synthetic backend (no
model: answers and latencies come from its tables) ignores images altogether, so with it --image is
normally left out. The Python API is `rollout_workers.serving.BudgetedModel`.

Exit status: 0 answered, 2 bad request or mismatched/unreadable bundle or config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:          # `python jobs/infer.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder or run folder")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--image", help="image file (PNG, JPEG, ...); omit for text-only / the synthetic backend")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--budget-ms", required=True, help="latency budget in milliseconds")
    p.add_argument("--config", help="config YAML (default: the run's config.yaml beside the bundle)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length cap (default: config)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p.parse_intermixed_args(argv)


def format_result(r: dict) -> str:
    k = r["knobs"]
    seg = " | ".join(f"{name.removesuffix('_ms')} {ms:.2f}" for name, ms in r["segments_ms"].items())
    over = r["latency_ms"] - r["budget_ms"]
    status = "within budget" if r["within_budget"] else f"OVER budget by {over:.1f} ms"
    return "\n".join([
        f"answer: {r['answer']}",
        f"knobs: tier={k['tier']} (max_crops {k['max_crops']}), p={k['p']}, top_k={k['top_k']}, "
        f"num_blocks={k['num_blocks']}",
        f"latency: {r['latency_ms']:.2f} ms for a {r['budget_ms']:.1f} ms budget ({status}); "
        f"{r['num_crops']} crops, {r['vision_tokens']} vision tokens, {r['answer_tokens']} answer tokens",
        f"segments (ms): {seg}"])


def main(argv=None) -> int:
    args = parse_args(argv)
    from learner.checkpoint import CheckpointError
    from rollout_workers.serving import BudgetedModel, RequestError, resolve_bundle_dir
    from shared.config import ConfigError

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    # Cheap request checks first: no model load for a request that cannot be served.
    if not args.question.strip():
        return fail("the question is empty")
    try:
        budget = float(args.budget_ms)
    except ValueError:
        return fail(f"--budget-ms must be a number of milliseconds, got {args.budget_ms!r}")
    if not budget > 0 or budget == float("inf"):
        return fail(f"--budget-ms must be a finite positive number of milliseconds, got {args.budget_ms!r}")
    image = None
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            return fail(f"image file not found: {path}")
        try:
            image = path.read_bytes()
        except OSError as exc:
            return fail(f"image file {path} cannot be read: {exc}")
        if not image:
            return fail(f"image file {path} is empty")
    try:
        from jobs.train import _set_env
        from rollout_workers.serving import load_serving_config
        folder = resolve_bundle_dir(args.bundle)
        cfg = load_serving_config(folder, args.config, args.overrides)
        _set_env(cfg)
        model = BudgetedModel.from_bundle(folder, cfg)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    if model.info.backend == "synthetic" and image is not None:
        print("note: the synthetic backend has no model and ignores the image", file=sys.stderr)
    elif model.info.backend != "synthetic" and image is None:
        print("note: no --image: serving a text-only request", file=sys.stderr)
    rng = model.trained_budget_range_ms()
    if rng and not rng[0] <= budget <= rng[1]:
        print(f"note: {budget:g} ms is outside the budget range the controller was trained on "
              f"({rng[0]:g}..{rng[1]:g} ms)", file=sys.stderr)
    try:
        result = model.answer(image, args.question, budget, max_new_tokens=args.max_new_tokens)
    except RequestError as exc:
        return fail(str(exc))
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
