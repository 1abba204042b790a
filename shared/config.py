"""Typed run configuration: dataclasses loaded from one YAML file plus `key.sub=value` overrides.

One YAML file describes a whole run. Every field is declared here with its type, default, allowed
range and a one-line doc (the `doc` metadata). Loading is strict: an unknown key, a value of the
wrong type or a value out of range raises `ConfigError` naming the dotted key and the file.

Usage::

    cfg = load_config("jobs/configs/default.yaml", ["grpo.lr=3e-4", "system.num_workers=2"])

Pure module: imports neither Ray nor the model.
"""
from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and the source file."""


def _f(default: Any = dataclasses.MISSING, *, doc: str, lo: float | None = None, hi: float | None = None,
       choices: Sequence[Any] | None = None, factory: Any = None) -> Any:
    """A dataclass field with its documentation and validation bounds (inclusive)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": tuple(choices) if choices else None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class KnobConfig:
    """The option sets of the four knobs (DESIGN.md section 2)."""

    tier_names: list[str] = _f(doc="names of the image tiers, cheapest first",
                               factory=lambda: ["low", "medium", "high"])
    tier_max_crops: list[int] = _f(doc="max_crops of each tier (same order as tier_names)",
                                   factory=lambda: [3, 6, 12])
    insertion_positions: list[int] = _f(doc="options for p: Stage2 runs after the first p blocks",
                                        factory=lambda: [1, 2, 3, 4, 5])
    top_k_options: list[int] = _f(doc="experts per token for blocks with index >= p",
                                  factory=lambda: [4, 5, 6, 7, 8])
    num_blocks_options: list[int] = _f(doc="total executed blocks (prefix included)",
                                       factory=lambda: [12, 13, 14, 15, 16])
    static_p: int = _f(1, doc="insertion position used by static baselines and calibration", lo=1)


@dataclass
class ModelConfig:
    """Which frozen model the rollout workers host."""

    backend: str = _f("molmoe", doc="rollout backend", choices=["molmoe", "synthetic"])
    model_id: str = _f("allenai/MolmoE-1B-0924", doc="model identifier recorded in bundles")
    checkpoint: str = _f("", doc="local folder laid out like the hub's; '' = random full-size weights "
                                 "(benchmarks only) or the synthetic backend")
    random_weights: str = _f("", doc="'' or a size name ('full', 'tiny') to build random weights",
                             choices=["", "full", "tiny"])
    importance_scores: str = _f("", doc="JSON of per-block importance scores ('' = by block index)")
    engine: str = _f("eager", doc="execution engine (budgets are engine-specific)", choices=["eager", "fast"])
    fast_max_len: int = _f(2048, doc="fast engine: positions of the static KV cache (prompt + budget token + "
                                     "answer)", lo=8, hi=1 << 20)
    fast_triton: str = _f("auto", doc="fast engine: Triton kernels for decode steps (fused routing, "
                                             "GEMVs over the selected experts, attention up to the current position) and the "
                                             "prefill's norm/RoPE/cache epilogue; 'auto' = when CUDA and Triton are there",
                          choices=["auto", "on", "off"])
    fast_prefill_bucket: int = _f(64, doc="fast engine: prompts are padded to a multiple of this many positions "
                                           "(one prefill graph per block and length bucket)", lo=1, hi=1 << 20)
    reuse_group_preprocess: bool = _f(True, doc="a group's G rollouts share one image decode and crop cut (same "
                                                "bytes and question); each is charged the time it measured")
    dtype: str = _f("float32", doc="model dtype", choices=["float32", "bfloat16", "float16"])
    device: str = _f("auto", doc="'auto' = cuda if available else cpu", choices=["auto", "cpu", "cuda"])
    num_layers: int = _f(16, doc="transformer blocks of the LLM", lo=1, hi=256)
    num_experts: int = _f(64, doc="experts per MoE block", lo=1, hi=4096)
    native_top_k: int = _f(8, doc="the model's trained top_k", lo=1, hi=4096)
    d_model: int = _f(2048, doc="LLM hidden size (the latency-token width)", lo=1)
    max_new_tokens: int = _f(16, doc="default answer length cap (a data source may override)", lo=1, hi=4096)
    allow_hub: bool = _f(False, doc="allow Hugging Face hub access (off: HF_HUB_OFFLINE=1)")


