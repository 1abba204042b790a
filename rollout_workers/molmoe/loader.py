"""Loading and saving MolmoE checkpoints in the hub's layout, and the full-size random model.

A checkpoint folder looks like ``allenai/MolmoE-1B-0924`` on the hub:

* ``config.json`` (official ``MolmoConfig`` fields, ``model_type`` "molmo"), ``generation_config.json``;
* ``model.safetensors.index.json`` + shards (or a single ``model.safetensors``) holding tensors under
  the official names (``model.transformer.blocks.N.attn.att_proj.weight``, ...);
* ``tokenizer.json`` (+ ``tokenizer_config.json``), optionally ``preprocessor_config.json``.

Loading is strict: every expected tensor must be present with its exact shape and nothing else may
be there; otherwise :class:`CheckpointError` lists every missing, unexpected and mis-shaped tensor.
The megablocks layout of early hub revisions and of allenai/molmo training checkpoints
(``transformer.blocks.N.ffn.experts.mlp.w1`` ..., or a pickled ``pytorch_model.bin``) is recognised
and refused with a message that says so. Nothing is downloaded.

The model is built on the ``meta`` device and materialised directly on ``device`` (weights are
streamed tensor by tensor), so loading the 7.2B-parameter model onto a GPU never holds a full copy
on the CPU; :func:`random_full_size` builds the full-size architecture with RANDOM weights the same way.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, MolmoeConfig
from .modeling import MolmoeModel
from .preprocessing import MolmoPreprocessor
from .tokenizer import MolmoTokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The folder is not a loadable MolmoE checkpoint; the message says exactly why."""


# ====================================================================== key remap
@dataclass(frozen=True)
class Recipe:
    """How a group of our tensors relates to a group of official tensors (both directions)."""

    ours: tuple[str, ...]
    official: tuple[str, ...]
    to_ours: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    to_official: Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(ts)


def _rename(ours: str, official: str) -> Recipe:
    return Recipe((ours,), (official,), _same, _same)


