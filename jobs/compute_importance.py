"""Per-block importance of the frozen LLM by ablation, written as the ImportanceScores JSON the knobs read.

    python jobs/compute_importance.py --config jobs/configs/X.yaml [--split calibration] [--max-samples 200]
                                      [--out PATH] [overrides key.sub=value ...]

For every sample of the split (full compute: the largest tier, native top_k, every block), and then
for every block i with block i removed (block 0 included in the report, although it always runs),
two numbers are measured:

- loss: the mean teacher-forced negative log-likelihood (nats per token) of the reference answer
  (" " + answer, then EOS, in the model's prompt format), averaged over samples;
- accuracy: the greedy answer (the sample's max_new_tokens, cached decode over the same blocks)
  scored with the sample's metric, averaged over samples.

The reference answer is `sample.meta["reference"]` when a loader sets one (e.g. the letter for
multiple choice), else the most frequent of the sample's answers (first on ties).

Importance score of block i (higher = more important), as `shared.knobs.select_blocks` expects:

    score_i = round(loss_without_i - loss_full, 6) + 4e-7 * (acc_full - acc_without_i)

i.e. the loss increase in nats, with ties (equal to 1e-6 nats) broken by the accuracy drop: the
accuracy term is below half the rounding step, so it never reorders distinct loss increases. The loss
is the primary signal because it is dense: with a few hundred calibration samples many single-block
accuracy drops are equal (often 0), while the loss still ranks the blocks.

The JSON (ImportanceScores format plus details) goes to --out, else to `model.importance_scores` if
the config names a file, else `importance.json` in the checkpoint folder ("beside the model").
The image is decoded and encoded once per sample; each ablation re-runs only the LLM. A sample whose
image cannot be decoded is skipped and counted. Works on CPU and GPU (device/dtype from the config).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from shared.backend import Sample, SampleError  # noqa: E402
from shared.scorers import extract_answer, score  # noqa: E402

TIE_WEIGHT = 4e-7
LOSS_DECIMALS = 6
METHOD = (f"ablation: score = round(loss_without_block - loss_full, {LOSS_DECIMALS}) + {TIE_WEIGHT:g} * "
          f"(acc_full - acc_without_block); loss = mean teacher-forced NLL of the reference answer (nats/token)")


def reference_answer(sample: Sample) -> str:
    """The answer the loss is measured on: meta['reference'], else the most frequent answer."""
    ref = sample.meta.get("reference") if sample.meta else None
    if ref:
        return str(ref)
    if not sample.answers:
        raise SampleError(f"sample {sample.sample_id} has no reference answer")
    return Counter(sample.answers).most_common(1)[0][0]


def combine(loss_full: float, acc_full: float, losses: Sequence[float], accs: Sequence[float]) -> list[float]:
    """Importance scores from the ablation results (see the module doc)."""
    return [round(lo - loss_full, LOSS_DECIMALS) + TIE_WEIGHT * (acc_full - a) for lo, a in zip(losses, accs)]


class Ablator:
    """Runs one sample under several block sets: teacher-forced answer loss and greedy accuracy."""

    def __init__(self, model, preprocessor, max_crops: int):
        self.model = model.eval()
        self.pre = preprocessor
        self.tok = preprocessor.tokenizer
        self.max_crops = max_crops
        self.n_layers = model.config.n_layers
        self.eos = model.config.eos_token_id

    @torch.no_grad()
    def prepare(self, sample: Sample):
        """Input embeddings (vision run once) and the answer ids; SampleError for a bad sample."""
        rgb = None
        if sample.image is not None:
            try:
                rgb = self.pre.load_image(sample.image)
            except ValueError as exc:
                raise SampleError(f"bad image: {exc}") from exc
        inputs = self.pre.preprocess(sample.question, rgb, max_crops=self.max_crops).to(self.model.device)
        if inputs.num_tokens > self.model.config.max_sequence_length:
            raise SampleError(f"prompt of {inputs.num_tokens} tokens exceeds the model's context")
        feats = None
        if inputs.images is not None:
            feats = self.model.encode_images(inputs.images, inputs.image_masks)
        x = self.model.embed(inputs.input_ids, image_features=feats, image_input_idx=inputs.image_input_idx)
        answer_ids = self.tok.encode(" " + reference_answer(sample)) + [self.eos]
        return x, answer_ids

    @torch.no_grad()
    def run(self, x: torch.Tensor, answer_ids: list[int], block_ids: Sequence[int],
            max_new_tokens: int) -> tuple[float, str]:
        """(mean answer-token NLL, greedy answer text) with only `block_ids` running."""
        model, dev = self.model, self.model.device
        T = x.shape[1]
        n = len(answer_ids)
        cache = model.new_cache(block_ids)
        h = model.run_blocks(x, block_ids, cache=cache)
        first = model.head(h[:, -1:])                                   # predicts answer_ids[0]
        logits = [first[0].float()]
        if n > 1:                                                        # teacher forcing through the cache
            emb = model.embed_tokens(torch.tensor(answer_ids[:-1], device=dev))
            pos = torch.arange(T, T + n - 1, device=dev)[None]
            h2 = model.run_blocks(emb, block_ids, position_ids=pos, cache=cache)
            logits.append(model.head(h2)[0].float())
            for b in block_ids:                                          # back to the prompt for decoding
                layer = cache.layers[b]
                layer.keys = layer.keys[..., :T, :]
                layer.values = layer.values[..., :T, :]
        targets = torch.tensor(answer_ids, device=dev)
        nll = float(torch.nn.functional.cross_entropy(torch.cat(logits, 0), targets))
        out: list[int] = []
        step_logits = first
        for step in range(max_new_tokens):
            next_id = int(step_logits[0, -1].argmax())
            out.append(next_id)
            if next_id == self.eos or step == max_new_tokens - 1:
                break
            emb = model.embed_tokens(torch.tensor([next_id], device=dev))
            pos = torch.tensor([[T + step]], device=dev)
            step_logits = model.head(model.run_blocks(emb, block_ids, position_ids=pos, cache=cache))
        return nll, self.tok.decode([i for i in out if i != self.eos])


def compute_importance(model, preprocessor, samples: Sequence[Sample], *, max_crops: int,
                       show_progress: bool = True) -> dict:
    """Ablate every block on `samples`; returns the report (scores + per-block details)."""
    ab = Ablator(model, preprocessor, max_crops)
    L = ab.n_layers
    if L < 2:
        raise ValueError("importance by ablation needs a model with at least 2 blocks")
    configs: list[Optional[int]] = [None, *range(L)]                     # None = full model
    loss_sum = [0.0] * len(configs)
    acc_sum = [0.0] * len(configs)
    used = 0
    skipped: list[str] = []
    for sample in _progress(samples, show_progress):
        try:
            x, answer_ids = ab.prepare(sample)
            results = []
            for drop in configs:
                ids = [b for b in range(L) if b != drop]
                nll, text = ab.run(x, answer_ids, ids, sample.max_new_tokens)
                results.append((nll, score(sample.metric, extract_answer(text), sample.answers)))
        except SampleError as exc:
            skipped.append(f"{sample.sample_id}: {exc}")
            continue
        for j, (nll, acc) in enumerate(results):
            loss_sum[j] += nll
            acc_sum[j] += acc
        used += 1
    if used == 0:
        raise ValueError(f"no usable samples ({len(skipped)} skipped: {skipped[:3]})")
    loss = [s / used for s in loss_sum]
    acc = [s / used for s in acc_sum]
    scores = combine(loss[0], acc[0], loss[1:], acc[1:])
    blocks = [{"block": i, "loss": loss[i + 1], "accuracy": acc[i + 1], "loss_increase": loss[i + 1] - loss[0],
               "accuracy_drop": acc[0] - acc[i + 1], "score": scores[i], "always_kept": i == 0}
              for i in range(L)]
    removal_order = sorted(range(1, L), key=lambda i: (scores[i], -i))   # least important first
    return {"method": METHOD, "scores": scores, "num_layers": L, "num_samples": used,
            "skipped": len(skipped), "skipped_examples": skipped[:10],
            "full": {"loss": loss[0], "accuracy": acc[0]}, "blocks": blocks, "removal_order": removal_order,
            "max_crops": max_crops}


def _progress(samples, show):
    from jobs.job_utils import progress
    return progress(samples, total=len(samples), desc="importance (samples)", disable=not show)


def default_out(cfg) -> Path:
    if cfg.model.importance_scores:
        return Path(cfg.model.importance_scores)
    if cfg.model.checkpoint:
        return Path(cfg.model.checkpoint) / "importance.json"
    raise SystemExit("error: no output path: give --out (the model has no checkpoint folder and the config names "
                     "no model.importance_scores file)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (model, data sources)")
    ap.add_argument("--split", default="calibration",
                    help="'train'/'val' = each source's split/val_split; another name is passed to the loaders "
                         "as is (default: calibration, the shapes set's held-out calibration split; real data "
                         "sets have none: use train)")
    ap.add_argument("--max-samples", type=int, default=200, help="samples per source (0 = all; default 200)")
    ap.add_argument("--out", help="output JSON (default: model.importance_scores, else <checkpoint>/importance.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jobs.job_utils import load_model, samples_for_split
    from shared.config import load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(cfg)
    torch.set_num_threads(cfg.system.torch_threads)
    t0 = time.monotonic()
    try:
        samples = samples_for_split(cfg, args.split, args.max_samples)
        if not samples:
            raise ValueError(f"split {args.split!r} has no samples")
        model, pre = load_model(cfg)
        report = compute_importance(model, pre, samples, max_crops=max(cfg.knobs.tier_max_crops),
                                    show_progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = {"model_id": cfg.model.model_id, **report, "split": args.split,
              "sources": [s.name for s in cfg.data.sources], "checkpoint": cfg.model.checkpoint,
              "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
              "seconds": round(time.monotonic() - t0, 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "jobs/compute_importance.py", *(argv if argv is not None else sys.argv[1:])])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    full = report["full"]
    print(f"[importance] {report['num_samples']} samples ({report['skipped']} skipped), full model: loss "
          f"{full['loss']:.4f}, accuracy {full['accuracy']:.3f}")
    for b in report["blocks"]:
        print(f"  block {b['block']:2d}: loss {b['loss']:.4f} ({b['loss_increase']:+.4f})  accuracy "
              f"{b['accuracy']:.3f} ({b['accuracy'] - full['accuracy']:+.3f})  score {b['score']:+.6f}"
              f"{'  (always kept)' if b['always_kept'] else ''}")
    print(f"[importance] removal order (least important first): {report['removal_order']}")
    print(f"[importance] wrote {out} in {report['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
