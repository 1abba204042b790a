"""Rollout records: one dataclass definition that yields both the Python record and its Arrow schema.

A record is one rollout (one request under one knob choice). Workers fill everything except the
learner-owned fields (`step`, `advantage`, `ratio_first`), which the learner sets when it commits the
group to a batch. Records travel worker -> Ray -> learner as plain dicts of Python/numpy values (no
tensors) and are appended to Parquet by the learner.

Pure module: pyarrow and numpy only.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, get_type_hints

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

SEGMENTS = ("preprocess_ms", "stage1_ms", "vision_ms", "prefix_ms", "stage2_ms", "prefill_rest_ms",
            "decode_ms", "postprocess_ms")
"""End-to-end latency segments, in request order (decode_ms is the whole decode; see decode_ms_per_token)."""


@dataclass
class RolloutRecord:
    # -- identity ------------------------------------------------------------------------------
    sample_id: str
    group_id: str                      # "{sample_id}/{budget draw}"; the GRPO group key
    rollout_index: int                 # 0..G-1 within the group
    worker_id: int
    policy_version: int                # controller weights that produced it
    source: str                        # data source name
    question_type: str
    metric: str                        # accuracy scorer
    budget_ms: float
    # -- Stage1 features -----------------------------------------------------------------------
    lang_feat: list[float]             # [d_model] mean word embedding of the question
    tier_tokens: list[int]             # [T] vision tokens each tier would give
    tier_mask: list[bool]              # [T] False = tier changes nothing
    p_mask: list[bool]                 # [P]
    # -- Stage2 features -----------------------------------------------------------------------
    latency_state: list[float]         # [d_model] hidden state at the budget token after p blocks
    spent_frac: float                  # elapsed / budget at the Stage2 decision
    nb_mask: list[bool]                # [Nb] feasibility of num_blocks for the chosen p
    # -- choices (option indices) and behaviour log-probs ----------------------------------------
    tier_idx: int
    p_idx: int
    top_k_idx: int
    nb_idx: int
    logp_tier: float
    logp_p: float
    logp_top_k: float
    logp_nb: float
    behavior_logp: float               # sum of the four, as sampled (pi_old)
    # -- knob values ---------------------------------------------------------------------------
    tier: str
    max_crops: int
    p: int
    top_k: int
    num_blocks: int
    # -- execution -----------------------------------------------------------------------------
    num_crops: int                     # actual crops encoded (global crop included)
    vision_tokens: int                 # actual image tokens in the LLM input
    prompt_tokens: int                 # LLM input length without the budget token
    answer_tokens: int
    latency_ms: float                  # end to end: bytes in -> answer text out
    preprocess_ms: float
    stage1_ms: float
    vision_ms: float
    prefix_ms: float
    stage2_ms: float
    prefill_rest_ms: float
    decode_ms: float
    decode_ms_per_token: float
    postprocess_ms: float
    # -- outcome -------------------------------------------------------------------------------
    answer: str
    accuracy: float
    reward: float
    within_budget: bool
    t_start: float                     # unix seconds
    t_end: float
    # -- learner-owned -------------------------------------------------------------------------
    step: int = -1                     # learner update that consumed it
    advantage: float = math.nan
    ratio_first: float = math.nan      # importance ratio at its first minibatch (1 at zero lag)
    schema_version: int = SCHEMA_VERSION
    run_id: str = ""

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_(),
                list[float]: pa.list_(pa.float32()), list[int]: pa.list_(pa.int64()),
                list[bool]: pa.list_(pa.bool_())}


def _arrow_schema(cls: type) -> pa.Schema:
    hints = get_type_hints(cls)
    return pa.schema([pa.field(f.name, _ARROW_TYPES[hints[f.name]], nullable=False)
                      for f in dataclasses.fields(cls)],
                     metadata={b"schema_version": str(SCHEMA_VERSION).encode()})


SCHEMA: pa.Schema = _arrow_schema(RolloutRecord)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RolloutRecord))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def make_record(**values: Any) -> RolloutRecord:
    """Build a record from keyword values, converting numpy arrays/scalars to plain Python."""
    return RolloutRecord(**{k: _plain(v) for k, v in values.items()})


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with every schema field) -> Arrow table with the fixed schema."""
    columns = {name: [_plain(r[name]) for r in rows] for name in FIELD_NAMES}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def records_to_table(records: Iterable[RolloutRecord]) -> pa.Table:
    return rows_to_table([r.to_row() for r in records])


def table_to_records(table: pa.Table) -> list[RolloutRecord]:
    version = (table.schema.metadata or {}).get(b"schema_version")
    if version is not None and int(version) != SCHEMA_VERSION:
        raise ValueError(f"record file has schema version {int(version)}, this code reads {SCHEMA_VERSION}")
    return [RolloutRecord(**row) for row in table.select(list(FIELD_NAMES)).to_pylist()]


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    """Write then rename, so a crash never leaves a torn file under the final name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_records(path: str | Path) -> list[RolloutRecord]:
    return table_to_records(pq.read_table(path))


def read_record_dir(folder: str | Path) -> pa.Table:
    """All committed record files of a run folder (part-*.parquet, in name order) as one table."""
    files = sorted(Path(folder).glob("part-*.parquet"))
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f) for f in files])