def build_recipes(cfg: MolmoeConfig) -> list[Recipe]:
    """The complete mapping between our state dict and the official checkpoint keys."""
    r: list[Recipe] = []
    vit = "model.vision_backbone.image_vit."
    p, c = cfg.patch_size_px, cfg.vit_hidden_size

    def patch_to_ours(ts):  # Linear [C, (dh dw c)] -> Conv2d [C, c, dh, dw]
        return [ts[0].reshape(c, p, p, 3).permute(0, 3, 1, 2).contiguous()]

    def patch_to_official(ts):
        return [ts[0].permute(0, 2, 3, 1).reshape(c, p * p * 3).contiguous()]

    r.append(_rename("vision.embeddings.class_embedding", vit + "class_embedding"))
    r.append(
        Recipe(
            ("vision.embeddings.patch_embedding.weight",),
            (vit + "patch_embedding.weight",),
            patch_to_ours,
            patch_to_official,
        )
    )
    r.append(_rename("vision.embeddings.position_embedding.weight", vit + "positional_embedding"))
    for wb in ("weight", "bias"):
        r.append(_rename(f"vision.pre_layrnorm.{wb}", vit + f"pre_ln.{wb}"))
    for i in range(cfg.vit_num_layers):
        ours, off = f"vision.encoder.layers.{i}.", vit + f"transformer.resblocks.{i}."
        for wb in ("weight", "bias"):
            for a, b in (
                ("self_attn.q_proj", "attention.wq"),
                ("self_attn.k_proj", "attention.wk"),
                ("self_attn.v_proj", "attention.wv"),
                ("self_attn.out_proj", "attention.wo"),
                ("mlp.fc1", "feed_forward.w1"),
                ("mlp.fc2", "feed_forward.w2"),
                ("layer_norm1", "attention_norm"),
                ("layer_norm2", "ffn_norm"),
            ):
                r.append(_rename(ours + f"{a}.{wb}", off + f"{b}.{wb}"))
    vb = "model.vision_backbone."
    r.append(_rename("connector.pad_embed", vb + "pad_embed"))
    for n in ("wq", "wk", "wv", "wo"):
        for wb in ("weight", "bias"):
            r.append(_rename(f"connector.image_pooling_2d.{n}.{wb}", vb + f"image_pooling_2d.{n}.{wb}"))
    for n in ("w1", "w2", "w3"):
        r.append(_rename(f"connector.image_projector.{n}.weight", vb + f"image_projector.{n}.weight"))

    t = "model.transformer."
    r.append(_rename("llm.model.embed_tokens.weight", t + "wte.embedding"))
    r.append(_rename("new_embedding", t + "wte.new_embedding"))
    r.append(_rename("llm.model.norm.weight", t + "ln_f.weight"))
    r.append(_rename("llm.lm_head.weight", "lm_head.weight"))
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    n_exp = cfg.num_experts

    def split_qkv(ts):
        q, k, v = ts[0].split([d, kv, kv], dim=0)
        return [q.contiguous(), k.contiguous(), v.contiguous()]

    def fuse_qkv(ts):
        return [torch.cat(ts, dim=0)]

    def experts_to_ours(ts):  # [g0, u0, d0, g1, u1, d1, ...] -> gate_up [E, 2I, H], down [E, H, I]
        gate_up = torch.stack([torch.cat([ts[3 * e], ts[3 * e + 1]], dim=0) for e in range(n_exp)])
        down = torch.stack([ts[3 * e + 2] for e in range(n_exp)])
        return [gate_up, down]

    def experts_to_official(ts):
        gate_up, down = ts
        half = gate_up.shape[1] // 2
        out = []
        for e in range(n_exp):
            out += [gate_up[e, :half].contiguous(), gate_up[e, half:].contiguous(), down[e].contiguous()]
        return out

    for i in range(cfg.n_layers):
        ours, off = f"llm.model.layers.{i}.", t + f"blocks.{i}."
        r.append(
            Recipe(
                tuple(ours + f"self_attn.{n}_proj.weight" for n in "qkv"),
                (off + "attn.att_proj.weight",),
                split_qkv,
                fuse_qkv,
            )
        )
        r.append(_rename(ours + "self_attn.o_proj.weight", off + "attn.attn_out.weight"))
        r.append(_rename(ours + "self_attn.q_norm.weight", off + "attn.q_norm.weight"))
        r.append(_rename(ours + "self_attn.k_norm.weight", off + "attn.k_norm.weight"))
        r.append(_rename(ours + "input_layernorm.weight", off + "attn.attn_norm.weight"))
        r.append(_rename(ours + "post_attention_layernorm.weight", off + "mlp.ff_norm.weight"))
        r.append(_rename(ours + "mlp.gate.weight", off + "mlp.gate.weight"))
        expert_keys = []
        for e in range(n_exp):
            expert_keys += [
                off + f"mlp.experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")
            ]
        r.append(
            Recipe(
                (ours + "mlp.experts.gate_up_proj", ours + "mlp.experts.down_proj"),
                tuple(expert_keys),
                experts_to_ours,
                experts_to_official,
            )
        )
    return r


