"""Real VQA data sets from local files, through `datasets`: VQAv2, TextVQA, OK-VQA, DocVQA, ScienceQA
(image subset) and TallyQA. Importing this module registers them in `shared.datasets.LOADERS`.

Nothing is downloaded: sources are local files or a local Hugging Face hub cache, read with
HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 (set here unless the config sets model.allow_hub).

Per data set (metric and answer cap as in the seed's profiling set, seed-system.md section 5; the
prompt is Molmo's evaluation style prefix, "<style>: <question>", which the released MolmoE was trained
with):

| name      | metric | max_new_tokens | prompt                                                     |
|-----------|--------|----------------|------------------------------------------------------------|
| vqav2     | vqa    | 16             | "vqa2: {question}"                                         |
| textvqa   | vqa    | 64             | "text_vqa: {question}"                                     |
| okvqa     | vqa    | 16             | "okvqa: {question}"                                        |
| docvqa    | anls   | 32             | "doc_qa: {question}"  (short extractive answer)            |
| scienceqa | mc     | 16             | "science_qa: {hint}\\n{question}\\nA: opt\\nB: opt\\n"  -> letter |
| tallyqa   | exact  | 16             | "tally_qa: {question}"  -> a number                        |

The metric of a source can be overridden in the config with any metric other than the default "vqa"
(e.g. `metric: agreement`); `max_new_tokens` likewise (0 keeps the table's value).

Sample ids are "{name}-{split}-{question_id}" (split as written in the config). `meta` holds the raw
question, the image id/path and `reference`, the single answer a teacher-forced loss is measured on
(the most frequent human answer; the letter for ScienceQA).

Accepted local formats (`path` in the source config), tried in this order:

1. path '' : the hub cache. `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` is
   searched for `datasets--<org>--<name>` of the data set's hub repo (table in `SPECS`); its snapshot
   (refs/main, else the newest) is then read as in 3 or 4.
2. A `datasets` save_to_disk folder: `dataset_dict.json` with the split (`val` and `validation` are
   interchangeable), or `<path>/<split>/` holding a saved Dataset (state.json).
3. The official release files (see `OFFICIAL_LAYOUT`), e.g. VQAv2's questions/annotations JSON with
   the COCO image folder.
4. Parquet or arrow files as on the hub: `<split>-*.parquet`, `<split>.parquet` or `<split>/*.parquet`
   anywhere below `path` (e.g. `data/validation-00000-of-00001.parquet`), same for `.arrow`.
   `path` may also be a single .parquet / .arrow file (the split is then that file).

Columns read from `datasets` tables (hub schemas): question; question_id / questionId / id (else the
row index); answers (list of strings or of {"answer": ...}) / answer / multiple_choice_answer; image
(a datasets Image column, read undecoded as bytes, or a path relative to the data folder); ScienceQA:
choices, answer (index), hint; TallyQA: answer (int), issimple.

Bad images: image bytes are not decoded at load (cheap for large sets). A corrupt image therefore
surfaces at serving time as `SampleError` (RequestEngine), and the rollout is dropped and counted. An
image FILE that the annotations name but that does not exist is skipped at load and counted (a
warning names how many and an example); if every image is missing, loading fails with the layout.
Memory: each kept sample holds its image bytes (shared between questions on the same image); cap large
sets with `max_samples` (applied before any image is read).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from shared.backend import Sample
from shared.datasets import LOADERS

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DatasetNotFoundError(FileNotFoundError):
    """The configured data set is not where the config says (message: the path and expected layouts)."""


class DatasetReadError(ValueError):
    """A data set file exists but cannot be read (corrupt, truncated, not the expected layout); the
    message names the file."""


@dataclass(frozen=True)
class VQASpec:
    name: str
    metric: str
    max_new_tokens: int
    style: str                  # Molmo's style prefix
    hub_repo: str               # default hub repo id (for the hub cache), '' if none
    aliases: tuple[str, ...] = ()


SPECS: dict[str, VQASpec] = {s.name: s for s in (
    VQASpec("vqav2", "vqa", 16, "vqa2", "HuggingFaceM4/VQAv2", ("coco_2014_vqa", "vqa2")),
    VQASpec("textvqa", "vqa", 64, "text_vqa", "facebook/textvqa", ("text_vqa",)),
    VQASpec("okvqa", "vqa", 16, "okvqa", "HuggingFaceM4/OK-VQA", ("ok_vqa",)),
    VQASpec("docvqa", "anls", 32, "doc_qa", "HuggingFaceM4/DocumentVQA", ("doc_qa", "documentvqa")),
    VQASpec("scienceqa", "mc", 16, "science_qa", "derek-thomas/ScienceQA", ("science_qa_img", "science_qa")),
    VQASpec("tallyqa", "exact", 16, "tally_qa", "", ("tally_qa",)),
)}

OFFICIAL_LAYOUT = {
    "vqav2": "v2_OpenEnded_mscoco_{s}2014_questions.json + v2_mscoco_{s}2014_annotations.json (s = train/val) and "
             "the COCO images {s}2014/COCO_{s}2014_<image_id:012d>.jpg (also under images/)",
    "okvqa": "OpenEnded_mscoco_{s}2014_questions.json + mscoco_{s}2014_annotations.json (s = train/val) and the "
             "COCO images {s}2014/COCO_{s}2014_<image_id:012d>.jpg (also under images/)",
    "textvqa": "TextVQA_0.5.1_{s}.json (s = train/val) and the images train_images/<image_id>.jpg",
    "docvqa": "{s}/{s}_v1.0.json or {s}/{s}_v1.0_withQT.json (s = train/val) with the images it names "
              "(documents/<file>.png) relative to {s}/",
    "scienceqa": "problems.json + pid_splits.json and the images images/{s}/<pid>/image.png (s = train/val/test; "
                 "problems without an image are left out)",
    "tallyqa": "{s}.json (s = train/test; a list of {question, answer, image, question_id, issimple}) with the "
               "images it names (e.g. train2014/..., VG_100K/...) relative to the folder (or to images/)",
}


def split_aliases(split: str) -> list[str]:
    s = split.lower()
    if s in ("val", "validation"):
        return ["val", "validation"] if s == "val" else ["validation", "val"]
    return [split]


# ----------------------------------------------------------------------------------------------
# Records: one question, independent of the file format
# ----------------------------------------------------------------------------------------------
@dataclass
class Record:
    qid: str
    question: str
    answers: list[str]
    image: Any = None            # bytes, a file path (str/Path), or None
    question_type: str = ""
    options: Optional[list[str]] = None
    answer_idx: Optional[int] = None
    hint: str = ""
    image_id: str = ""


def _answer_list(row: dict) -> list[str]:
    a = row.get("answers")
    if isinstance(a, (list, tuple)):
        out = [str(x.get("answer", "")) if isinstance(x, dict) else str(x) for x in a]
        return [x for x in out if x != ""]
    if isinstance(a, dict) and "answer" in a:                      # columnar {"answer": [...], ...}
        return [str(x) for x in a["answer"]]
    for key in ("answer", "multiple_choice_answer"):
        if row.get(key) is not None:
            return [str(row[key])]
    return []


def _qid(row: dict, index: int) -> str:
    for key in ("question_id", "questionId", "qid", "id"):
        if row.get(key) is not None:
            return str(row[key])
    return str(index)


def _image_field(row: dict, base: Optional[Path]):
    img = row.get("image")
    if isinstance(img, dict):                                      # datasets Image(decode=False)
        if img.get("bytes"):
            return img["bytes"]
        img = img.get("path")
    if isinstance(img, (bytes, bytearray)):
        return bytes(img)
    if isinstance(img, str) and img:
        p = Path(img)
        return p if p.is_absolute() or base is None else base / p
    return None


def record_from_row(name: str, row: dict, index: int, base: Optional[Path] = None) -> Optional[Record]:
    """A hub-schema row as a Record (None: not part of the data set, e.g. a text-only ScienceQA problem)."""
    image = _image_field(row, base)
    qtype = ""
    if name == "scienceqa":
        if image is None:
            return None
        options = [str(c) for c in row["choices"]]
        idx = int(row["answer"])
        qtype = str(row.get("subject") or row.get("category") or "")
        return Record(_qid(row, index), str(row["question"]), [LETTERS[idx], options[idx]], image, qtype,
                      options, idx, str(row.get("hint") or ""))
    if name == "tallyqa" and "issimple" in row:
        qtype = "simple" if row["issimple"] else "complex"
    elif row.get("answer_type"):
        qtype = str(row["answer_type"])
    elif isinstance(row.get("question_types"), (list, tuple)) and row["question_types"]:
        qtype = str(row["question_types"][0])
    return Record(_qid(row, index), str(row["question"]), _answer_list(row), image, qtype,
                  image_id=str(row.get("image_id", "")))


# ----------------------------------------------------------------------------------------------
# Official release formats
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetReadError(f"{path} is not readable JSON (corrupt or truncated?): {exc}") from exc


def _first_existing(*paths: Path) -> Optional[Path]:
    return next((p for p in paths if p.exists()), None)


def _coco_official(name: str, root: Path, split: str) -> Optional[list[Record]]:
    prefix = "v2_" if name == "vqav2" else ""
    for s in split_aliases(split):
        s = "val" if s == "validation" else s
        q = root / f"{prefix}OpenEnded_mscoco_{s}2014_questions.json"
        a = root / f"{prefix}mscoco_{s}2014_annotations.json"
        if not q.exists():
            continue
        if not a.exists():
            raise DatasetNotFoundError(f"{name} ({split}): {q} has no annotations file {a.name} beside it "
                                       f"(test splits without answers cannot be scored)")
        anns = {x["question_id"]: x for x in _read_json(a)["annotations"]}
        out = []
        for x in _read_json(q)["questions"]:
            ann = anns.get(x["question_id"])
            if ann is None:
                continue
            fname = f"COCO_{s}2014_{int(x['image_id']):012d}.jpg"
            img = _first_existing(root / f"{s}2014" / fname, root / "images" / f"{s}2014" / fname,
                                  root / "images" / fname) or root / f"{s}2014" / fname
            out.append(Record(str(x["question_id"]), x["question"], _answer_list(ann), img,
                              str(ann.get("answer_type", "")), image_id=str(x["image_id"])))
        return out
    return None


def _textvqa_official(root: Path, split: str) -> Optional[list[Record]]:
    for s in split_aliases(split):
        s = "val" if s == "validation" else s
        f = root / f"TextVQA_0.5.1_{s}.json"
        if not f.exists():
            continue
        folder = "test_images" if s == "test" else "train_images"
        return [Record(str(x["question_id"]), x["question"], [str(a) for a in x.get("answers", [])],
                       _first_existing(root / folder / f"{x['image_id']}.jpg", root / "images" / f"{x['image_id']}.jpg")
                       or root / folder / f"{x['image_id']}.jpg", image_id=str(x["image_id"]))
                for x in _read_json(f)["data"]]
    return None


def _docvqa_official(root: Path, split: str) -> Optional[list[Record]]:
    for s in split_aliases(split):
        s = "val" if s == "validation" else s
        for folder in (root / s, root):
            f = _first_existing(folder / f"{s}_v1.0_withQT.json", folder / f"{s}_v1.0.json")
            if f is None:
                continue
            out = []
            for x in _read_json(f)["data"]:
                qt = x.get("question_types") or []
                out.append(Record(str(x["questionId"]), x["question"], [str(a) for a in x.get("answers", [])],
                                  folder / x["image"], str(qt[0]) if qt else "", image_id=str(x.get("docId", ""))))
            return out
    return None


def _scienceqa_official(root: Path, split: str) -> Optional[list[Record]]:
    probs, splits = root / "problems.json", root / "pid_splits.json"
    if not probs.exists():
        return None
    problems = _read_json(probs)
    pids = None
    for s in split_aliases(split):
        s = "val" if s == "validation" else s
        if splits.exists():
            pids = _read_json(splits).get(s)
        else:
            pids = [pid for pid, p in problems.items() if p.get("split") == s] or None
        if pids is not None:
            break
    if pids is None:
        raise DatasetNotFoundError(f"scienceqa: no split {split!r} in {splits if splits.exists() else probs}")
    out = []
    for pid in pids:
        p = problems[str(pid)]
        if not p.get("image"):
            continue                                                 # the image subset only
        s = p.get("split") or ("val" if split == "validation" else split)
        options = [str(c) for c in p["choices"]]
        idx = int(p["answer"])
        out.append(Record(str(pid), p["question"], [LETTERS[idx], options[idx]],
                          root / "images" / s / str(pid) / p["image"], str(p.get("subject", "")), options, idx,
                          str(p.get("hint") or ""), image_id=str(pid)))
    return out


def _tallyqa_official(root: Path, split: str) -> Optional[list[Record]]:
    for s in split_aliases(split):
        f = root / f"{s}.json"
        if not f.exists():
            continue
        data = _read_json(f)
        if not isinstance(data, list) or (data and "question" not in data[0]):
            return None
        out = []
        for i, x in enumerate(data):
            img = _first_existing(root / x["image"], root / "images" / x["image"]) or root / x["image"]
            out.append(Record(_qid(x, i), x["question"], [str(x["answer"])], img,
                              "simple" if x.get("issimple") else "complex", image_id=str(x.get("image_id", ""))))
        return out
    return None


OFFICIAL: dict[str, Callable[[Path, str], Optional[list[Record]]]] = {
    "vqav2": lambda r, s: _coco_official("vqav2", r, s),
    "okvqa": lambda r, s: _coco_official("okvqa", r, s),
    "textvqa": _textvqa_official,
    "docvqa": _docvqa_official,
    "scienceqa": _scienceqa_official,
    "tallyqa": _tallyqa_official,
}


# ----------------------------------------------------------------------------------------------
# `datasets` formats: save_to_disk folders, parquet / arrow files, the hub cache
# ----------------------------------------------------------------------------------------------
def _offline(cfg) -> None:
    if cfg is None or not getattr(cfg.model, "allow_hub", False):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hub_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def hub_snapshot(repo_id: str) -> Optional[Path]:
    """The local snapshot folder of a hub data set repo, or None."""
    if not repo_id:
        return None
    for d in hub_cache_dirs():
        repo = d / ("datasets--" + repo_id.replace("/", "--"))
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.exists() and (snaps / ref.read_text().strip()).is_dir():
            return snaps / ref.read_text().strip()
        found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def _undecoded(ds):
    """The table with its Image columns left as {"bytes", "path"} (no decoding at load)."""
    import datasets
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _saved_dataset(root: Path, split: str):
    """A save_to_disk folder's split, or None (`datasets` is imported only when one is there)."""
    if (root / "dataset_dict.json").exists():
        import datasets
        dd = datasets.load_from_disk(str(root))
        for s in split_aliases(split):
            if s in dd:
                return dd[s]
        raise DatasetNotFoundError(f"{root} (a saved DatasetDict) has no split {split!r}; it has {sorted(dd)}")
    for s in split_aliases(split):
        if (root / s / "state.json").exists():
            import datasets
            return datasets.load_from_disk(str(root / s))
    return None


