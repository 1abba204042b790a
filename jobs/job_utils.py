"""Helpers shared by the offline jobs (compute_importance, calibrate_budget): samples of a named split,
the configured model without its importance file, a progress bar, a hardware description."""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
from typing import Iterable, Optional


def samples_for_split(cfg, split: str, max_samples: int = 0) -> list:
    """Samples of the configured mixture for `split`.

    "train" and "val" mean each source's `split` / `val_split` (as in training); any other name (e.g.
    "calibration", "validation", "test") is passed to every source's loader as is. `max_samples` > 0
    caps each source (on top of the source's own max_samples).
    """
    from shared.datasets import load_samples
    if split in ("train", "val"):
        run_cfg, which = cfg, split
    else:
        sources = [dataclasses.replace(s, split=split) for s in cfg.data.sources]
        run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources))
        which = "train"
    if max_samples:
        sources = [dataclasses.replace(s, max_samples=min(s.max_samples or max_samples, max_samples))
                   for s in run_cfg.data.sources]
        run_cfg = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data, sources=sources))
    return load_samples(run_cfg, which)


def load_model(cfg):
    """(model, preprocessor) as the rollout workers load them (device, dtype, checkpoint or random
    weights from `cfg.model`), without reading `model.importance_scores` (which may not exist yet)."""
    from rollout_workers.molmoe_backend import MolmoeBackend
    from shared.knobs import KnobSpace
    if cfg.model.backend != "molmoe":
        raise ValueError(f"model.backend is {cfg.model.backend!r}: this job needs the molmoe backend")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, importance_scores=""))
    backend = MolmoeBackend.from_config(cfg, KnobSpace.from_config(cfg.knobs, cfg.model))
    return backend.engine.model, backend.engine.pre


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", disable: bool = False):
    """A tqdm progress bar on stderr (a plain iterator when disabled)."""
    if disable:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


def hardware_description(device_type: str) -> str:
    """GPU name(s), or the CPU model and core count."""
    if device_type == "cuda":
        import torch
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores available)"