def official_param_shapes(cfg: MolmoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint for ``cfg`` and its shape."""
    c, f, d = cfg.vit_hidden_size, cfg.image_feature_dim, cfg.d_model
    vit = "model.vision_backbone.image_vit."
    s: dict[str, tuple[int, ...]] = {
        vit + "class_embedding": (c,),
        vit + "positional_embedding": (cfg.vit_num_positions, c),
        vit + "patch_embedding.weight": (c, cfg.patch_dim),
        vit + "pre_ln.weight": (c,),
        vit + "pre_ln.bias": (c,),
    }
    for i in range(cfg.vit_num_layers):
        b = vit + f"transformer.resblocks.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            s[b + f"attention.{n}.weight"] = (c, c)
            s[b + f"attention.{n}.bias"] = (c,)
        s[b + "feed_forward.w1.weight"] = (cfg.vit_mlp_size, c)
        s[b + "feed_forward.w1.bias"] = (cfg.vit_mlp_size,)
        s[b + "feed_forward.w2.weight"] = (c, cfg.vit_mlp_size)
        s[b + "feed_forward.w2.bias"] = (c,)
        for n in ("attention_norm", "ffn_norm"):
            s[b + f"{n}.weight"] = (c,)
            s[b + f"{n}.bias"] = (c,)
    vb = "model.vision_backbone."
    s[vb + "pad_embed"] = (2, f)
    heads = cfg.vit_num_heads * cfg.vit_head_dim
    for n in ("wq", "wk", "wv"):
        s[vb + f"image_pooling_2d.{n}.weight"] = (heads, f)
        s[vb + f"image_pooling_2d.{n}.bias"] = (heads,)
    s[vb + "image_pooling_2d.wo.weight"] = (c, heads)
    s[vb + "image_pooling_2d.wo.bias"] = (c,)
    s[vb + "image_projector.w1.weight"] = (cfg.projector_hidden_size, c)
    s[vb + "image_projector.w3.weight"] = (cfg.projector_hidden_size, c)
    s[vb + "image_projector.w2.weight"] = (d, cfg.projector_hidden_size)
    t = "model.transformer."
    s[t + "wte.embedding"] = (cfg.embedding_size, d)
    s[t + "wte.new_embedding"] = (cfg.additional_vocab_size, d)
    s[t + "ln_f.weight"] = (d,)
    s["lm_head.weight"] = (cfg.embedding_size, d)
    kv = cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        b = t + f"blocks.{i}."
        s[b + "attn.att_proj.weight"] = (d + 2 * kv, d)
        s[b + "attn.attn_out.weight"] = (d, d)
        s[b + "attn.q_norm.weight"] = (d,)
        s[b + "attn.k_norm.weight"] = (kv,)
        s[b + "attn.attn_norm.weight"] = (d,)
        s[b + "mlp.ff_norm.weight"] = (d,)
        s[b + "mlp.gate.weight"] = (cfg.num_experts, d)
        for e in range(cfg.num_experts):
            s[b + f"mlp.experts.{e}.gate_proj.weight"] = (cfg.expert_hidden_size, d)
            s[b + f"mlp.experts.{e}.up_proj.weight"] = (cfg.expert_hidden_size, d)
            s[b + f"mlp.experts.{e}.down_proj.weight"] = (d, cfg.expert_hidden_size)
    return s


def official_state_dict(model: MolmoeModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(official key, tensor) pairs of ``model``'s weights, one recipe at a time (CPU copies)."""
    params = dict(model.named_parameters())
    for rec in build_recipes(model.config):
        ours = [params[k].detach().to("cpu") for k in rec.ours]
        for key, tensor in zip(rec.official, rec.to_official(ours), strict=True):
            yield key, tensor


# ====================================================================== folder reading
_MEGABLOCKS_PATTERNS = (
    re.compile(r"(^|\.)ffn\.experts\.mlp\.(w1|v1|w2)$"),
    re.compile(r"(^|\.)ffn\.router\.layer\.weight$"),
    re.compile(r"^(model\.)?transformer\.blocks\.\d+\.(att_proj|attn_out|ff_norm|attn_norm)\.weight$"),
)


class CheckpointReader:
    """Tensor names, shapes and lazy reads over the safetensors files of a checkpoint folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_FILE
        single = folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}"
                ) from e
        elif single.is_file():
            weight_map = None
        else:
            pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin*"))
            if pickles:
                raise CheckpointError(
                    f"{folder} holds only {pickles}: pickled PyTorch weights are not loaded. Early hub "
                    "revisions of MolmoE-1B-0924 (e.g. 7251f46) shipped the megablocks layout in "
                    "pytorch_model.bin; use a revision with model.safetensors (hub revision 03d86d0 or later)"
                )
            raise CheckpointError(f"{folder} has no {INDEX_FILE} and no {SINGLE_FILE}")
        self._handles: dict[str, object] = {}
        self.key_file: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        missing_files = [f for f in files if not (folder / f).is_file()]
        if missing_files:
            raise CheckpointError(f"{folder}: the index names shard files that do not exist: {missing_files}")
        for fname in files:
            try:
                h = safe_open(str(folder / fname), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{folder / fname} is not a readable safetensors file: {e}") from e
            self._handles[fname] = h
            for key in h.keys():
                if weight_map is not None and weight_map.get(key) != fname:
                    continue  # stray tensor not named by the index for this shard
                self.key_file[key] = fname
                self.shapes[key] = tuple(h.get_slice(key).get_shape())
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if k not in self.key_file)
            if absent:
                raise CheckpointError(
                    f"{folder}: {len(absent)} tensors listed in {INDEX_FILE} are not in their shard: "
                    + _preview(absent)
                )

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.key_file[key]].get_tensor(key)

    def is_megablocks(self) -> bool:
        return any(p.search(k) for k in self.shapes for p in _MEGABLOCKS_PATTERNS)


def _preview(items: Sequence[str], n: int = 12) -> str:
    items = list(items)
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def check_tensors(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: " + _preview(missing))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: " + _preview(unexpected))
    if wrong:
        parts.append(
            f"{len(wrong)} with the wrong shape: "
            + _preview([f"{k} {list(found[k])} (expected {list(expected[k])})" for k in wrong])
        )
    raise CheckpointError(f"{where} does not match the MolmoE config: " + "; ".join(parts))


def read_config(folder: str | os.PathLike) -> tuple[MolmoeConfig, MolmoTokenizer]:
    """Validate config.json, the tokenizer, generation_config.json and preprocessor_config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    try:
        tokenizer = MolmoTokenizer.from_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    try:
        cfg = MolmoeConfig.from_hub_dict(raw, **tokenizer.token_ids())
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    try:
        tokenizer.check_matches(cfg)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        eos = gen.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos]
        if eos is not None and cfg.eos_token_id not in eos_ids:
            raise CheckpointError(
                f"{gen_path}: eos_token_id {eos} disagrees with the tokenizer's {cfg.eos_token_id}"
            )
    pre_path = folder / "preprocessor_config.json"
    if pre_path.is_file():
        pre = json.loads(pre_path.read_text())
        checks = {
            "base_image_input_size": [cfg.crop_size_px, cfg.crop_size_px],
            "image_patch_size": cfg.patch_size_px,
            "image_token_length_w": cfg.tokens_per_crop_side,
            "image_token_length_h": cfg.tokens_per_crop_side,
            "overlap_margins": list(cfg.overlap_margins),
        }
        bad = [
            f"{k}={pre[k]} (config implies {v})"
            for k, v in checks.items()
            if k in pre and list_or(pre[k]) != v
        ]
        if bad:
            raise CheckpointError(f"{pre_path} disagrees with config.json: " + "; ".join(bad))
        updates = {}
        if "image_mean" in pre:
            updates["image_mean"] = tuple(pre["image_mean"])
        if "image_std" in pre:
            updates["image_std"] = tuple(pre["image_std"])
        if "max_crops" in pre:
            updates["max_crops"] = int(pre["max_crops"])
        if updates:
            cfg = cfg.replace(**updates)
    return cfg, tokenizer