@dataclass
class BudgetConfig:
    """Latency budgets: the training distribution and the encoder's normalisation range."""

    min_ms: float = _f(170.0, doc="smallest training budget (ms)", lo=0.0)
    max_ms: float = _f(380.0, doc="largest training budget (ms)", lo=0.0)
    distribution: str = _f("uniform", doc="how budgets are drawn", choices=["uniform", "loguniform"])
    norm_min_ms: float = _f(100.0, doc="budget mapped to 0 by the encoder (ms)", lo=0.0)
    norm_max_ms: float = _f(500.0, doc="budget mapped to 1 by the encoder (ms)", lo=0.0)
    calibration: str = _f("", doc="calibration JSON written by jobs/calibrate_budget.py ('' = none); "
                                  "when set, min_ms/max_ms/norm_* come from it")


@dataclass
class ControllerConfig:
    """Sizes of the two-stage controller (DESIGN.md section 3)."""

    code_dim: int = _f(256, doc="width of the fixed sinusoidal budget code", lo=2)
    budget_embed_dim: int = _f(0, doc="budget-embedding width (0 = d_model, as DESIGN.md fixes)", lo=0)
    stage1_hidden: int = _f(32, doc="Stage1 hidden width", lo=1)
    stage2_hidden: int = _f(24, doc="Stage2 hidden width", lo=1)
    token_scale: float = _f(1200.0, doc="vision-token counts are divided by this", lo=1e-6)


@dataclass
class RewardConfig:
    """Reward = accuracy minus a penalty for budget overruns (or the seed's preset)."""

    kind: str = _f("default", doc="reward formula", choices=["default", "seed"])
    overrun_weight: float = _f(2.0, doc="default: penalty per unit of relative overrun", lo=0.0)
    overrun_power: float = _f(1.0, doc="default: penalty = weight * (overrun/budget)^power", lo=0.5, hi=4.0)
    violation_penalty: float = _f(0.5, doc="default: flat penalty added once the budget is exceeded", lo=0.0)


@dataclass
class GRPOConfig:
    """GRPO hyper-parameters (DESIGN.md section 5)."""

    group_size: int = _f(8, doc="rollouts per (sample, budget) group (G)", lo=2, hi=1024)
    groups_per_update: int = _f(8, doc="groups per learner batch", lo=1)
    epochs: int = _f(2, doc="passes over each batch", lo=1, hi=100)
    minibatches: int = _f(2, doc="minibatches per epoch", lo=1, hi=1024)
    lr: float = _f(3e-3, doc="Adam learning rate (0 freezes the policy)", lo=0.0, hi=1.0)
    lr_schedule: str = _f("constant", doc="learning rate over the run's system.total_updates: constant, or a "
                          "cosine / linear decay from lr to lr * lr_final_frac", choices=["constant", "cosine", "linear"])
    lr_final_frac: float = _f(0.1, doc="last update's learning rate / lr under a decaying lr_schedule", lo=0.0, hi=1.0)
    weight_decay: float = _f(0.0, doc="AdamW weight decay", lo=0.0)
    grad_clip: float = _f(1.0, doc="gradient-norm clip (0 = off)", lo=0.0)
    clip_low: float = _f(0.2, doc="PPO ratio clip below 1", lo=0.0, hi=1.0)
    clip_high: float = _f(0.28, doc="PPO ratio clip above 1", lo=0.0, hi=10.0)
    kl_coef: float = _f(0.0, doc="k3 KL to the initial policy (0 = off)", lo=0.0)
    scale_by_std: bool = _f(True, doc="divide advantages by the group std (False = Dr. GRPO)")
    adv_eps: float = _f(1e-6, doc="epsilon in (r - mean) / (std + eps)", lo=0.0)
    entropy_coef: float = _f(0.0, doc="entropy bonus weight", lo=0.0)
    max_policy_lag: int = _f(4, doc="hard bound: groups older than this many versions are dropped", lo=0)


