"""Rollout records (shared/records.py): one definition for the Python record and its Arrow schema,
Parquet round trip, schema version, atomic writes."""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import records as R
from shared.records import (FIELD_NAMES, SCHEMA, SCHEMA_VERSION, RolloutRecord, make_record, read_record_dir,
                            read_records, records_to_table, rows_to_table, table_to_records, write_parquet_atomic)


def record(i: int = 0, d: int = 8, **kw) -> RolloutRecord:
    rng = np.random.default_rng(i)
    values = dict(
        sample_id=f"s{i}", group_id=f"s{i}/0", rollout_index=i % 4, worker_id=1, policy_version=3, source="synthetic",
        question_type="counting", metric="exact", budget_ms=231.5 + i,
        lang_feat=rng.standard_normal(d).astype(np.float32), tier_tokens=[412, 740, 1196],
        tier_mask=[True, True, i % 2 == 0], p_mask=[True] * 5,
        latency_state=rng.standard_normal(d).astype(np.float32), spent_frac=0.3125, nb_mask=[True] * 5,
        tier_idx=1, p_idx=0, top_k_idx=4, nb_idx=2, logp_tier=-1.1, logp_p=-1.6, logp_top_k=-0.2, logp_nb=-1.5,
        behavior_logp=-4.4, tier="medium", max_crops=6, p=1, top_k=8, num_blocks=14, num_crops=7,
        vision_tokens=np.int64(740), prompt_tokens=752, answer_tokens=2, latency_ms=float(np.float64(201.25) + i),
        preprocess_ms=10.0, stage1_ms=0.1, vision_ms=45.5, prefix_ms=3.0, stage2_ms=0.1, prefill_rest_ms=40.0,
        decode_ms=100.0, decode_ms_per_token=50.0, postprocess_ms=0.2, answer="yes", accuracy=1.0, reward=1.0,
        within_budget=True, t_start=1.7e9 + i, t_end=1.7e9 + i + 0.2)
    values.update(kw)
    return make_record(**values)


def same(a: list[RolloutRecord], b: list[RolloutRecord]) -> bool:
    """Field-by-field equality where NaN equals NaN (the unset learner-owned fields are NaN)."""
    def eq(x, y):
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return type(x) is type(y) and x == y
    return len(a) == len(b) and all(eq(getattr(r, f), getattr(s, f)) for r, s in zip(a, b) for f in FIELD_NAMES)


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
def test_schema_has_every_field_in_order_with_its_type():
    fields = dataclasses.fields(RolloutRecord)
    assert FIELD_NAMES == tuple(f.name for f in fields)
    assert SCHEMA.names == list(FIELD_NAMES)
    expected = {"sample_id": pa.string(), "rollout_index": pa.int64(), "budget_ms": pa.float64(),
                "lang_feat": pa.list_(pa.float32()), "latency_state": pa.list_(pa.float32()),
                "tier_tokens": pa.list_(pa.int64()), "tier_mask": pa.list_(pa.bool_()), "p_mask": pa.list_(pa.bool_()),
                "nb_mask": pa.list_(pa.bool_()), "within_budget": pa.bool_(), "behavior_logp": pa.float64(),
                "advantage": pa.float64(), "schema_version": pa.int64(), "answer": pa.string()}
    for name, typ in expected.items():
        assert SCHEMA.field(name).type == typ, name
    assert not any(f.nullable for f in SCHEMA)
    # everything a learner or an analysis needs is there
    for name in ("group_id", "policy_version", "spent_frac", "tier_idx", "p_idx", "top_k_idx", "nb_idx",
                 "logp_tier", "logp_p", "logp_top_k", "logp_nb", "num_crops", "vision_tokens", "latency_ms",
                 *R.SEGMENTS, "decode_ms_per_token", "accuracy", "reward", "step", "ratio_first", "run_id"):
        assert name in FIELD_NAMES, name


def test_schema_version_in_metadata_and_in_each_row():
    assert SCHEMA.metadata[b"schema_version"] == str(SCHEMA_VERSION).encode()
    assert record().schema_version == SCHEMA_VERSION
    t = records_to_table([record()])
    assert t.schema.metadata[b"schema_version"] == str(SCHEMA_VERSION).encode()


def test_learner_owned_fields_default_to_unset():
    r = record()
    assert r.step == -1 and math.isnan(r.advantage) and math.isnan(r.ratio_first) and r.run_id == ""


def test_make_record_converts_numpy_to_plain_python():
    r = record()
    assert type(r.lang_feat) is list and all(type(v) is float for v in r.lang_feat)
    assert type(r.vision_tokens) is int and type(r.latency_ms) is float


# ----------------------------------------------------------------------------------------------
# Parquet round trip
# ----------------------------------------------------------------------------------------------
def test_parquet_round_trip_is_exact(tmp_path):
    recs = [record(i) for i in range(5)]
    recs[2].advantage, recs[2].step, recs[2].ratio_first = -0.75, 4, 1.0
    path = tmp_path / "part-000000.parquet"
    write_parquet_atomic(records_to_table(recs), path)
    back = read_records(path)
    assert same(back, recs)                  # float32 features were float32 values to begin with
    meta = pq.read_schema(path).metadata
    assert meta[b"schema_version"] == str(SCHEMA_VERSION).encode()
    nan_row = read_records(path)[0]
    assert math.isnan(nan_row.advantage)


def test_rows_round_trip_through_arrow():
    recs = [record(i) for i in range(3)]
    rows = [r.to_row() for r in recs]
    assert same(table_to_records(rows_to_table(rows)), recs)
    with pytest.raises(KeyError):
        rows_to_table([{k: v for k, v in rows[0].items() if k != "reward"}])


def test_a_file_of_another_schema_version_is_refused(tmp_path):
    t = records_to_table([record()])
    other = t.replace_schema_metadata({b"schema_version": str(SCHEMA_VERSION + 1).encode()})
    path = tmp_path / "old.parquet"
    pq.write_table(other, path)
    with pytest.raises(ValueError, match="schema version"):
        read_records(path)


def test_read_record_dir_concatenates_parts_in_name_order(tmp_path):
    assert read_record_dir(tmp_path).num_rows == 0
    assert read_record_dir(tmp_path).schema.names == SCHEMA.names
    write_parquet_atomic(records_to_table([record(2), record(3)]), tmp_path / "part-000001.parquet")
    write_parquet_atomic(records_to_table([record(0), record(1)]), tmp_path / "part-000000.parquet")
    (tmp_path / "notes.parquet").write_text("not a part file")
    t = read_record_dir(tmp_path)
    assert t.column("sample_id").to_pylist() == ["s0", "s1", "s2", "s3"]


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "part-000000.parquet"
    write_parquet_atomic(records_to_table([record(0)]), path)
    write_parquet_atomic(records_to_table([record(1), record(2)]), path)      # replace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.parquet"]
    assert [r.sample_id for r in read_records(path)] == ["s1", "s2"]


def test_a_failed_write_never_tears_the_final_file(tmp_path, monkeypatch):
    path = tmp_path / "part-000000.parquet"
    write_parquet_atomic(records_to_table([record(0)]), path)
    before = path.read_bytes()

    def broken(table, where, *a, **kw):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(R.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(records_to_table([record(1)]), path)
    assert path.read_bytes() == before              # the committed file is intact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert all(name.startswith(".") and ".tmp-" in name for name in leftovers)   # hidden, never a part-*
    assert [p.name for p in tmp_path.glob("part-*.parquet")] == [path.name]
    assert os.path.exists(path)