def list_or(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# ====================================================================== model construction
_KNOWN_BUFFERS = {
    "vision.embeddings.position_ids",
    "llm.model.rotary_emb.inv_freq",
    "llm.model.rotary_emb.original_inv_freq",
}


def build_empty(
    cfg: MolmoeConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vision_dtype: torch.dtype = torch.float32,
) -> MolmoeModel:
    """The model with UNINITIALISED parameters allocated directly on ``device`` (built on meta),
    buffers computed. Fill it with :func:`load_checkpoint`'s streaming or an init."""
    device = torch.device(device)
    with torch.device("meta"):
        model = MolmoeModel(cfg)
    model.set_dtypes(dtype, vision_dtype)
    model.to_empty(device=device)
    rotary_cls = type(model.llm.model.rotary_emb)
    model.llm.model.rotary_emb = rotary_cls(config=model.llm.config).to(device)
    emb = model.vision.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
    names = {n for n, _ in model.named_buffers()}
    if names != _KNOWN_BUFFERS:
        raise RuntimeError(
            f"unexpected buffers in this transformers version: {sorted(names ^ _KNOWN_BUFFERS)}"
        )
    expected = {k for rec in build_recipes(cfg) for k in rec.ours}
    have = set(model.state_dict().keys())
    if have != expected:
        raise RuntimeError(
            "this transformers version names MolmoE parameters differently than the key remap expects: "
            f"not mapped {sorted(have - expected)[:8]}, mapped but absent {sorted(expected - have)[:8]}"
        )
    model.eval()
    return model


def load_checkpoint(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vision_dtype: torch.dtype = torch.float32,
) -> MolmoeModel:
    """Load a MolmoE checkpoint folder (hub layout) onto ``device``.

    The LLM is cast to ``dtype``; the ViT and connector to ``vision_dtype`` (float32 by default, as
    the official model runs its ViT attention in float32). Raises :class:`CheckpointError`.
    """
    folder = Path(folder)
    cfg, _ = read_config(folder)
    reader = CheckpointReader(folder)
    if reader.is_megablocks():
        raise CheckpointError(
            f"{folder} uses the megablocks layout (transformer.blocks.N.ffn.experts.mlp.w1/v1/w2, "
            "ffn.router.layer.weight) of allenai/molmo training checkpoints and early hub revisions; "
            "this loader reads the hub's HF layout (model.transformer.blocks.N.mlp.experts.E.gate_proj ...)"
        )
    check_tensors(reader.shapes, official_param_shapes(cfg), str(folder))
    model = build_empty(cfg, device, dtype, vision_dtype)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    with torch.no_grad():
        for rec in build_recipes(cfg):
            ours = rec.to_ours([reader.get(k).to(params[rec.ours[0]].dtype) for k in rec.official])
            for key, tensor in zip(rec.ours, ours, strict=True):
                param = params[key]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{key}: converted shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                    )
                param.copy_(tensor)
                filled.add(key)
    if filled != set(params):
        raise CheckpointError(f"parameters left unfilled: {sorted(set(params) - filled)}")
    model.weights_source = f"checkpoint {folder}"
    return model


