"""What the request path needs from an execution engine, and the eager engine.

The request path (rollout_workers/request_path.py) drives one request through these calls; an engine
owns the model's KV cache and how the blocks are run:

    x = engine.encode(inputs)                                 # vision + connector + embeddings [1, T, D]
    engine.begin()                                            # a new request: an empty cache
    h = engine.prefill(x, block_ids, top_k)                   # positions 0..T-1 over these blocks
    ...                                                       # (prefix blocks, Stage2, the rest)
    engine.truncate(T_keep, block_ids)                        # drop the budget token's entries
    logits = engine.head(h[:, i:i+1])                         # [1, 1, V]
    logits = engine.decode_step(token_id, position, block_ids, top_k)   # [1, 1, V]

``top_k`` is a {block: k} map; blocks not in it run at the model's native top_k. Two engines exist:
:class:`EagerEngine` (transformers' modules, a ``DynamicCache``; the reference) and
``rollout_workers.fast_engine.FastEngine`` (a static cache, grouped expert GEMMs, CUDA graphs for
decode steps). Budgets are engine-specific, so the engine's name is recorded in bundles.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


class EagerEngine:
    """transformers' eager modules (``MolmoeModel.run_blocks``) with a skip-aware ``DynamicCache``."""

    name = "eager"
    preprocess_device = None      # crops are cut on the CPU (the released processor's maths, bit for bit)

    def __init__(self, model):
        self.model = model.eval()
        self.cache = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def warmup(self, space=None, crop_counts=None, importance=None, block_lists=None) -> dict:
        """Nothing to capture; kernels warm up on the first requests."""
        return {"graphs": 0, "seconds": 0.0}

    @torch.no_grad()
    def encode(self, inputs) -> torch.Tensor:
        """MolmoInputs (on the device) -> input embeddings [1, T, d_model] with image features added."""
        feats = None
        if inputs.images is not None:
            feats = self.model.encode_images(inputs.images, inputs.image_masks)
        return self.model.embed(inputs.input_ids, image_features=feats, image_input_idx=inputs.image_input_idx)

    def begin(self) -> None:
        self.cache = self.model.new_cache([0])   # block 0 always runs (p >= 1)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, block_ids: Sequence[int], top_k: Mapping[int, int]) -> torch.Tensor:
        """x [1, T, D] at positions 0..T-1 through ``block_ids`` -> [1, T, D]; keys/values cached."""
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return self.model.run_blocks(x, list(block_ids), position_ids=positions, cache=self.cache, top_k=dict(top_k))

    def truncate(self, length: int, block_ids: Sequence[int]) -> None:
        """Keep the first ``length`` positions of every executed block's cache."""
        for b in block_ids:
            layer = self.cache.layers[b]
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]

    @torch.no_grad()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h)

    @torch.no_grad()
    def decode_step(self, token_id: int, position: int, block_ids: Sequence[int],
                    top_k: Mapping[int, int]) -> torch.Tensor:
        """One generated token at ``position`` -> logits [1, 1, V]."""
        emb = self.model.embed_tokens(torch.tensor([token_id], device=self.device))
        pos = torch.tensor([[position]], device=self.device)
        h = self.model.run_blocks(emb, list(block_ids), position_ids=pos, cache=self.cache, top_k=dict(top_k))
        return self.model.head(h)
