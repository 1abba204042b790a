"""Data sets of a run, as lists of `Sample` (ids are stable across processes and restarts).

Sources are named in `cfg.data.sources`. `synthetic` is the bandit of the tests (its samples come from
the synthetic backend's tables); image data sets register loaders in `LOADERS`.
"""
from __future__ import annotations

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
        n, seed, prefix = max(cfg.data.val_samples, 1), source.seed + 104729, f"syn-{split}"
    return synthetic_samples(tables, n, seed, prefix=prefix)


LOADERS["synthetic"] = _synthetic


def load_samples(cfg, split: str = "train") -> list[Sample]:
    """All samples of the configured mixture for `split` ("train" = each source's split, "val" = its
    val_split). Mixture weights repeat or subsample sources deterministically by max_samples."""
    out: list[Sample] = []
    for src in cfg.data.sources:
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
