"""Typed config (shared/config.py): strict loading with errors that name the dotted key and the file,
`key.sub=value` overrides, YAML quirks, dump/reload, nested lists of data sources."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from shared.config import (ConfigError, DataSourceConfig, RunConfig, config_from_dict, describe, dump_config,
                           load_config, to_dict)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# Errors name the dotted key and the file
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, words", [
    # unknown keys, at the top, inside a section and inside a list item
    ("bogus: 1\n", "bogus", "unknown"),
    ("grpo:\n  lrr: 0.1\n", "grpo.lrr", "unknown"),
    ("data:\n  sources:\n    - name: synthetic\n      metirc: exact\n", "data.sources[0].metirc", "unknown"),
    # wrong types
    ("grpo:\n  group_size: 8.5\n", "grpo.group_size", "integer"),
    ("grpo:\n  group_size: true\n", "grpo.group_size", "integer"),
    ("grpo:\n  lr: fast\n", "grpo.lr", "number"),
    ("grpo:\n  scale_by_std: 1\n", "grpo.scale_by_std", "true or false"),
    ("model:\n  model_id: 7\n", "model.model_id", "string"),
    ("knobs:\n  top_k_options: 4\n", "knobs.top_k_options", "list"),
    ("knobs:\n  top_k_options: [4, five]\n", "knobs.top_k_options[1]", "integer"),
    ("grpo: 3\n", "grpo", "mapping"),
    ("budget:\n  min_ms: .nan\n", "budget.min_ms", "finite"),
    # out of range / not one of the choices
    ("grpo:\n  clip_low: 1.5\n", "grpo.clip_low", "maximum"),
    ("grpo:\n  group_size: 1\n", "grpo.group_size", "minimum"),
    ("system:\n  seed: -1\n", "system.seed", "minimum"),
    ("model:\n  backend: tpu\n", "model.backend", "one of"),
    ("knobs:\n  insertion_positions: [0, 1]\n", "knobs.insertion_positions", ">= 1"),
    ("data:\n  sources:\n    - name: a\n    - name: b\n      metric: bleu\n", "data.sources[1].metric", "one of"),
])
def test_field_errors_name_the_dotted_key_and_the_file(tmp_path, text, key, words):
    path = write(tmp_path, text)
    msg = load_error(path)
    assert f"'{key}'" in msg, msg
    assert str(path) in msg, msg
    assert words in msg, msg


@pytest.mark.parametrize("text, keys", [
    ("budget:\n  min_ms: 300\n  max_ms: 200\n", ["budget.max_ms", "budget.min_ms"]),
    ("budget:\n  norm_min_ms: 500\n  norm_max_ms: 100\n", ["budget.norm_max_ms", "budget.norm_min_ms"]),
    ("budget:\n  min_ms: 0\n", ["budget.min_ms"]),
    ("knobs:\n  tier_names: [low, high]\n", ["knobs.tier_names", "knobs.tier_max_crops"]),
    ("knobs:\n  top_k_options: [4, 4, 8]\n", ["knobs.top_k_options"]),
    ("knobs:\n  num_blocks_options: []\n", ["knobs.num_blocks_options"]),
    ("grpo:\n  group_size: 2\n  groups_per_update: 1\n  minibatches: 3\n", ["grpo.minibatches"]),
    ("data:\n  sources: []\n", ["data.sources"]),
])
def test_cross_field_errors_name_the_keys_and_the_file(tmp_path, text, keys):
    path = write(tmp_path, text)
    msg = load_error(path)
    assert str(path) in msg, msg
    for key in keys:
        assert f"'{key}'" in msg, msg


def test_file_level_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in load_error(missing) and "not found" in load_error(missing)
    bad = write(tmp_path, "grpo: [unclosed\n", "bad.yaml")
    assert str(bad) in load_error(bad) and "YAML" in load_error(bad)
    top = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    assert str(top) in load_error(top) and "mapping" in load_error(top)


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(None) == RunConfig()


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------
def test_overrides_are_typed_and_applied_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "grpo:\n  lr: 0.1\n  epochs: 3\n")
    cfg = load_config(path, ["grpo.lr=3e-4", "system.num_workers=2", "model.backend=synthetic",
                             "knobs.top_k_options=[4, 6, 8]", "grpo.scale_by_std=false", "system.run_dir=/tmp/x y"])
    assert cfg.grpo.lr == 3e-4 and isinstance(cfg.grpo.lr, float)
    assert cfg.grpo.epochs == 3                          # untouched file value
    assert cfg.system.num_workers == 2 and cfg.model.backend == "synthetic"
    assert cfg.knobs.top_k_options == [4, 6, 8]
    assert cfg.grpo.scale_by_std is False
    assert cfg.system.run_dir == "/tmp/x y"
    # the last override of a key wins; an empty value is the empty string
    cfg = load_config(None, ["grpo.lr=0.5", "grpo.lr=0.25", "model.importance_scores="])
    assert cfg.grpo.lr == 0.25 and cfg.model.importance_scores == ""


def test_override_errors_name_the_key_and_the_command_line(tmp_path):
    path = write(tmp_path, "grpo:\n  lr: 0.1\n")
    msg = load_error(path, ["grpo.lrr=1"])
    assert "'grpo.lrr'" in msg and "command-line" in msg and str(path) in msg
    msg = load_error(path, ["grpo.clip_low=2"])
    assert "'grpo.clip_low'" in msg and "command-line" in msg
    msg = load_error(None, ["grpo.group_size=eight"])
    assert "'grpo.group_size'" in msg and "integer" in msg
    assert "key.sub=value" in load_error(None, ["grpo.lr"])
    assert "non-mapping" in load_error(path, ["grpo.lr.x=1"])          # lr: 0.1 is in the file
    assert "'grpo.lr'" in load_error(None, ["grpo.lr.x=1"])             # a mapping where a number belongs
    assert "empty key" in load_error(None, ["=3"])


# ----------------------------------------------------------------------------------------------
# YAML quirks, round trip, nested lists
# ----------------------------------------------------------------------------------------------
def test_exponent_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads "1e-3" as a string; the loader converts it for float fields only.
    assert isinstance(yaml.safe_load("lr: 1e-3")["lr"], str)
    cfg = load_config(write(tmp_path, "grpo:\n  lr: 1e-3\n  adv_eps: 1E-8\n  weight_decay: 0\n"))
    assert cfg.grpo.lr == 1e-3 and isinstance(cfg.grpo.lr, float)
    assert cfg.grpo.adv_eps == 1e-8
    assert cfg.grpo.weight_decay == 0.0 and isinstance(cfg.grpo.weight_decay, float)   # int -> float
    # ... but a string field keeps the text, and an int field refuses it
    assert load_config(write(tmp_path, "system:\n  run_dir: 1e-3\n")).system.run_dir == "1e-3"
    assert "'grpo.epochs'" in load_error(write(tmp_path, "grpo:\n  epochs: 1e3\n"))


def test_dump_and_reload_round_trip(tmp_path):
    for cfg in (RunConfig(), load_config(ROOT / "jobs" / "configs" / "bandit.yaml", ["grpo.lr=2.5e-4",
                                                                                     "system.seed=7"])):
        path = tmp_path / "dumped.yaml"
        dump_config(cfg, path)
        again = load_config(path)
        assert again == cfg
        assert to_dict(again) == to_dict(cfg)
        assert yaml.safe_load(path.read_text()) == to_dict(cfg)   # plain YAML, no Python tags


def test_nested_list_of_data_sources(tmp_path):
    path = write(tmp_path, """
