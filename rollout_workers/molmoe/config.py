"""MolmoE configuration: one dataclass for the vision encoder, the connector, the LLM, preprocessing
and the special token ids, with the full-size (MolmoE-1B-0924) and tiny test presets.

The hub's ``config.json`` (the official remote code's ``MolmoConfig``) is read by
:meth:`MolmoeConfig.from_hub_dict`, which also refuses structural settings this implementation does
not reproduce (dense Molmo, a different pooling, bias terms, ...). :meth:`MolmoeConfig.to_hub_dict`
writes the same format, so a tiny checkpoint folder looks like the real one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Special tokens of the Molmo processor, in the order the official code encodes them.
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
IMAGE_PATCH_TOKEN = "<im_patch>"
IMAGE_COL_TOKEN = "<im_col>"
IMAGE_PROMPT_TOKEN = "<|image|>"
IMAGE_SPECIAL_TOKENS = (
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_PATCH_TOKEN,
    IMAGE_COL_TOKEN,
    IMAGE_PROMPT_TOKEN,
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


class ConfigError(ValueError):
    """A configuration is inconsistent or describes a model this implementation does not support."""


@dataclass(frozen=True)
class MolmoeConfig:
    """All sizes of a MolmoE model. Defaults are the full-size MolmoE-1B-0924.

    LLM (OLMoE): ``embedding_size`` rows in ``wte.embedding`` and in ``lm_head`` (logits cover these
    ids), plus ``additional_vocab_size`` rows in ``new_embedding`` (input-only ids
    ``embedding_size .. embedding_size + additional_vocab_size - 1``, never predicted).

    Vision: a CLIP ViT of ``vit_num_layers`` blocks over ``crop_size_px`` square crops cut into
    ``patch_size_px`` patches; ``vit_layers`` selects block outputs with the official indexing
    (negative = from the last block, -1 is the last block's output; non-negative = block index).
    """

    # ---- LLM (OLMoE) ----
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 16
    expert_hidden_size: int = 1024
    num_experts: int = 64
    top_k: int = 8
    vocab_size: int = 50280
    embedding_size: int = 50304
    additional_vocab_size: int = 128
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    max_sequence_length: int = 4096
    clip_qkv: float | None = None
    # ---- vision (CLIP ViT-L/14-336, 23 blocks) ----
    vit_hidden_size: int = 1024
    vit_num_layers: int = 23
    vit_num_heads: int = 16
    vit_head_dim: int = 64
    vit_mlp_size: int = 4096
    vit_layer_norm_eps: float = 1e-5
    vit_layers: tuple[int, ...] = (-2, -9)
    crop_size_px: int = 336
    patch_size_px: int = 14
    pooling_h: int = 2
    pooling_w: int = 2
    # ---- preprocessing ----
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    # ---- token ids (must agree with the tokenizer; checked when a checkpoint is loaded) ----
    eos_token_id: int = 50279
    pad_token_id: int = 1
    image_start_token_id: int = 50280
    image_end_token_id: int = 50281
    image_patch_token_id: int = 50282
    image_col_token_id: int = 50283
    image_prompt_token_id: int = 50284
    # free-form label, e.g. "molmoe-1b-0924" or "tiny"
    name: str = field(default="molmoe-1b-0924", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vit_layers", tuple(int(i) for i in self.vit_layers))
        object.__setattr__(self, "overlap_margins", tuple(int(i) for i in self.overlap_margins))
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads != self.n_heads:
            # The official qk-norm normalises the full d_model-wide k, so Molmo has no GQA variant.
            problems.append(
                f"n_kv_heads {self.n_kv_heads} != n_heads {self.n_heads} "
                "(MolmoE uses plain multi-head attention)"
            )
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.embedding_size < self.vocab_size:
            problems.append(f"embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
        if self.vit_num_heads * self.vit_head_dim != self.vit_hidden_size:
            problems.append("vit_num_heads * vit_head_dim must equal vit_hidden_size (pooling merges heads)")
        if not self.vit_layers:
            problems.append("vit_layers is empty")
        for i in self.vit_layers:
            if not -self.vit_num_layers <= i < self.vit_num_layers:
                problems.append(f"vit_layers entry {i} is outside a {self.vit_num_layers}-block ViT")
        if len(set(self.vit_block_indices)) != len(self.vit_layers):
            problems.append(f"vit_layers {self.vit_layers} selects a block twice")
        if self.crop_size_px % self.patch_size_px:
            problems.append(
                f"crop_size_px {self.crop_size_px} is not a multiple of patch_size_px {self.patch_size_px}"
            )
        left, right = self.overlap_margins
        window = self.crop_patches - left - right
        if left % 2 or right % 2 or left < 0 or right < 0:
            problems.append(f"overlap_margins {self.overlap_margins} must be even and >= 0 (2x2 pooling)")
        if window <= 0 or window % 2:
            # The official crop layout only adds up (one <im_patch> per kept pooled feature) when the
            # usable window of a crop is an even number of patches.
            problems.append(
                f"overlap_margins {self.overlap_margins} leave a window of {window} patches in a "
                f"{self.crop_patches}-patch crop; it must be even and > 0"
            )
        if self.pooling_h != 2 or self.pooling_w != 2:
            problems.append("only 2x2 pooling is supported (the official preprocessing assumes it)")
        if self.max_crops < 1:
            problems.append("max_crops must be >= 1")
        ids = [
            self.image_start_token_id,
            self.image_end_token_id,
            self.image_patch_token_id,
            self.image_col_token_id,
            self.image_prompt_token_id,
            self.eos_token_id,
        ]
        total_vocab = self.embedding_size + self.additional_vocab_size
        for i in ids:
            if not 0 <= i < total_vocab:
                problems.append(f"token id {i} is outside the embedding table ({total_vocab} rows)")
        if problems:
            raise ConfigError("invalid MolmoeConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def crop_patches(self) -> int:
        """Patches per side of one crop (24 at full size)."""
        return self.crop_size_px // self.patch_size_px

    @property
    def patches_per_crop(self) -> int:
        return self.crop_patches**2

    @property
    def patch_dim(self) -> int:
        """Pixels per flattened patch, (dh, dw, c) order: 14*14*3 = 588 at full size."""
        return self.patch_size_px * self.patch_size_px * 3

    @property
    def tokens_per_crop_side(self) -> int:
        """Pooled tokens per side of one crop (12 at full size; odd grids are padded)."""
        return (self.crop_patches + self.pooling_h - 1) // self.pooling_h

    @property
    def tokens_per_crop(self) -> int:
        return self.tokens_per_crop_side**2

    @property
    def vit_num_positions(self) -> int:
        return self.patches_per_crop + 1

    @property
    def vit_block_indices(self) -> tuple[int, ...]:
        """0-based ViT block whose output each ``vit_layers`` entry selects, in concatenation order."""
        return tuple(i % self.vit_num_layers for i in self.vit_layers)

    @property
    def image_feature_dim(self) -> int:
        """Width of the concatenated ViT features (2048 at full size)."""
        return self.vit_hidden_size * len(self.vit_layers)

    @property
    def projector_hidden_size(self) -> int:
        """Hidden width of the SwiGLU image projector; the official code ties it to the expert width."""
        return self.expert_hidden_size

    @property
    def total_vocab_size(self) -> int:
        """Rows of cat(wte.embedding, new_embedding): every id the input may contain."""
        return self.embedding_size + self.additional_vocab_size

    def replace(self, **changes: Any) -> "MolmoeConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def full(cls) -> "MolmoeConfig":
        """MolmoE-1B-0924 (allenai), about 7.2B parameters, 1.5B active."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> "MolmoeConfig":
        """A tiny model of the same structure for CPU tests and the embedded default.

        ViT 3 blocks x 32 wide over 112-px crops (8x8 patches of 14 px, margins (2, 2), 4x4 pooled
        tokens per crop); LLM 4 blocks x 64 wide, 8 experts (top-2) of width 32; the vocabulary of
        the shipped tiny tokenizer (``assets/tiny_tokenizer.json``).
        """
        base = dict(
            d_model=64,
            n_layers=4,
            n_heads=4,
            n_kv_heads=4,
            expert_hidden_size=32,
            num_experts=8,
            top_k=2,
            vocab_size=448,
            embedding_size=512,
            additional_vocab_size=8,
            max_position_embeddings=4096,
            max_sequence_length=4096,
            vit_hidden_size=32,
            vit_num_layers=3,
            vit_num_heads=4,
            vit_head_dim=8,
            vit_mlp_size=64,
            vit_layers=(-2, -3),
            crop_size_px=112,
            patch_size_px=14,
            max_crops=12,
            overlap_margins=(2, 2),
            eos_token_id=0,
            pad_token_id=1,
            image_start_token_id=448,
            image_end_token_id=449,
            image_patch_token_id=450,
            image_col_token_id=451,
            image_prompt_token_id=452,
            name="tiny",
        )
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------------ hub config.json
    def to_hub_dict(self) -> dict[str, Any]:
        """The hub ``config.json`` content (official ``MolmoConfig`` field names)."""
        return {
            "auto_map": {
                "AutoConfig": "config_molmoe.MolmoConfig",
                "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM",
            },
            "architectures": ["OLMoForCausalLM"],
            "model_type": "molmo",
            "activation_type": "swiglu",
            "additional_vocab_size": self.additional_vocab_size,
            "alibi": False,
            "attention_layer_norm": True,
            "attention_layer_norm_with_affine": True,
            "attention_type": "sdpa",
            "bias_for_layer_norm": False,
            "block_group_size": 1,
            "block_type": "moe",
            "clip_qkv": self.clip_qkv,
            "crop_mode": "overlap-and-resize-c2",
            "d_model": self.d_model,
            "embedding_size": self.embedding_size,
            "float32_attention": True,
            "head_dim": None,
            "image_padding_embed": "pad_and_partial_pad",
            "image_pooling_2d": "attention-meanq",
            "image_pooling_h": self.pooling_h,
            "image_pooling_w": self.pooling_w,
            "image_projector": "mlp",
            "include_bias": False,
            "layer_norm_eps": self.layer_norm_eps,
            "layer_norm_type": "rms",
            "layer_norm_with_affine": True,
            "max_crops": self.max_crops,
            "max_position_embeddings": self.max_position_embeddings,
            "max_sequence_length": self.max_sequence_length,
            "mlp_hidden_size": 2 * self.expert_hidden_size,
            "mlp_ratio": 1,
            "moe_num_experts": self.num_experts,
            "moe_shared_expert": False,
            "moe_top_k": self.top_k,
            "multi_query_attention": None,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "norm_after": False,
            "overlap_margins": list(self.overlap_margins),
            "pad_token_id": self.pad_token_id,
            "qkv_bias": False,
            "rope": True,
            "rope_full_precision": True,
            "rope_impl": "llama",
            "rope_theta": self.rope_theta,
            "use_cls_feature": False,
            "use_position_ids": True,
            "vision_backbone": {
                "image_default_input_size": [self.crop_size_px, self.crop_size_px],
                "image_emb_dim": self.vit_hidden_size,
                "image_head_dim": self.vit_head_dim,
                "image_mlp_activations": "quick_gelu",
                "image_mlp_dim": self.vit_mlp_size,
                "image_model_type": "openai",
                "image_norm_eps": self.vit_layer_norm_eps,
                "image_num_heads": self.vit_num_heads,
                "image_num_key_value_heads": self.vit_num_heads,
                "image_num_layers": self.vit_num_layers,
                "image_num_pos": self.vit_num_positions,
                "image_patch_size": self.patch_size_px,
                "image_pos_patch_size": self.patch_size_px,
            },
            "vit_layers": list(self.vit_layers),
            "vocab_size": self.vocab_size,
            "weight_tying": False,
            # Not read by the official code; lets this project round-trip its own token ids.
            "x_molmoe_token_ids": {
                "eos": self.eos_token_id,
                "image_start": self.image_start_token_id,
                "image_end": self.image_end_token_id,
                "image_patch": self.image_patch_token_id,
                "image_col": self.image_col_token_id,
                "image_prompt": self.image_prompt_token_id,
            },
            "x_molmoe_name": self.name,
        }

    @classmethod
    def from_hub_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "MolmoeConfig":
        """Parse a hub ``config.json``. Raises :class:`ConfigError` for another model type or for
        structural settings that this implementation does not reproduce (each one listed)."""
        model_type = d.get("model_type")
        if model_type != "molmo":
            raise ConfigError(
                f"config.json describes model_type={model_type!r} (architectures={d.get('architectures')}), "
                "not a Molmo model (model_type 'molmo')"
            )
        # (key, required value, default when absent) - each is a structural choice we implement.
        required = [
            ("block_type", "moe", None),
            ("activation_type", "swiglu", "swiglu"),
            ("layer_norm_type", "rms", "rms"),
            ("attention_layer_norm", True, False),
            ("norm_after", False, False),
            ("rope", True, False),
            ("rope_impl", "llama", "llama"),
            ("alibi", False, False),
            ("include_bias", False, False),
            ("qkv_bias", False, False),
            ("weight_tying", False, False),
            ("image_pooling_2d", "attention-meanq", None),
            ("image_projector", "mlp", "mlp"),
            ("image_padding_embed", "pad_and_partial_pad", None),
            ("use_cls_feature", False, False),
            ("moe_shared_expert", False, False),
            ("crop_mode", "overlap-and-resize-c2", "overlap-and-resize-c2"),
            ("block_group_size", 1, 1),
        ]
        problems = []
        for key, want, default in required:
            got = d.get(key, default)
            if got != want:
                problems.append(f"{key}={got!r} (supported: {want!r})")
        if d.get("bias_for_layer_norm") not in (None, False):
            problems.append(f"bias_for_layer_norm={d.get('bias_for_layer_norm')!r} (supported: false)")
        if d.get("head_dim") not in (None, d.get("d_model", 0) // max(1, d.get("n_heads", 1))):
            problems.append(f"head_dim={d.get('head_dim')!r} (supported: d_model / n_heads)")
        if d.get("multi_query_attention"):
            problems.append("multi_query_attention=true (not supported)")
        vb = d.get("vision_backbone") or {}
        if not vb:
            problems.append("vision_backbone is missing")
        if vb.get("image_model_type", "openai") != "openai":
            problems.append(
                f"vision_backbone.image_model_type={vb.get('image_model_type')!r} (supported: 'openai')"
            )
        if vb.get("image_mlp_activations", "quick_gelu") != "quick_gelu":
            problems.append(
                f"vision_backbone.image_mlp_activations={vb.get('image_mlp_activations')!r} "
                "(the official ViT always applies quick_gelu)"
            )
        n_kv = vb.get("image_num_key_value_heads", vb.get("image_num_heads"))
        if n_kv != vb.get("image_num_heads"):
            problems.append("vision_backbone.image_num_key_value_heads != image_num_heads (not supported)")
        size = vb.get("image_default_input_size", [336, 336])
        if len(size) != 2 or size[0] != size[1]:
            problems.append(f"vision_backbone.image_default_input_size={size} (square crops only)")
        if vb.get("image_pos_patch_size", vb.get("image_patch_size")) != vb.get("image_patch_size"):
            problems.append("vision_backbone.image_pos_patch_size != image_patch_size (not supported)")
        if problems:
            raise ConfigError("unsupported Molmo configuration: " + "; ".join(problems))

        d_model = int(d["d_model"])
        hidden = d.get("mlp_hidden_size") or int(d.get("mlp_ratio", 4)) * d_model
        n_heads = int(d["n_heads"])
        ids = d.get("x_molmoe_token_ids") or {}
        kwargs: dict[str, Any] = dict(
            d_model=d_model,
            n_layers=int(d["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(d.get("n_kv_heads") or n_heads),
            expert_hidden_size=int(hidden) // 2,
            num_experts=int(d["moe_num_experts"]),
            top_k=int(d["moe_top_k"]),
            vocab_size=int(d["vocab_size"]),
            embedding_size=int(d.get("embedding_size") or d["vocab_size"]),
            additional_vocab_size=int(d.get("additional_vocab_size") or 0),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            max_position_embeddings=int(
                d.get("max_position_embeddings") or d.get("max_sequence_length", 4096)
            ),
            max_sequence_length=int(d.get("max_sequence_length", 4096)),
            clip_qkv=d.get("clip_qkv"),
            vit_hidden_size=int(vb["image_emb_dim"]),
            vit_num_layers=int(vb["image_num_layers"]),
            vit_num_heads=int(vb["image_num_heads"]),
            vit_head_dim=int(vb["image_head_dim"]),
            vit_mlp_size=int(vb["image_mlp_dim"]),
            vit_layer_norm_eps=float(vb.get("image_norm_eps", 1e-5)),
            vit_layers=tuple(d.get("vit_layers") or (-1,)),
            crop_size_px=int(size[0]),
            patch_size_px=int(vb["image_patch_size"]),
            pooling_h=int(d.get("image_pooling_h", 2)),
            pooling_w=int(d.get("image_pooling_w", 2)),
            max_crops=int(d.get("max_crops", 12)),
            overlap_margins=tuple(d.get("overlap_margins", (4, 4))),
            pad_token_id=int(d.get("pad_token_id", 1)),
            name=str(d.get("x_molmoe_name", "molmoe")),
        )
        for key, field_name in [
            ("eos", "eos_token_id"),
            ("image_start", "image_start_token_id"),
            ("image_end", "image_end_token_id"),
            ("image_patch", "image_patch_token_id"),
            ("image_col", "image_col_token_id"),
            ("image_prompt", "image_prompt_token_id"),
        ]:
            if key in ids:
                kwargs[field_name] = int(ids[key])
        kwargs.update(overrides)
        cfg = cls(**kwargs)
        expected_pos = cfg.vit_num_positions
        if int(vb.get("image_num_pos", expected_pos)) != expected_pos:
            raise ConfigError(
                f"vision_backbone.image_num_pos={vb.get('image_num_pos')} but a "
                f"{cfg.crop_size_px}-px crop of "
                f"{cfg.patch_size_px}-px patches has {expected_pos} positions "
                "(position interpolation is not supported)"
            )
        return cfg
