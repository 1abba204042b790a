"""Backend factory: builds the rollout backend a config asks for (no Ray here)."""
from __future__ import annotations

from shared.backend import RolloutBackend
from shared.knobs import KnobSpace


def make_backend(cfg, worker_id: int = 0) -> RolloutBackend:
    """The configured backend for one worker (each worker seeds its own noise)."""
    space = KnobSpace.from_config(cfg.knobs, cfg.model)
    if cfg.model.backend == "synthetic":
        from rollout_workers.synthetic_backend import SyntheticBackend, SyntheticTables
        tables = SyntheticTables(space, cfg.synthetic.num_question_types, cfg.synthetic.latency_noise,
                                 cfg.synthetic.table_seed, cfg.model.d_model)
        return SyntheticBackend(tables, seed=cfg.system.seed * 1000 + worker_id + 1)
    if cfg.model.backend == "molmoe":
        from rollout_workers.molmoe_backend import MolmoeBackend
        return MolmoeBackend.from_config(cfg, space, worker_id=worker_id)
    raise ValueError(f"unknown rollout backend {cfg.model.backend!r}")
