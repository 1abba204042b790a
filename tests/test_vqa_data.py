"""Real-data loaders (shared/vqa_data.py) on tiny fixture files made here, in each accepted format:
the official release files, `datasets` save_to_disk folders, hub-layout parquet files and the hub cache."""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from PIL import Image

from rollout_workers.molmoe.config import MolmoeConfig
from rollout_workers.molmoe.preprocessing import MolmoPreprocessor
from rollout_workers.molmoe.tokenizer import MolmoTokenizer
from rollout_workers.request_path import RequestEngine
from shared import vqa_data as vd
from shared.backend import SampleError
from shared.config import DataSourceConfig, load_config
from shared.datasets import LOADERS, load_samples
from shared.scorers import score


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _jpg(seed: int = 0, w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(json.dumps(data))


def _src(name, path="", **kw):
    return DataSourceConfig(name=name, path=str(path), **kw)


# ---------------------------------------------------------------------------------------------- official
def _coco_fixture(root: Path, prefix: str) -> None:
    qs = [{"image_id": 1, "question": "What color is the cat?", "question_id": 10},
          {"image_id": 2, "question": "Is it raining?", "question_id": 20},
          {"image_id": 3, "question": "How many dogs?", "question_id": 30}]
    anns = [{"question_id": 10, "image_id": 1, "answer_type": "other",
             "answers": [{"answer": a} for a in ["black"] * 8 + ["gray"] * 2]},
            {"question_id": 20, "image_id": 2, "answer_type": "yes/no", "answers": [{"answer": "no"}] * 10},
            {"question_id": 30, "image_id": 3, "answer_type": "number", "answers": [{"answer": "2"}] * 10}]
    _write(root / f"{prefix}OpenEnded_mscoco_val2014_questions.json", {"questions": qs})
    _write(root / f"{prefix}mscoco_val2014_annotations.json", {"annotations": anns})
    _write(root / "val2014" / "COCO_val2014_000000000001.jpg", _jpg(1))
    _write(root / "val2014" / "COCO_val2014_000000000002.jpg", b"\xff\xd8\xff not really a jpeg")   # corrupt
    # image 3 is missing: skipped at load and counted


@pytest.mark.parametrize("name, prefix", [("vqav2", "v2_"), ("okvqa", "")])
def test_coco_official_format(tmp_path, name, prefix):
    _coco_fixture(tmp_path, prefix)
    samples = LOADERS[name](_src(name, tmp_path), "validation", None)
    assert [s.sample_id for s in samples] == [f"{name}-validation-10", f"{name}-validation-20"]
    assert vd.LAST_LOAD[(name, "validation")]["missing_images"] == 1
    s = samples[0]
    assert s.metric == "vqa" and s.max_new_tokens == 16 and s.source == name
    assert s.question == f"{vd.SPECS[name].style}: What color is the cat?"
    assert s.meta["reference"] == "black" and s.question_type == "other"
    assert score(s.metric, "black", s.answers) == 1.0 and 0 < score(s.metric, "gray", s.answers) < 1
    # the corrupt image loads as bytes and fails at serving time as a SampleError
    pre = MolmoPreprocessor(MolmoeConfig.tiny(), MolmoTokenizer.tiny())
    assert RequestEngine._decode_image(SimpleNamespace(pre=pre), s.image).shape[2] == 3
    with pytest.raises(SampleError, match="bad image"):
        RequestEngine._decode_image(SimpleNamespace(pre=pre), samples[1].image)


def test_textvqa_official_and_cap(tmp_path):
    data = [{"question_id": i, "question": f"what does sign {i} say?", "image_id": f"img{i % 2}",
             "answers": ["stop"] * 9 + ["halt"]} for i in range(5)]
    _write(tmp_path / "TextVQA_0.5.1_val.json", {"data": data})
    for k in range(2):
        _write(tmp_path / "train_images" / f"img{k}.jpg", _jpg(k))
    samples = LOADERS["textvqa"](_src("textvqa", tmp_path, max_samples=3), "val", None)
    assert len(samples) == 3 and samples[0].max_new_tokens == 64 and samples[0].question.startswith("text_vqa: ")
    assert samples[0].image is samples[2].image                      # one bytes object per image file


def test_docvqa_official(tmp_path):
    data = {"data": [{"questionId": 7, "question": "What is the date?", "image": "documents/a.png",
                      "answers": ["1 May 1990", "May 1, 1990"], "question_types": ["handwritten"], "docId": 3}]}
    _write(tmp_path / "val" / "val_v1.0.json", data)
    _write(tmp_path / "val" / "documents" / "a.png", _jpg(2))
    (s,) = LOADERS["docvqa"](_src("docvqa", tmp_path), "validation", None)
    assert s.sample_id == "docvqa-validation-7" and s.metric == "anls" and s.max_new_tokens == 32
    assert s.question == "doc_qa: What is the date?" and s.question_type == "handwritten"
    assert score("anls", "1 may 1990", s.answers) == 1.0


def test_scienceqa_official_image_subset(tmp_path):
    problems = {"1": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
                      "hint": "Look at the animals.", "image": "image.png", "split": "train", "subject": "biology"},
                "2": {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1, "hint": "", "image": None,
                      "split": "train"}}
    _write(tmp_path / "problems.json", problems)
    _write(tmp_path / "pid_splits.json", {"train": ["1", "2"], "val": [], "test": []})
    _write(tmp_path / "images" / "train" / "1" / "image.png", _jpg(3))
    (s,) = LOADERS["science_qa_img"](_src("science_qa_img", tmp_path), "train", None)   # alias works
    assert s.sample_id == "scienceqa-train-1" and s.metric == "mc"
    assert s.question == "science_qa: Look at the animals.\nWhich is a mammal?\nA: frog\nB: whale\n"
    assert s.meta["reference"] == "B" and s.answers == ["B", "whale"]
    assert score("mc", "B", s.answers) == 1.0 and score("mc", "whale", s.answers) == 1.0
    assert score("mc", "A", s.answers) == 0.0