def _split_files(root: Path, split: str, ext: str) -> list[str]:
    files: list[str] = []
    for s in split_aliases(split):
        pats = [f"**/{s}-*.{ext}", f"**/{s}.{ext}", f"**/{s}/*.{ext}", f"**/{s}_*.{ext}"]
        for pat in pats:
            files.extend(glob.glob(str(root / pat), recursive=True))
        if files:
            break
    return sorted(set(files))


def _file_dataset(root: Path, split: str):
    if root.is_file():
        files, ext = [str(root)], root.suffix.lstrip(".")
    else:
        ext = "parquet"
        files = _split_files(root, split, "parquet")
        if not files:
            ext, files = "arrow", _split_files(root, split, "arrow")
    if not files:
        return None
    import datasets
    if ext == "parquet":
        return datasets.load_dataset("parquet", data_files={"split": files}, split="split")
    if ext == "arrow":
        parts = [datasets.Dataset.from_file(f) for f in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    raise DatasetNotFoundError(f"{root}: unsupported file type {ext!r} (expected .parquet or .arrow)")


def _iter_rows(name: str, ds, base: Optional[Path]) -> Iterator[Record]:
    ds = _undecoded(ds)
    for i, row in enumerate(ds):
        rec = record_from_row(name, row, i, base)
        if rec is not None:
            yield rec


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def not_found(spec: VQASpec, path: str, split: str, detail: str = "") -> DatasetNotFoundError:
    where = f"path {path!r}" if path else ("the local hub cache (" + ", ".join(str(d) for d in hub_cache_dirs())
                                           + f") for {spec.hub_repo!r}" if spec.hub_repo else "no path given")
    hub = (f"; or leave path '' with the hub repo {spec.hub_repo} in the local hub cache"
           if spec.hub_repo else "")
    return DatasetNotFoundError(
        f"data set {spec.name} (split {split!r}) not found: looked at {where}{': ' + detail if detail else ''}. "
        f"Set data.sources[].path to a folder holding one of: the official files ({OFFICIAL_LAYOUT[spec.name]}); "
        f"a `datasets` save_to_disk folder with a {split!r} split; parquet/arrow files named {split}-*.parquet "
        f"(or in a {split}/ folder) as in the hub repo{' ' + spec.hub_repo if spec.hub_repo else ''}{hub}. "
        f"Nothing is downloaded (HF_DATASETS_OFFLINE=1); see docs/DATA.md")


def records(spec: VQASpec, path: str, split: str) -> Iterable[Record]:
    """The split's records from the first format that matches (see the module doc).

    Raises:
        DatasetNotFoundError: nothing usable at the path.
        DatasetReadError: a file is there but cannot be read; the message names it.
    """
    try:
        return _records(spec, path, split)
    except (DatasetNotFoundError, DatasetReadError):
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:   # pyarrow's errors are ValueError/OSError
        where = path or "the hub cache"
        raise DatasetReadError(f"data set {spec.name} (split {split!r}) at {where} cannot be read: "
                               f"{type(exc).__name__}: {exc}") from exc


def _records(spec: VQASpec, path: str, split: str) -> Iterable[Record]:
    if path:
        root = Path(path).expanduser()
        if not root.exists():
            raise not_found(spec, path, split, "it does not exist")
    else:
        root = hub_snapshot(spec.hub_repo)
        if root is None:
            raise not_found(spec, path, split)
    if root.is_dir():
        ds = _saved_dataset(root, split)
        if ds is not None:
            return _iter_rows(spec.name, ds, root)
        recs = OFFICIAL[spec.name](root, split)
        if recs is not None:
            return recs
    ds = _file_dataset(root, split)
    if ds is not None:
        return _iter_rows(spec.name, ds, root if root.is_dir() else root.parent)
    raise not_found(spec, str(root) if not path else path, split, "no file there matches a known layout")


def prompt(spec: VQASpec, rec: Record) -> str:
    if spec.name == "scienceqa":
        body = (rec.hint + "\n" if rec.hint else "") + rec.question
        opts = "\n".join(f"{LETTERS[i]}: {o}" for i, o in enumerate(rec.options or []))
        return f"{spec.style}: {body}\n{opts}\n"
    return f"{spec.style}: {rec.question}"


def reference(spec: VQASpec, rec: Record) -> str:
    if spec.name == "scienceqa":
        return LETTERS[rec.answer_idx]
    return Counter(rec.answers).most_common(1)[0][0]


def load_vqa(name: str, source, split: str, cfg=None) -> list[Sample]:
    """The samples of one split of a real data set (see the module doc); `source` is a DataSourceConfig."""
    spec = SPECS[name]
    _offline(cfg)
    cap = int(getattr(source, "max_samples", 0) or 0)
    metric = source.metric if getattr(source, "metric", "vqa") not in ("", "vqa") else spec.metric
    max_new = int(getattr(source, "max_new_tokens", 0) or 0) or spec.max_new_tokens
    out: list[Sample] = []
    image_cache: dict[str, bytes] = {}
    missing: list[str] = []
    unlabelled = 0
    for rec in records(spec, getattr(source, "path", ""), split):
        if cap and len(out) >= cap:
            break
        if not rec.answers:
            unlabelled += 1
            continue
        image = rec.image
        image_ref = ""
        if isinstance(image, Path):
            image_ref = str(image)
            if image_ref not in image_cache:
                try:
                    image_cache[image_ref] = image.read_bytes()
                except OSError:
                    missing.append(image_ref)
                    continue
            image = image_cache[image_ref]
        elif image is None:
            missing.append(f"{rec.qid}: no image")
            continue
        out.append(Sample(sample_id=f"{name}-{split}-{rec.qid}", question=prompt(spec, rec), answers=rec.answers,
                          metric=metric, question_type=rec.question_type, source=name, image=image,
                          max_new_tokens=max_new,
                          meta={"raw_question": rec.question, "question_id": rec.qid, "image_id": rec.image_id,
                                "image_path": image_ref, "reference": reference(spec, rec),
                                **({"options": rec.options} if rec.options else {})}))
    if unlabelled and not out:
        raise ValueError(f"{name} ({split}): the split has no answers ({unlabelled} unlabelled questions); "
                         f"use a labelled split (or metric 'agreement' with answers filled in)")
    if missing:
        msg = (f"{name} ({split}): skipped {len(missing)} question(s) whose image is missing "
               f"(e.g. {missing[0]})")
        if not out:
            raise not_found(spec, getattr(source, "path", ""), split, msg)
        log.warning(msg)
    if unlabelled:
        log.warning("%s (%s): skipped %d question(s) without answers", name, split, unlabelled)
    LAST_LOAD[(name, split)] = {"samples": len(out), "missing_images": len(missing), "unlabelled": unlabelled}
    return out


LAST_LOAD: dict[tuple[str, str], dict] = {}
"""(name, split) -> counts of the last load: samples, missing_images (skipped), unlabelled (skipped)."""


def _register() -> None:
    for spec in SPECS.values():
        def loader(source, split, cfg, _name=spec.name):
            return load_vqa(_name, source, split, cfg)
        loader.__name__ = f"load_{spec.name}"
        for key in (spec.name, *spec.aliases):
            LOADERS.setdefault(key, loader)


_register()
