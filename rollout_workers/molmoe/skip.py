"""Running a subset of the LLM's blocks, and changing top_k per block, without lasting side effects.

* :class:`SkipAwareCache` - a ``DynamicCache`` whose default sequence length (layer 0, which HF
  reads for positions and masks) comes from a block that actually runs. With a plain
  ``DynamicCache`` and block 0 skipped, cached decode silently goes wrong (molmoe.md section 3).
* :func:`top_k_override` - a context manager that sets ``llm.model.layers[i].mlp.gate.top_k`` (read
  by the router at forward time) and restores the previous values on exit, even on error.
* :func:`normalize_block_ids` / :func:`normalize_top_k` - argument checking shared by the model.

The skip set must stay the same for prefill and every decode step of a request: a block that is
re-enabled later has no keys/values for the prefix.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from torch import nn
from transformers import DynamicCache


class SkipAwareCache(DynamicCache):
    """``DynamicCache`` for runs that skip blocks: queries for layer 0 are answered from
    ``ref_layer`` (a block that runs; pass the first kept block)."""

    def __init__(self, *args, ref_layer: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_layer = int(ref_layer)

    def _ref(self, layer_idx: int) -> int:
        return self.ref_layer if layer_idx == 0 else layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._ref(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._ref(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)


def normalize_block_ids(block_ids: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """None -> all blocks; otherwise a strictly increasing, non-empty sequence of block indices."""
    if block_ids is None:
        return tuple(range(n_layers))
    ids = tuple(int(b) for b in block_ids)
    if not ids:
        raise ValueError("block_ids is empty: at least one block must run")
    if any(b < 0 or b >= n_layers for b in ids):
        raise ValueError(f"block_ids {ids} outside 0..{n_layers - 1}")
    if any(b >= c for b, c in zip(ids, ids[1:], strict=False)):
        raise ValueError(f"block_ids {ids} must be strictly increasing (blocks run in model order)")
    return ids


def normalize_top_k(
    top_k: int | Mapping[int, int] | None, block_ids: Sequence[int], num_experts: int
) -> dict[int, int]:
    """None -> {} (native top_k); an int -> that k for every block in ``block_ids``; a mapping ->
    per-block k (blocks not in it keep their native k)."""
    if top_k is None:
        return {}
    if isinstance(top_k, Mapping):
        out = {int(b): int(k) for b, k in top_k.items()}
    else:
        out = {int(b): int(top_k) for b in block_ids}
    bad = {b: k for b, k in out.items() if not 1 <= k <= num_experts}
    if bad:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {bad}")
    return out


@contextmanager
def top_k_override(layers: Sequence[nn.Module], top_k: Mapping[int, int]) -> Iterator[None]:
    """Temporarily set ``layers[i].mlp.gate.top_k = k`` for each (i, k) in ``top_k``."""
    saved: dict[int, int] = {}
    try:
        for i, k in top_k.items():
            gate = layers[i].mlp.gate
            saved[i] = gate.top_k
            gate.top_k = int(k)
        yield
    finally:
        for i, k in saved.items():
            layers[i].mlp.gate.top_k = k
