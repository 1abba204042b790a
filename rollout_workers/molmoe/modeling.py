"""MolmoE built from transformers parts: ``CLIPVisionModel`` + :class:`MolmoConnector` +
``OlmoeForCausalLM`` + ``new_embedding`` (the 128 extra input-only embedding rows).

The forward is split into segments the request path can time and reorder:

* :meth:`MolmoeModel.encode_images` - ViT + connector: crops -> one vector per ``<im_patch>`` token;
* :meth:`MolmoeModel.embed` - word embeddings from ``cat(embedding, new_embedding)`` plus the
  scatter-ADD of image features at ``image_input_idx``;
* :meth:`MolmoeModel.run_blocks` - any increasing list of LLM blocks over hidden states, with a
  cache, explicit position ids and a per-block top_k (restored afterwards);
* :meth:`MolmoeModel.head` - final RMSNorm + lm_head;
* :meth:`MolmoeModel.forward` and :meth:`MolmoeModel.greedy_generate` for the simple cases.

Everything is batch size 1: ``input_ids`` is [T] or [1, T]; hidden states are [1, T, d_model].
Works with transformers 5.17 (the GPU machines) and newer (the decoder layers' cache keyword was
renamed from ``past_key_values`` to ``cache``; both are handled).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, OlmoeConfig, OlmoeForCausalLM
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from .config import MolmoeConfig
from .connector import MolmoConnector
from .skip import SkipAwareCache, normalize_block_ids, normalize_top_k, top_k_override


def clip_vision_config(cfg: MolmoeConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.vit_hidden_size,
        intermediate_size=cfg.vit_mlp_size,
        num_hidden_layers=cfg.vit_num_layers,
        num_attention_heads=cfg.vit_num_heads,
        num_channels=3,
        image_size=cfg.crop_size_px,
        patch_size=cfg.patch_size_px,
        hidden_act="quick_gelu",
        layer_norm_eps=cfg.vit_layer_norm_eps,
        attention_dropout=0.0,
    )


def olmoe_config(cfg: MolmoeConfig) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=cfg.embedding_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.expert_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=None,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=cfg.clip_qkv,
        num_experts_per_tok=cfg.top_k,
        num_experts=cfg.num_experts,
        output_router_logits=False,
        norm_topk_prob=False,
        use_cache=True,
    )


class MolmoeModel(nn.Module):
    """MolmoE-1B (or a tiny model of the same structure).

    Submodules: ``vision`` (``CLIPVisionModel``; its ``post_layernorm`` is an Identity because Molmo
    never uses it), ``connector`` (:class:`MolmoConnector`), ``llm`` (``OlmoeForCausalLM`` whose
    vocabulary is ``embedding_size``), ``new_embedding`` [additional_vocab_size, d_model].
    ``weights_source`` says where the weights came from (a checkpoint folder or "RANDOM ...").
    """

    def __init__(self, config: MolmoeConfig):
        super().__init__()
        self.config = config
        self.vision = CLIPVisionModel(clip_vision_config(config))
        self.vision.post_layernorm = nn.Identity()
        self.connector = MolmoConnector(config)
        self.llm = OlmoeForCausalLM(olmoe_config(config))
        self.new_embedding = nn.Parameter(torch.zeros(config.additional_vocab_size, config.d_model))
        self.weights_source = "uninitialised (transformers' default init)"
        layer_forward = inspect.signature(type(self.llm.model.layers[0]).forward).parameters
        self._cache_kwarg = "cache" if "cache" in layer_forward else "past_key_values"

    # ------------------------------------------------------------------ properties / dtypes
    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the LLM (embeddings, blocks, head)."""
        return self.llm.lm_head.weight.dtype

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    @property
    def layers(self) -> nn.ModuleList:
        """The LLM blocks; ``layers[i].mlp.gate.top_k`` is block i's top_k."""
        return self.llm.model.layers

    def set_dtypes(self, dtype: torch.dtype, vision_dtype: torch.dtype | None = None) -> "MolmoeModel":
        """Cast the LLM (and ``new_embedding``) to ``dtype`` and the ViT + connector to
        ``vision_dtype`` (default float32), keeping RoPE's inverse frequencies in float32."""
        vision_dtype = vision_dtype or torch.float32
        rotary = self.llm.model.rotary_emb
        saved = {n: b.detach().clone() for n, b in rotary.named_buffers(recurse=False)}
        self.llm.to(dtype)
        with torch.no_grad():
            self.new_embedding.data = self.new_embedding.data.to(dtype)
        for n, b in saved.items():
            setattr(rotary, n, b)  # registered buffer: stays a buffer, float32
        self.vision.to(vision_dtype)
        self.connector.to(vision_dtype)
        return self

    # ------------------------------------------------------------------ vision
    def patch_embeddings(self, patches: torch.Tensor) -> torch.Tensor:
        """CLIP's embeddings computed on patches: [n, n_patches, patch_dim] ((dh, dw, c) per patch) ->
        [n, 1 + n_patches, width] = [CLS, patches] + position embeddings. The stride-p convolution over
        the un-patchified crop is the same product as one GEMM over the patch rows, without rebuilding
        the pixel grid (a copy and a layout change on GPUs)."""
        emb = self.vision.embeddings
        w = emb.patch_embedding.weight                                       # [width, 3, p, p]
        x = F.linear(patches, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), emb.patch_embedding.bias)
        cls = emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + emb.position_embedding.weight[: x.shape[1] + 1]

    def encode_images(self, images: torch.Tensor, image_masks: torch.Tensor | None,
                      layer_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """ViT + connector.

        images: float [n_crops, n_patches, patch_dim] (normalised pixels, (dh, dw, c) per patch; a crop
        with any pixel exactly -1 is treated as batch padding and its features are zeroed, as in the
        official code). image_masks: [n_crops, n_patches] or None.
        Returns [n_crops, tokens_per_crop, d_model] in the vision dtype.
        layer_fn(i, hidden) -> hidden runs ViT layer i instead of the transformers module (the fast
        engine's ``vision_layer``); hidden is [n_crops, 1 + n_patches, width].
        """
        cfg = self.config
        if images.dim() == 4 and images.shape[0] == 1:
            images = images[0]
        if image_masks is not None and image_masks.dim() == 3 and image_masks.shape[0] == 1:
            image_masks = image_masks[0]
        if images.dim() != 3 or images.shape[1:] != (cfg.patches_per_crop, cfg.patch_dim):
            raise ValueError(
                f"images must be [n_crops, {cfg.patches_per_crop}, {cfg.patch_dim}], "
                f"got {tuple(images.shape)}"
            )
        x = images.to(device=self.device, dtype=self.vision_dtype)
        valid_crop = torch.all(x != -1, dim=2, keepdim=True).all(dim=1, keepdim=True)  # [n, 1, 1]
        hidden = self.vision.pre_layrnorm(self.patch_embeddings(x))
        wanted = cfg.vit_block_indices
        outputs: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.vision.encoder.layers[: max(wanted) + 1]):
            hidden = layer(hidden, None) if layer_fn is None else layer_fn(i, hidden)
            if isinstance(hidden, tuple):  # older layer APIs
                hidden = hidden[0]
            if i in wanted:
                outputs[i] = hidden
        features = torch.cat([outputs[i] for i in wanted], dim=-1)[:, 1:]  # drop CLS
        features = features * valid_crop.to(features.dtype)
        masks = None if image_masks is None else image_masks.to(device=self.device, dtype=self.vision_dtype)
        return self.connector(features, masks)

    # ------------------------------------------------------------------ embeddings
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] or [1, T] -> [1, T, d_model]: rows of cat(embedding, new_embedding).
        An id of -1 is read as 0 (official behaviour for padding)."""
        ids = _as_batch1(input_ids, "input_ids").to(self.device)
        ids = torch.where(ids == -1, torch.zeros_like(ids), ids)
        n_base = self.config.embedding_size
        if ids.device.type == "cpu":
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.total_vocab_size:
                raise ValueError(
                    f"token ids must be in 0..{self.config.total_vocab_size - 1}, got {lo}..{hi}"
                )
        table = self.llm.model.embed_tokens.weight
        base = nn.functional.embedding(ids.clamp(max=n_base - 1), table)
        if self.config.additional_vocab_size == 0:
            return base
        extra = nn.functional.embedding((ids - n_base).clamp(min=0), self.new_embedding.to(table.dtype))
        return torch.where((ids >= n_base).unsqueeze(-1), extra, base)

    def embed(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        image_input_idx: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings [1, T, d_model] (LLM dtype).

        Word embeddings plus, if ``images`` (or precomputed ``image_features`` from
        :meth:`encode_images`) are given, each pooled feature ADDED at its ``image_input_idx``
        position ([n_crops, tokens_per_crop]; negative = dropped).
        """
        x = self.embed_tokens(input_ids)
        if images is None and image_features is None:
            return x
        if image_input_idx is None:
            raise ValueError("image_input_idx is required with images")
        if image_features is None:
            image_features = self.encode_images(images, image_masks)
        return self.add_image_features(x, image_features, image_input_idx)

    def add_image_features(
        self, inputs_embeds: torch.Tensor, image_features: torch.Tensor, image_input_idx: torch.Tensor
    ) -> torch.Tensor:
        """inputs_embeds [1, T, d] + image_features [n_crops, tokens_per_crop, d] scattered (added) at
        image_input_idx [n_crops, tokens_per_crop] -> [1, T, d]. No host sync (dropped features add
        zero at position 0)."""
        idx = image_input_idx.reshape(-1).to(inputs_embeds.device)
        feats = image_features.reshape(idx.shape[0], -1).to(inputs_embeds.dtype)
        if feats.shape[-1] != inputs_embeds.shape[-1]:
            raise ValueError(
                f"image features are {feats.shape[-1]} wide, embeddings {inputs_embeds.shape[-1]}"
            )
        valid = idx >= 0
        feats = feats * valid.unsqueeze(-1).to(feats.dtype)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        return inputs_embeds.index_add(1, idx, feats.unsqueeze(0))

    # ------------------------------------------------------------------ LLM blocks
    def new_cache(self, block_ids: Sequence[int] | None = None) -> SkipAwareCache:
        """An empty KV cache for a request that runs ``block_ids`` (default: all blocks)."""
        ids = normalize_block_ids(block_ids, self.config.n_layers)
        return SkipAwareCache(config=self.llm.config, ref_layer=ids[0])

    def run_blocks(
        self,
        hidden_states: torch.Tensor,
        block_ids: Sequence[int] | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        top_k: int | Mapping[int, int] | None = None,
    ) -> torch.Tensor:
        """Run the given blocks (strictly increasing indices; None = all) over ``hidden_states``
        [1, T, d_model] and return [1, T, d_model] (no final norm).

        ``position_ids`` [1, T] (default: continue from the cache). ``cache``: keys/values are stored
        at each block's own index, so one cache serves several calls (e.g. prefix blocks, then the
        rest). ``top_k``: None (native), an int for every block of this call, or {block: k}; it is
        restored when the call returns.
        """
        ids = normalize_block_ids(block_ids, self.config.n_layers)
        overrides = normalize_top_k(top_k, ids, self.config.num_experts)
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1:
            raise ValueError(f"hidden_states must be [1, T, d_model], got {tuple(hidden_states.shape)}")
        seq = hidden_states.shape[1]
        if position_ids is None:
            past = cache.get_seq_length(ids[0]) if cache is not None else 0
            position_ids = torch.arange(past, past + seq, device=hidden_states.device).unsqueeze(0)
        position_ids = _as_batch1(position_ids, "position_ids").to(hidden_states.device)
        llm = self.llm.model
        mask = create_causal_mask(llm.config, hidden_states, None, cache, position_ids, layer_idx=ids[0])
        position_embeddings = llm.rotary_emb(hidden_states, position_ids)
        kwargs: dict[str, Any] = {self._cache_kwarg: cache}
        with top_k_override(llm.layers, overrides):
            for i in ids:
                out = llm.layers[i](
                    hidden_states,
                    attention_mask=mask,
                    position_ids=position_ids,
                    use_cache=cache is not None,
                    position_embeddings=position_embeddings,
                    **kwargs,
                )
                hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm + lm_head: [1, T, d_model] -> logits [1, T, embedding_size]."""
        return self.llm.lm_head(self.llm.model.norm(hidden_states))

    # ------------------------------------------------------------------ convenience
    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        image_input_idx: torch.Tensor | None = None,
        *,
        block_ids: Sequence[int] | None = None,
        top_k: int | Mapping[int, int] | None = None,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [1, T, embedding_size] for one sequence (all positions)."""
        x = self.embed(input_ids, images, image_masks, image_input_idx)
        x = self.run_blocks(x, block_ids, position_ids=position_ids, cache=cache, top_k=top_k)
        return self.head(x)

    @torch.no_grad()
    def greedy_generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        image_input_idx: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 16,
        block_ids: Sequence[int] | None = None,
        top_k: int | Mapping[int, int] | None = None,
        eos_token_id: int | None = None,
    ) -> list[int]:
        """Greedy decoding with a KV cache; returns the new token ids (EOS included if produced)."""
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        ids = normalize_block_ids(block_ids, self.config.n_layers)
        cache = self.new_cache(ids)
        x = self.embed(input_ids, images, image_masks, image_input_idx)
        seq = x.shape[1]
        hidden = self.run_blocks(x, ids, cache=cache, top_k=top_k)
        logits = self.head(hidden[:, -1:])
        out: list[int] = []
        for step in range(max_new_tokens):
            next_id = int(logits[0, -1].argmax())
            out.append(next_id)
            if next_id == eos or step == max_new_tokens - 1:
                break
            x = self.embed_tokens(torch.tensor([next_id], device=self.device))
            pos = torch.tensor([[seq + step]], device=self.device)
            hidden = self.run_blocks(x, ids, position_ids=pos, cache=cache, top_k=top_k)
            logits = self.head(hidden)
        return out


def _as_batch1(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() == 2 and t.shape[0] == 1:
        return t
    raise ValueError(f"{name} must be [T] or [1, T] (batch size 1), got {tuple(t.shape)}")