def test_tallyqa_official(tmp_path):
    _write(tmp_path / "test.json", [
        {"image": "VG_100K/5.jpg", "answer": 3, "question": "How many birds?", "question_id": 99, "image_id": 5,
         "issimple": True}])
    _write(tmp_path / "VG_100K" / "5.jpg", _jpg(4))
    (s,) = LOADERS["tallyqa"](_src("tallyqa", tmp_path), "test", None)
    assert (s.sample_id, s.metric, s.answers, s.question_type) == ("tallyqa-test-99", "exact", ["3"], "simple")
    assert s.question == "tally_qa: How many birds?"


# ---------------------------------------------------------------------------------------------- datasets formats
def _textvqa_table(n=3):
    feats = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                               "image_id": datasets.Value("string"), "image": datasets.Image(),
                               "answers": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict({
        "question_id": list(range(n)), "question": [f"q{i}?" for i in range(n)],
        "image_id": [f"i{i}" for i in range(n)], "image": [{"bytes": _jpg(i), "path": None} for i in range(n)],
        "answers": [["yes"] * 10] * n}, features=feats)


def test_save_to_disk_folder(tmp_path):
    datasets.DatasetDict({"validation": _textvqa_table()}).save_to_disk(str(tmp_path / "saved"))
    samples = LOADERS["textvqa"](_src("textvqa", tmp_path / "saved"), "val", None)   # val == validation
    assert [s.sample_id for s in samples] == ["textvqa-val-0", "textvqa-val-1", "textvqa-val-2"]
    assert samples[1].image == _jpg(1)
    with pytest.raises(vd.DatasetNotFoundError, match="no split 'test'"):
        LOADERS["textvqa"](_src("textvqa", tmp_path / "saved"), "test", None)


def test_hub_parquet_layout_and_scienceqa_schema(tmp_path):
    feats = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                               "choices": datasets.Sequence(datasets.Value("string")),
                               "answer": datasets.Value("int8"), "hint": datasets.Value("string"),
                               "subject": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _jpg(0), "path": None}, None],
                                     "question": ["Which is red?", "Text only?"], "choices": [["a", "b", "c"]] * 2,
                                     "answer": [2, 0], "hint": ["", ""], "subject": ["physics", "x"]}, features=feats)
    ds.to_parquet(str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    (s,) = LOADERS["scienceqa"](_src("scienceqa", tmp_path), "validation", None)
    assert s.sample_id == "scienceqa-validation-0" and s.answers == ["C", "c"] and s.image == _jpg(0)
    assert s.question == "science_qa: Which is red?\nA: a\nB: b\nC: c\n"


def test_hub_cache_and_registry(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "datasets--HuggingFaceM4--DocumentVQA" / "snapshots" / "abc123"
    feats = datasets.Features({"questionId": datasets.Value("string"), "question": datasets.Value("string"),
                               "image": datasets.Image(), "answers": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({"questionId": ["q1", "q2"], "question": ["Total?", "Name?"],
                                     "image": [{"bytes": _jpg(5), "path": None}] * 2,
                                     "answers": [["$5"], ["ACME Inc."]]}, features=feats)
    ds.to_parquet(str(snap / "data" / "train-00000-of-00001.parquet"))
    _write(snap.parent.parent / "refs" / "main", b"abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(None, ['data.sources=[{"name": "docvqa", "split": "train", "max_new_tokens": 8}, '
                             '{"name": "tallyqa", "path": "' + str(tmp_path / "nowhere") + '"}]'])
    cfg.data.sources = cfg.data.sources[:1]
    samples = load_samples(cfg, "train")                              # through the registry
    assert [s.sample_id for s in samples] == ["docvqa-train-q1", "docvqa-train-q2"]
    assert samples[0].metric == "anls" and samples[0].max_new_tokens == 8


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(vd.DatasetNotFoundError) as e:
        LOADERS["vqav2"](_src("vqav2", tmp_path / "vqa"), "train", None)
    msg = str(e.value)
    assert str(tmp_path / "vqa") in msg and "v2_OpenEnded_mscoco_{s}2014_questions.json" in msg
    assert "docs/DATA.md" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(vd.DatasetNotFoundError, match="no file there matches"):
        LOADERS["okvqa"](_src("okvqa", tmp_path / "empty"), "train", None)
    with pytest.raises(vd.DatasetNotFoundError, match="HuggingFaceM4/OK-VQA"):
        LOADERS["okvqa"](_src("okvqa"), "train", None)                 # path '' and nothing in the hub cache


def test_metric_override(tmp_path):
    _coco_fixture(tmp_path, "v2_")
    samples = LOADERS["vqav2"](_src("vqav2", tmp_path, metric="agreement"), "val", None)
    assert samples[0].metric == "agreement"
