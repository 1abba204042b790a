"""The Molmo connector between the CLIP ViT and the LLM (official ``MolmoPretrainedVisionBackbone``
minus the ViT): pad embeddings, 2x2 attention pooling with a mean query, SwiGLU projector.

Parameter names mirror the official checkpoint (``model.vision_backbone.{pad_embed,
image_pooling_2d.*, image_projector.*}``) so the key remap is a prefix change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MolmoeConfig


class PoolingAttention(nn.Module):
    """Official ``MultiHeadDotProductAttention`` as used for pooling (``is_vit_layer=False``): all
    four projections with bias, attention computed in float32 (``float32_attention``)."""

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.wq = nn.Linear(in_dim, num_heads * head_dim, bias=True)
        self.wk = nn.Linear(in_dim, num_heads * head_dim, bias=True)
        self.wv = nn.Linear(in_dim, num_heads * head_dim, bias=True)
        self.wo = nn.Linear(num_heads * head_dim, out_dim, bias=True)

    def forward(self, inputs_q: torch.Tensor, inputs_kv: torch.Tensor) -> torch.Tensor:
        """inputs_q [B, Q, in_dim], inputs_kv [B, K, in_dim] -> [B, Q, out_dim]."""
        b, q_len, _ = inputs_q.shape
        k_len = inputs_kv.shape[1]
        xq = self.wq(inputs_q).view(b, q_len, self.num_heads, self.head_dim)
        xk = self.wk(inputs_kv).view(b, k_len, self.num_heads, self.head_dim)
        xv = self.wv(inputs_kv).view(b, k_len, self.num_heads, self.head_dim)
        og_dtype = xq.dtype
        # float32 softmax(q k^T / sqrt(hd)) v written out: pooling has one query and 4 keys per group,
        # a shape where fused attention kernels run far below bandwidth (0.9 ms for 13 crops on an H100)
        scores = torch.einsum("bqhd,bkhd->bhqk", xq.float(), xk.float()) * self.head_dim ** -0.5
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), xv.float())
        out = out.to(og_dtype).reshape(b, q_len, self.num_heads * self.head_dim)
        return self.wo(out)


class SwiGLUProjector(nn.Module):
    """Official ``MLP`` (image projector): ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, out_dim, bias=False)
        self.w3 = nn.Linear(in_dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoConnector(nn.Module):
    """ViT patch features of all crops -> one LLM-sized vector per pooled 2x2 patch group.

    ``pad_embed[0]`` is added to patches whose mask is exactly 0 (all padding), ``pad_embed[1]`` to
    patches whose mask is partial (``mask < 1`` and not 0, which includes the quirk's -1 rows).
    """

    def __init__(self, config: MolmoeConfig):
        super().__init__()
        self.config = config
        feat_dim = config.image_feature_dim
        self.pad_embed = nn.Parameter(torch.zeros(2, feat_dim))
        self.image_pooling_2d = PoolingAttention(
            feat_dim, config.vit_num_heads, config.vit_head_dim, config.vit_hidden_size
        )
        self.image_projector = SwiGLUProjector(
            config.vit_hidden_size, config.projector_hidden_size, config.d_model
        )

    def add_pad_embeddings(self, features: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """features [n_crops, n_patches, feat_dim], image_masks [n_crops, n_patches] -> same shape."""
        masks = image_masks.to(device=features.device)
        all_pad = masks == 0
        partial_pad = torch.logical_and(masks < 1, torch.logical_not(all_pad))
        features = features + self.pad_embed[0] * all_pad.to(features.dtype).unsqueeze(-1)
        features = features + self.pad_embed[1] * partial_pad.to(features.dtype).unsqueeze(-1)
        return features

    def forward(self, features: torch.Tensor, image_masks: torch.Tensor | None) -> torch.Tensor:
        """features [n_crops, n_patches, feat_dim] (CLS dropped, padding crops zeroed),
        image_masks [n_crops, n_patches] or None -> [n_crops, tokens_per_crop, d_model]."""
        cfg = self.config
        n_crops, n_patches, feat_dim = features.shape
        side = cfg.crop_patches
        if n_patches != side * side:
            raise ValueError(f"expected {side * side} patches per crop, got {n_patches}")
        if image_masks is not None:
            if tuple(image_masks.shape) != (n_crops, n_patches):
                raise ValueError(f"image_masks {tuple(image_masks.shape)} != ({n_crops}, {n_patches})")
            features = self.add_pad_embeddings(features, image_masks)
        x = features.reshape(n_crops, side, side, feat_dim)
        ph, pw = cfg.pooling_h, cfg.pooling_w
        pad_h, pad_w = (-side) % ph, (-side) % pw
        if pad_h or pad_w:  # odd patch grids: zero rows/cols at the bottom/right before pooling
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        h, w = x.shape[1] // ph, x.shape[2] // pw
        # 'n (h dh) (w dw) c -> (n h w) (dh dw) c'
        x = (
            x.reshape(n_crops, h, ph, w, pw, feat_dim)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n_crops * h * w, ph * pw, feat_dim)
        )
        query = x.mean(dim=-2, keepdim=True)
        pooled = self.image_pooling_2d(query, x)  # [n*h*w, 1, vit_hidden]
        pooled = pooled.reshape(n_crops, h * w, -1)
        return self.image_projector(pooled)
