"""Data sets of a run, as lists of `Sample` (ids are stable across processes and restarts).

Sources are named in `cfg.data.sources`. `synthetic` is the bandit of the tests (its samples come from
the synthetic backend's tables); image data sets register loaders in `LOADERS`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from shared.backend import Sample

LOADERS: dict[str, Callable] = {}
"""name -> loader(source_cfg, split, run_cfg) -> list[Sample]; filled by data modules on import."""


def _synthetic(source, split: str, cfg) -> list[Sample]:
    from shared.knobs import KnobSpace
    from rollout_workers.synthetic_backend import SyntheticTables, synthetic_samples
    space = KnobSpace.from_config(cfg.knobs, cfg.model)
    tables = SyntheticTables(space, cfg.synthetic.num_question_types, cfg.synthetic.latency_noise,
                             cfg.synthetic.table_seed, cfg.model.d_model)
    if split == source.split:
        n, seed, prefix = cfg.synthetic.num_samples, source.seed, "syn"
    else:
        salt = int.from_bytes(split.encode()[:6].ljust(6, b"\0"), "little") % 1_000_003
        n, seed, prefix = max(cfg.data.val_samples, 1), source.seed + 104729 + salt, f"syn-{split}"
    return synthetic_samples(tables, n, seed, prefix=prefix)


LOADERS["synthetic"] = _synthetic


def _bench_images(source, split: str, cfg) -> list[Sample]:
    """Timing-only samples: deterministic noise images in common sizes (4:3, 16:9, square, portrait) and
    one question. Accuracy on them is meaningless; they exercise every tier of the full-size model."""
    import io

    import numpy as np
    from PIL import Image
    sizes = [(1024, 768), (1280, 720), (1024, 1024), (768, 1024), (640, 480)]
    n = source.max_samples or 64
    offset = 0 if split == source.split else 1_000_000
    out = []
    for i in range(n):
        rng = np.random.default_rng(source.seed * 7919 + offset + i)
        w, h = sizes[i % len(sizes)]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(buf, "JPEG")
        out.append(Sample(sample_id=f"bench-{split}-{i:06d}", question="what is in the image", answers=["yes"],
                          metric=source.metric, question_type=f"{w}x{h}", source="bench_images", image=buf.getvalue(),
                          max_new_tokens=source.max_new_tokens or 16))
    return out


LOADERS["bench_images"] = _bench_images


def load_samples(cfg, split: str = "train") -> list[Sample]:
    """All samples of the configured mixture for `split` ("train" = each source's split, "val" = its
    val_split, at most data.val_samples per source; none when data.val_samples is 0)."""
    out: list[Sample] = []
    if split != "train" and cfg.data.val_samples == 0:
        return out                      # validation off: nothing to generate or read
    for src in cfg.data.sources:
        if split != "train":            # held-out splits are sized by data.val_samples
            cap = min(src.max_samples or cfg.data.val_samples, cfg.data.val_samples)
            src = dataclasses.replace(src, max_samples=cap)
        if src.name not in LOADERS:
            _import_loaders()
        if src.name not in LOADERS:
            raise ValueError(f"unknown data source {src.name!r}; known: {sorted(LOADERS)}")
        which = src.split if split == "train" else src.val_split
        samples = LOADERS[src.name](src, which, cfg)
        if src.max_samples:
            samples = samples[: src.max_samples]
        for s in samples:
            s.metric = s.metric or src.metric
            if src.max_new_tokens:
                s.max_new_tokens = src.max_new_tokens
        out.extend(samples)
    ids = [s.sample_id for s in out]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids collide across data sources; give each source distinct ids")
    return out


def _import_loaders() -> None:
    """Import optional data modules that register loaders (image data sets)."""
    try:
        import shared.vqa_data  # noqa: F401
    except ImportError:
        pass
    import shared.shapes  # noqa: F401  (registers "shapes")