@dataclass
class Molmoe:
    """A loaded model with its tokenizer and preprocessor."""

    model: MolmoeModel
    tokenizer: MolmoTokenizer
    preprocessor: MolmoPreprocessor

    @property
    def config(self) -> MolmoeConfig:
        return self.model.config


def load_molmoe(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vision_dtype: torch.dtype = torch.float32,
) -> Molmoe:
    """Model + tokenizer (from the folder's tokenizer.json) + preprocessor."""
    model = load_checkpoint(folder, device, dtype, vision_dtype)
    tokenizer = MolmoTokenizer.from_folder(folder)
    return Molmoe(model, tokenizer, MolmoPreprocessor(model.config, tokenizer))


def random_full_size(
    device: str | torch.device,
    dtype: torch.dtype = torch.bfloat16,
    vision_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    config: MolmoeConfig | None = None,
) -> MolmoeModel:
    """The full-size MolmoE architecture with RANDOM weights (N(0, 0.02) matrices and embeddings,
    unit norms, zero biases), allocated and initialised directly on ``device`` - for timing only,
    its outputs are meaningless. About 14.4 GB in bfloat16 (29 GB in float32)."""
    cfg = config or MolmoeConfig.full()
    model = build_empty(cfg, device, dtype, vision_dtype)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or "layrnorm" in name:
                param.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.weights_source = "RANDOM weights (full-size MolmoE architecture, not the checkpoint): timing only"
    return model


# ====================================================================== writing folders
def fan_in_init_official(cfg: MolmoeConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random official-layout tensors with the fan-in scaled init of molmoe.md's testing note:
    matrices N(0, 1/fan_in), embeddings / positions / class embedding / pad_embed N(0, 1),
    biases N(0, 0.1), norm weights 1 + N(0, 0.1). Unlike N(0, 0.02), this lets vision-path mistakes
    move the logits visibly."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_param_shapes(cfg).items():
        leaf = key.rsplit(".", 1)[-1]
        is_norm = bool(re.search(r"(norm|ln_f|pre_ln)\.(weight|bias)$", key))
        if is_norm and leaf == "weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif leaf == "bias":
            t = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 2 and leaf == "weight":
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        else:  # embedding tables, positional/class embeddings, pad_embed
            t = torch.randn(shape, generator=gen)
        out[key] = t.to(torch.float32)
    return out


def write_official_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write (key, tensor) pairs as safetensors shards + ``model.safetensors.index.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = t.contiguous()
        sizes[-1] += nbytes
    n = len(shards)
    weight_map, names = {}, []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def write_folder_metadata(cfg: MolmoeConfig, tokenizer: MolmoTokenizer, folder: str | os.PathLike) -> None:
    """config.json, generation_config.json, preprocessor_config.json and the tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.check_matches(cfg)
    (folder / "config.json").write_text(json.dumps(cfg.to_hub_dict(), indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}, indent=2)
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "base_image_input_size": [cfg.crop_size_px, cfg.crop_size_px],
                "do_normalize": True,
                "image_mean": list(cfg.image_mean),
                "image_std": list(cfg.image_std),
                "image_padding_mask": True,
                "image_patch_size": cfg.patch_size_px,
                "image_processor_type": "MolmoImageProcessor",
                "image_token_length_h": cfg.tokens_per_crop_side,
                "image_token_length_w": cfg.tokens_per_crop_side,
                "max_crops": cfg.max_crops,
                "overlap_margins": list(cfg.overlap_margins),
                "processor_class": "MolmoProcessor",
            },
            indent=2,
        )
    )
    tokenizer.save_folder_files(folder)


def save_checkpoint(
    model: MolmoeModel, folder: str | os.PathLike, tokenizer: MolmoTokenizer, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write ``model`` as a hub-layout checkpoint folder (official key names, sharded safetensors)."""
    write_official_shards(official_state_dict(model), folder, max_shard_bytes)
    write_folder_metadata(model.config, tokenizer, folder)