@dataclass
class DataSourceConfig:
    """One dataset of a training mixture."""

    name: str = _f("shapes", doc="dataset name (see shared data loaders)")
    path: str = _f("", doc="local file or folder ('' = built in / default location)")
    split: str = _f("train", doc="split used for training")
    val_split: str = _f("validation", doc="held-out split for greedy validation")
    metric: str = _f("vqa", doc="accuracy scorer", choices=["vqa", "exact", "mc", "anls", "agreement"])
    weight: float = _f(1.0, doc="mixture weight", lo=0.0)
    max_new_tokens: int = _f(0, doc="answer length cap (0 = model default)", lo=0)
    max_samples: int = _f(0, doc="cap on samples used (0 = all)", lo=0)
    seed: int = _f(0, doc="seed for generated data sets", lo=0)


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = _f(doc="training mixture", factory=lambda: [DataSourceConfig()])
    val_samples: int = _f(64, doc="held-out samples per validation", lo=0)


@dataclass
class SystemConfig:
    """The distributed run: workers, cadence, run folder."""

    num_workers: int = _f(0, doc="rollout workers (0 = one per GPU, or 2 on CPU)", lo=0, hi=4096)
    gpus_per_worker: float = _f(1.0, doc="GPUs per rollout worker when GPUs are present", lo=0.0)
    torch_threads: int = _f(1, doc="torch threads per worker (fixed so timing matches calibration)", lo=1)
    max_inflight_groups_per_worker: int = _f(
        2, doc="admission control: unfinished groups per worker (2 = the group running and the one leased ahead)",
        lo=1)
    lease_ahead: bool = _f(True, doc="workers lease the next task while a group runs (faster; more groups run "
                                     "one policy version behind)")
    total_updates: int = _f(100, doc="GRPO updates to run", lo=0)
    checkpoint_every: int = _f(10, doc="updates between checkpoints", lo=1)
    validate_every: int = _f(0, doc="updates between greedy validations (0 = off)", lo=0)
    warmup_rollouts: int = _f(2, doc="unmeasured rollouts per worker before the first record", lo=0)
    worker_timeout_s: float = _f(300.0, doc="learner fails if no group arrives for this long", lo=1.0)
    max_worker_restarts: int = _f(3, doc="Ray restarts per worker", lo=0)
    run_dir: str = _f("runs/default", doc="run folder (records, checkpoints, bundle)")
    seed: int = _f(0, doc="global seed", lo=0)
    log_every: int = _f(1, doc="updates between progress lines", lo=1)
    dashboard_host: str = _f("127.0.0.1", doc="dashboard bind address for a local Ray")
    dashboard: bool = _f(True, doc="start the Ray dashboard with a local Ray (off: no throughput view, but ~8% "
                                   "lower rollout latency at the median on a 2-core CPU machine)")


@dataclass
class SyntheticConfig:
    """Synthetic backend (the bandit of the tests): known accuracy/latency tables."""

    num_question_types: int = _f(4, doc="question types in the synthetic tables", lo=1, hi=64)
    latency_noise: float = _f(0.02, doc="relative std of latency noise", lo=0.0, hi=1.0)
    table_seed: int = _f(0, doc="seed of the tables and the fixed latency-token map", lo=0)
    num_samples: int = _f(4096, doc="samples in the synthetic data set", lo=1)


