"""Hardening: a corpus of bad inputs, each with its defined outcome.

Outcomes are one of: served fine; a `SampleError` naming the problem (the rollout worker drops the
group, counts it in `bad_samples` / `bad_samples.jsonl` and the run goes on); a clear error naming the
problem at start-up (config, importance file, model folder, data set file). The serving path runs on
the tiny random MolmoE (CPU, float32). Cases already covered elsewhere are listed in
docs/RELIABILITY.md and not repeated here (decode modes, the 20000x20000 JPEG, request-level budget
errors, wrong-model checkpoint folders, mismatched bundles).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from shared.backend import SampleError, run_group
from shared.config import ConfigError, config_from_dict, load_config
from shared.knobs import ImportanceScores, KnobError

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "jobs" / "configs" / "ci_synthetic.yaml"
QUESTION = "what colour is the small circle"

TINY = {
    "model": {"backend": "molmoe", "random_weights": "tiny", "num_layers": 4, "num_experts": 8, "native_top_k": 2,
              "d_model": 64, "max_new_tokens": 3},
    "knobs": {"tier_max_crops": [1, 2, 4], "insertion_positions": [1, 2, 3], "top_k_options": [1, 2],
              "num_blocks_options": [2, 3, 4]},
    "budget": {"min_ms": 20, "max_ms": 200, "norm_min_ms": 10, "norm_max_ms": 250},
    "data": {"sources": [{"name": "shapes", "max_samples": 24}], "val_samples": 0},
    "grpo": {"group_size": 2, "groups_per_update": 2, "epochs": 1, "minibatches": 1},
    "system": {"warmup_rollouts": 0, "total_updates": 3, "checkpoint_every": 1, "validate_every": 0},
}


def tiny_cfg(run_dir, **sections):
    d = json.loads(json.dumps(TINY))
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    d["system"]["run_dir"] = str(run_dir)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from rollout_workers.worker import RolloutWorker
    return RolloutWorker(tiny_cfg(tmp_path_factory.mktemp("tiny_run")), 0)


@pytest.fixture(scope="module")
def engine(worker):
    return worker.backend.engine, worker.controller


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(w, h, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (valid CRC)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    i = data.index(b"IHDR")
    data[i + 4:i + 12] = struct.pack(">II", width, height)
    data[i + 17:i + 21] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 17])) & 0xFFFFFFFF)
    return bytes(data)


def flip_bytes(data: bytes, start: int, n: int = 64) -> bytes:
    b = bytearray(data)
    for k in range(start, min(start + n, len(b))):
        b[k] ^= 0xFF
    return bytes(b)


JPEG = encode(Image.fromarray(rgb(96, 64)), "JPEG", quality=90)
PNG = encode(Image.fromarray(rgb(96, 64)), "PNG")

BAD_IMAGES = {
    "garbage": (b"\x00\x01 definitely not an image " * 20, "not a recognised image format"),
    "empty-bytes": (b"", "empty image data"),
    "png-magic-then-zeros": (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "corrupt"),
    "truncated-jpeg": (JPEG[: len(JPEG) // 3], "corrupt or truncated"),
    "truncated-png": (PNG[: len(PNG) // 2], "corrupt or truncated"),
    "corrupt-png-body": (flip_bytes(PNG, 60, 200), "corrupt"),
    "zero-width-png": (png_claiming(0, 10), "zero-size|corrupt PNG"),     # PIL refuses 0 in the header
    "zero-height-png": (png_claiming(10, 0), "zero-size|corrupt PNG"),
    "20000x20000-png-bomb": (png_claiming(20000, 20000), "pixels"),
    "not-bytes": ("a path, not bytes", "unsupported image type str"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_is_a_sample_error_naming_the_problem(engine, name):
    eng, ctl = engine
    data, what = BAD_IMAGES[name]
    with pytest.raises(SampleError, match="bad image") as err:
        eng.serve(data, QUESTION, 100.0, ctl, max_new_tokens=2)
    assert re.search(what, str(err.value)), str(err.value)


def _gray16() -> bytes:
    arr = np.tile(np.linspace(0, 65535, 80, dtype=np.uint16), (50, 1))
    return encode(Image.fromarray(arr), "PNG")


GOOD_IMAGES = {
    "grayscale-L": lambda: encode(Image.fromarray(rgb(80, 50)[..., 0]), "PNG"),
    "rgba": lambda: encode(Image.fromarray(np.dstack([rgb(80, 50), np.full((50, 80), 128, np.uint8)]), "RGBA"),
                           "PNG"),
    "cmyk-jpeg": lambda: encode(Image.new("CMYK", (80, 50), (0, 255, 255, 0)), "JPEG"),
    "16-bit-png": _gray16,
    "1x1": lambda: encode(Image.fromarray(rgb(1, 1)), "PNG"),
    "1x4000": lambda: encode(Image.fromarray(rgb(1, 4000)), "PNG"),
    "4000x1": lambda: encode(Image.fromarray(rgb(4000, 1)), "PNG"),
    "palette-gif": lambda: encode(Image.fromarray(rgb(80, 50)), "GIF"),
}


@pytest.mark.parametrize("name", list(GOOD_IMAGES))
def test_unusual_but_valid_images_are_served(engine, name):
    eng, ctl = engine
    out = eng.serve(GOOD_IMAGES[name](), QUESTION, 150.0, ctl, max_new_tokens=2,
                    generator=torch.Generator().manual_seed(0))
    assert out.num_crops >= 1 and out.vision_tokens > 0
    assert math.isfinite(out.latency_ms) and out.latency_ms > 0 and isinstance(out.answer, str)


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_is_a_sample_error(engine, question):
    eng, ctl = engine
    with pytest.raises(SampleError, match="empty question"):
        eng.serve(PNG, question, 100.0, ctl)


def test_question_longer_than_the_context_is_refused_not_truncated(engine):
    """Policy: a prompt (image tokens + question) longer than the model's max_sequence_length is a
    SampleError (skipped and counted); nothing is truncated, since a cut question changes the answer."""
    eng, ctl = engine
    ctx = eng.model.config.max_sequence_length
    long_q = "how many " + "red circles and " * (ctx // 3)
    assert len(eng.tok.encode(long_q)) > ctx
    with pytest.raises(SampleError, match=rf"exceeds the model's context of {ctx}"):
        eng.serve(PNG, long_q, 100.0, ctl)
    with pytest.raises(SampleError, match="exceeds the model's context"):
        eng.serve(None, long_q, 100.0, ctl)
    eng.serve(PNG, "how many " + "red circles and " * 20, 100.0, ctl, max_new_tokens=1)   # a long one fits


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, "fast", None])
def test_invalid_budget_is_a_value_error(engine, budget):
    eng, ctl = engine
    with pytest.raises(ValueError, match="budget_ms"):
        eng.serve(PNG, QUESTION, budget, ctl)


def test_budget_outside_the_norm_range_is_clamped(engine):
    """Budgets are valid whenever finite and > 0; outside [norm_min_ms, norm_max_ms] the encoder clamps
    them (a huge budget looks like norm_max_ms to the controller, a tiny one like norm_min_ms)."""
    eng, ctl = engine
    lo, hi = ctl.norm_min_ms, ctl.norm_max_ms
    norm = ctl.normalise_budget(torch.tensor([1e-3, lo, hi, 1e9]))
    assert norm.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.equal(ctl.budget_token_embedding(1e9), ctl.budget_token_embedding(hi))
    assert torch.equal(ctl.budget_token_embedding(1e-3), ctl.budget_token_embedding(lo))
    for b in (1e-3, 1e9):
        out = eng.serve(PNG, QUESTION, b, ctl, max_new_tokens=1)
        assert out.stage1.budget_ms == b          # the record keeps the real budget
    assert not ctl.budget_token_embedding(1e9).isnan().any()


def test_budget_config_must_be_positive_and_ordered():
    for overrides, match in [(["budget.min_ms=0"], "min_ms' must be > 0"),
                             (["budget.min_ms=-5"], "below its minimum"),
                             (["budget.min_ms=300", "budget.max_ms=200"], "below 'budget.min_ms'"),
                             (["budget.max_ms=.nan"], "must be finite"),
                             (["budget.max_ms=.inf"], "must be finite"),
                             (["budget.norm_max_ms=50", "budget.norm_min_ms=60"], "norm_max_ms' must exceed")]:
        with pytest.raises(ConfigError, match=match):
            load_config(CI_CONFIG, overrides)


def test_bad_sample_in_a_group_is_dropped_after_one_attempt(worker):
    from shared.backend import Sample
    calls = []
    real = worker.backend.run

    def run(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    bad = Sample("bad-1", QUESTION, ["yes"], image=JPEG[:100])
    worker.backend.run = run
    try:
        res = run_group(worker.backend, bad, 100.0, worker.controller, worker.reward_fn, group_size=4,
                        group_id="g")
    finally:
        worker.backend.run = real
    assert res.dropped_group and res.records == [] and len(calls) == 1
    assert "SampleError" in res.failures[0] and "bad image" in res.failures[0]


# ----------------------------------------------------------------------------------------------
# Run level: bad samples in a training run are skipped and counted; the run finishes
# ----------------------------------------------------------------------------------------------
def test_training_run_with_bad_samples_finishes_and_counts_them(worker, tmp_path):
    from learner.learner import Learner
    from rollout_workers.worker import DirectClient
    from shared.records import read_record_dir
    cfg = tiny_cfg(tmp_path)
    worker.cfg = cfg
    train, val = worker.sample_ids()
    learner = Learner(cfg, str(tmp_path), train, val, worker.info())
    order = learner.dispenser.order
    ctx = worker.backend.engine.model.config.max_sequence_length
    saved = dict(worker.samples)
    bad = {order[0]: dict(image=b"\xff\xd8\xff garbage"),               # corrupt image
           order[2]: dict(image=JPEG[:300]),                            # truncated image
           order[3]: dict(question="   "),                              # empty question
           order[5]: dict(question="red " * (ctx + 10)),                # longer than the context
           order[6]: dict(image=png_claiming(0, 5))}                    # zero-size image
    odd = {order[1]: dict(image=GOOD_IMAGES["1x4000"]()),                # served fine
           order[4]: dict(image=GOOD_IMAGES["cmyk-jpeg"]())}
    for sid, change in {**bad, **odd}.items():
        worker.samples[sid] = dataclasses.replace(worker.samples[sid], **change)
    try:
        worker.groups_done = 0
        worker.run_loop(DirectClient(learner))
    finally:
        worker.samples.clear()
        worker.samples.update(saved)
    assert learner.trainer.step == cfg.system.total_updates and learner.done
    c = learner.counters
    assert c["bad_samples"] == c["dropped_failed"] == len(bad)
    assert c["failed_rollouts"] == len(bad)                             # one attempt each (SampleError)
    lines = [json.loads(ln) for ln in (tmp_path / "bad_samples.jsonl").read_text().splitlines()]
    assert {ln["sample_id"] for ln in lines} == set(bad)
    errors = {ln["sample_id"]: ln["errors"][0] for ln in lines}
    assert "bad image" in errors[order[0]] and "bad image" in errors[order[2]]
    assert "empty question" in errors[order[3]] and "exceeds the model's context" in errors[order[5]]
    assert re.search("zero-size|corrupt PNG", errors[order[6]])
    rows = read_record_dir(tmp_path / "records").to_pylist()
    ids = {r["sample_id"] for r in rows}
    assert not ids & set(bad)                                           # no zero-reward stand-ins
    assert set(odd) <= ids
    assert len(rows) == cfg.system.total_updates * cfg.grpo.groups_per_update * cfg.grpo.group_size
    assert all(math.isfinite(r["reward"]) for r in rows)
    metrics = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["count_bad_samples"] == len(bad)


# ----------------------------------------------------------------------------------------------
# Start-up inputs: config, importance file, model folder, data set files
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (["grpo.learning_rate=0.1"], "unknown config key 'grpo.learning_rate'"),
    (["sytem.num_workers=2"], "unknown config key 'sytem'"),
    (['data.sources=[{"name": "shapes", "pth": "/x"}]'], "unknown config key 'data.sources\\[0\\].pth'"),
    (["grpo.lr=fast"], "'grpo.lr' must be a number"),
    (["system.num_workers=1.5"], "'system.num_workers' must be an integer"),
    (["system.num_workers=true"], "'system.num_workers' must be an integer"),
    (["model.allow_hub=yes please"], "'model.allow_hub' must be true or false"),
    (["grpo=3"], "'grpo' must be a mapping"),
    (["knobs.top_k_options=4"], "'knobs.top_k_options' must be a list"),
    (["grpo.group_size=1"], "'grpo.group_size' = 1 is below its minimum 2"),
    (["grpo.lr=.nan"], "'grpo.lr' must be finite"),
    (["model.backend=vllm"], "'model.backend' must be one of"),
    (["knobs.top_k_options=[4,4]"], "duplicate values"),
    (["nokey"], "must look like key.sub=value"),
])
def test_bad_config_is_a_clear_error_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(CI_CONFIG, overrides)
    assert "ci_synthetic.yaml" in str(err.value) or str(err.value).startswith("command line")


def test_bad_config_file(tmp_path):
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"grpo": {"group_sise": 4}}))
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'grpo.group_sise'.*group_size"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "broken.yaml").write_text("grpo: {lr: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_importance_file_for_another_model_is_refused(tmp_path, engine):
    eng, _ = engine
    L = eng.model.config.n_layers
    f = tmp_path / "imp.json"
    ImportanceScores(tuple(range(L + 12))).save(f)
    with pytest.raises(KnobError, match=rf"has {L + 12} block scores but the model has {L} blocks"):
        ImportanceScores.load(f, L)
    for text, match in [('{"scores": [1, 2, NaN, 4]}', "non-finite"), ('{"scores": "high"}', "list of numbers"),
                        ('{"scores": [1, 2', "not readable JSON"), ("[1, 2, 3, 4]", "list of numbers")]:
        f.write_text(text)
        with pytest.raises(KnobError, match=match):
            ImportanceScores.load(f, L)
    with pytest.raises(KnobError, match="not found"):
        ImportanceScores.load(tmp_path / "nope.json", L)
    # Constructed directly (not from a file): the request engine refuses it too.
    from rollout_workers.request_path import RequestEngine
    with pytest.raises(ValueError, match=rf"importance scores cover {L + 1} blocks, the model has {L}"):
        RequestEngine(eng.model, eng.pre, eng.space, ImportanceScores(tuple(range(L + 1))))


def test_worker_start_fails_clearly_on_a_wrong_importance_file(tmp_path):
    from rollout_workers.backends import make_backend
    f = tmp_path / "imp16.json"
    ImportanceScores.by_index(16).save(f)
    with pytest.raises(KnobError, match="16 block scores but the model has 4 blocks"):
        make_backend(tiny_cfg(tmp_path, model={**TINY["model"], "importance_scores": str(f)}))


def test_model_folder_for_another_shape_is_refused(tmp_path):
    """A real checkpoint folder whose shape differs from the configured knob space (e.g. the tiny model
    under the full-size config): refused at start-up naming both shapes. (Folders of another
    architecture: tests/test_molmoe_loader.py::test_llama_config_is_the_wrong_model and friends.)"""
    from rollout_workers.backends import make_backend
    from rollout_workers.molmoe.make_tiny_checkpoint import make_tiny_checkpoint
    folder = make_tiny_checkpoint(tmp_path / "tiny", seed=0)
    cfg = load_config(None, [f"model.checkpoint={folder}", "model.device=cpu"])
    with pytest.raises(ValueError, match=r"knob space is for 16 blocks x 64 experts.*the model has 4 x 8"):
        make_backend(cfg)


def _source(name, path):
    from shared.config import DataSourceConfig
    return DataSourceConfig(name=name, path=str(path))


def test_unreadable_dataset_files_are_clear_errors(tmp_path):
    from shared import vqa_data as vd
    from shared.datasets import LOADERS
    # Truncated official JSON
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"questions": [{"image_id": 1, "qu')
    (tmp_path / "a" / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": []}')
    with pytest.raises(vd.DatasetReadError, match="v2_OpenEnded_mscoco_val2014_questions.json is not readable JSON"):
        LOADERS["vqav2"](_source("vqav2", tmp_path / "a"), "validation", None)
    # Official JSON of the wrong layout
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "TextVQA_0.5.1_val.json").write_text('{"rows": []}')
    with pytest.raises(vd.DatasetReadError, match=r"textvqa .* cannot be read: KeyError"):
        LOADERS["textvqa"](_source("textvqa", tmp_path / "b"), "validation", None)
    # Not JSON at all (binary)
    (tmp_path / "b" / "TextVQA_0.5.1_val.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(vd.DatasetReadError, match="TextVQA_0.5.1_val.json is not readable JSON"):
        LOADERS["textvqa"](_source("textvqa", tmp_path / "b"), "validation", None)
    # Corrupt parquet in the hub layout
    (tmp_path / "c" / "data").mkdir(parents=True)
    (tmp_path / "c" / "data" / "validation-00000-of-00001.parquet").write_bytes(b"PAR1" + b"\x07" * 300)
    with pytest.raises(vd.DatasetReadError, match=r"textvqa \(split 'validation'\) at .*c cannot be read"):
        LOADERS["textvqa"](_source("textvqa", tmp_path / "c"), "validation", None)
    # A data set error is a ValueError (train.py start-up reports it), not a traceback from json/pyarrow
    assert issubclass(vd.DatasetReadError, ValueError)