data:
  sources:
    - name: vqav2
      path: /data/vqa
      metric: vqa
      weight: 2
      max_new_tokens: 8
    - name: docvqa
      metric: anls
      split: val
  val_samples: 16
""")
    cfg = load_config(path, ["data.val_samples=8"])
    a, b = cfg.data.sources
    assert isinstance(a, DataSourceConfig) and isinstance(b, DataSourceConfig)
    assert (a.name, a.path, a.metric, a.weight, a.max_new_tokens) == ("vqav2", "/data/vqa", "vqa", 2.0, 8)
    assert isinstance(a.weight, float)
    assert (b.name, b.metric, b.split, b.path) == ("docvqa", "anls", "val", "")   # defaults fill the rest
    assert cfg.data.val_samples == 8
    # a list item must be a mapping
    msg = load_error(write(tmp_path, "data:\n  sources:\n    - vqav2\n", "bad.yaml"))
    assert "'data.sources[0]'" in msg and "mapping" in msg
    # the list round-trips through config_from_dict as well
    assert config_from_dict(to_dict(cfg)) == cfg


def test_every_field_is_documented():
    rows = describe()
    assert len(rows) > 50
    missing = [key for key, _default, doc in rows if not doc.strip()]
    assert not missing, missing
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert dataclasses.is_dataclass(cfg)


def test_init_ray_starts_the_dashboard_unless_switched_off(monkeypatch):
    """jobs/train.init_ray on a new local Ray: the dashboard (bound to system.dashboard_host) by default, none
    with system.dashboard=false; ray.init is recorded, not run."""
    import ray
    from jobs import train

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    train.init_ray(load_config(None), None)
    train.init_ray(load_config(None, ["system.dashboard=false"]), None)
    assert [c["include_dashboard"] for c in calls] == [True, False]
    assert all(c["address"] == "local" and c["dashboard_host"] == "127.0.0.1" for c in calls)
    with pytest.raises(ValueError, match="system.dashboard"):
        load_config(None, ["system.dashboard=maybe"])