@dataclass
class RunConfig:
    """A whole run. Sections map one-to-one onto the YAML's top-level keys."""

    knobs: KnobConfig = _f(doc="knob option sets", factory=KnobConfig)
    model: ModelConfig = _f(doc="frozen model", factory=ModelConfig)
    budget: BudgetConfig = _f(doc="budget distribution and normalisation", factory=BudgetConfig)
    controller: ControllerConfig = _f(doc="controller sizes", factory=ControllerConfig)
    reward: RewardConfig = _f(doc="reward", factory=RewardConfig)
    grpo: GRPOConfig = _f(doc="GRPO", factory=GRPOConfig)
    data: DataConfig = _f(doc="data mixture", factory=DataConfig)
    system: SystemConfig = _f(doc="distributed system", factory=SystemConfig)
    synthetic: SyntheticConfig = _f(doc="synthetic backend", factory=SyntheticConfig)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str, src: str) -> Any:
    """Convert a YAML value to `tp`, raising ConfigError naming `key` and `src` on mismatch."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        return _convert(value, args[0], key, src)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, src)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: '{key}' must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{key}' must be a mapping, got {value!r}")
        return {_convert(k, k_tp, key, src): _convert(v, v_tp, f"{key}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{src}: '{key}' must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{src}: '{key}' has unsupported type {tp}")


def _check_bounds(value: Any, meta: dict, key: str, src: str) -> None:
    items = value if isinstance(value, list) else [value]
    for v in items:
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(f"{src}: '{key}' must be one of {list(meta['choices'])}, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("lo") is not None and v < meta["lo"]:
                raise ConfigError(f"{src}: '{key}' = {v!r} is below its minimum {meta['lo']}")
            if meta.get("hi") is not None and v > meta["hi"]:
                raise ConfigError(f"{src}: '{key}' = {v!r} is above its maximum {meta['hi']}")


def _build(cls: type, values: dict, prefix: str, src: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"{src}: unknown config key '{_join(prefix, unknown[0])}'{where}; "
                          f"known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = _join(prefix, name)
        converted = _convert(value, hints[name], key, src)
        _check_bounds(converted, dict(fields[name].metadata), key, src)
        kwargs[name] = converted
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"command line: override '{text}' has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"command line: '{'.'.join(path)}' descends into a non-mapping")
        node = nxt
    node[path[-1]] = value


def validate(cfg: RunConfig, src: str = "<config>") -> RunConfig:
    """Cross-field checks that single-field bounds cannot express."""
    k = cfg.knobs
    if len(k.tier_names) != len(k.tier_max_crops) or not k.tier_names:
        raise ConfigError(f"{src}: 'knobs.tier_names' and 'knobs.tier_max_crops' must be non-empty and of "
                          f"equal length")
    for name in ("tier_max_crops", "insertion_positions", "top_k_options", "num_blocks_options"):
        vals = getattr(k, name)
        if not vals:
            raise ConfigError(f"{src}: 'knobs.{name}' must not be empty")
        if any(v < 1 for v in vals):
            raise ConfigError(f"{src}: 'knobs.{name}' values must be >= 1, got {vals}")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"{src}: 'knobs.{name}' has duplicate values {vals}")
    b = cfg.budget
    if b.min_ms <= 0:
        raise ConfigError(f"{src}: 'budget.min_ms' must be > 0 (a budget of 0 ms cannot be met; every rollout "
                          f"would be refused), got {b.min_ms}")
    if b.max_ms < b.min_ms:
        raise ConfigError(f"{src}: 'budget.max_ms' ({b.max_ms}) is below 'budget.min_ms' ({b.min_ms})")
    if b.norm_max_ms <= b.norm_min_ms:
        raise ConfigError(f"{src}: 'budget.norm_max_ms' must exceed 'budget.norm_min_ms'")
    if b.distribution == "loguniform" and b.min_ms <= 0:
        raise ConfigError(f"{src}: 'budget.min_ms' must be > 0 for a loguniform distribution")
    if cfg.grpo.minibatches > cfg.grpo.groups_per_update * cfg.grpo.group_size:
        raise ConfigError(f"{src}: 'grpo.minibatches' exceeds the rollouts per update")
    if not cfg.data.sources:
        raise ConfigError(f"{src}: 'data.sources' must list at least one source")
    return cfg


def config_from_dict(values: dict, src: str = "<dict>") -> RunConfig:
    """Build and validate a RunConfig from a plain mapping (as parsed from YAML)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{src}: top level must be a mapping, got {type(values).__name__}")
    return validate(_build(RunConfig, values, "", src), src)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config and apply `key.sub=value` overrides.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value; the message names the key and file.
    """
    src = str(path) if path else "<defaults>"
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{src}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{src}: not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{src}: top level must be a mapping")
    if overrides:
        src = f"{src} + command-line overrides"
    for text in overrides:
        path_parts, value = _parse_override(text)
        _merge(values, path_parts, value)
    return config_from_dict(values, src)


def to_dict(cfg: Any) -> Any:
    """A plain-data (YAML/JSON-ready) view of a config dataclass."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloads to an equal RunConfig)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field: the reference table in docs/CONFIG.md."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, repr(default), f.metadata.get("doc", "")))
    return rows



def reference_markdown() -> str:
    """The config reference table (docs/CONFIG.md is generated from it: `python -m shared.config`)."""
    lines = ["# Configuration reference", "",
             "One YAML file describes a run; its top-level keys are the sections below. Override any key on the",
             "command line as `section.key=value` (YAML syntax for the value, e.g. `knobs.top_k_options=[4,8]`).",
             "Unknown keys, wrong types and out-of-range values are errors naming the key and the file.",
             "Generated by `python -m shared.config > docs/CONFIG.md`.", "",
             "| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe():
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
