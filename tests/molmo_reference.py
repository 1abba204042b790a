"""An independent reference implementation of the official MolmoE math, for tests.

Written from shared/brief/molmoe.md (and the official modeling_molmoe.py it describes), in plain
torch, over tensors in the OFFICIAL key layout (``model.transformer.blocks.N.attn.att_proj.weight``
...) and the official ``config.json`` fields. It shares no code with ``rollout_workers.molmoe``
except that tests feed it the same preprocessed inputs. Everything runs in float32 with explicit
softmax attention, the per-expert ``index_add_`` loop and no KV cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open


def read_official_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, {official key: float32 tensor}) read straight from the safetensors files."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    sd = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k).float()
    return cfg, sd


def _layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _attention(q, k, v, causal: bool):
    """q, k, v [B, H, T, D] -> [B, H, T, D], explicit softmax in float32."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)
    if causal:
        t = q.shape[-2]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1) @ v


class MolmoReference:
    def __init__(self, cfg: Mapping, sd: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.sd = sd
        vb = cfg["vision_backbone"]
        self.vit_heads = vb["image_num_heads"]
        self.vit_head_dim = vb["image_head_dim"]
        self.vit_layers_n = vb["image_num_layers"]
        self.vit_eps = vb["image_norm_eps"]
        self.patch = vb["image_patch_size"]
        self.crop_patches = vb["image_default_input_size"][0] // self.patch
        self.d = cfg["d_model"]
        self.n_heads = cfg["n_heads"]
        self.n_layers = cfg["n_layers"]
        self.eps = cfg["layer_norm_eps"]
        self.theta = cfg["rope_theta"]
        self.top_k = cfg["moe_top_k"]
        self.n_experts = cfg["moe_num_experts"]

    @classmethod
    def from_folder(cls, folder) -> "MolmoReference":
        cfg, sd = read_official_folder(folder)
        return cls(cfg, sd)

    # ------------------------------------------------------------------ vision
    def vit_block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [n, N, P] -> list of block outputs [n, 1+N, C] (official VisionTransformer)."""
        sd, p = self.sd, "model.vision_backbone.image_vit."
        x = images.float() @ sd[p + "patch_embedding.weight"].T
        cls = sd[p + "class_embedding"].view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + sd[p + "positional_embedding"][None]
        x = _layer_norm(x, sd[p + "pre_ln.weight"], sd[p + "pre_ln.bias"], self.vit_eps)
        outs = []
        for i in range(self.vit_layers_n):
            b = p + f"transformer.resblocks.{i}."
            h = _layer_norm(x, sd[b + "attention_norm.weight"], sd[b + "attention_norm.bias"], self.vit_eps)
            x = x + self._mhdpa(h, h, b + "attention.")
            h = _layer_norm(x, sd[b + "ffn_norm.weight"], sd[b + "ffn_norm.bias"], self.vit_eps)
            h = h @ sd[b + "feed_forward.w1.weight"].T + sd[b + "feed_forward.w1.bias"]
            h = h * torch.sigmoid(1.702 * h)  # quick_gelu
            x = x + h @ sd[b + "feed_forward.w2.weight"].T + sd[b + "feed_forward.w2.bias"]
            outs.append(x)
        return outs

    def _mhdpa(self, xq_in, xkv_in, prefix):
        sd = self.sd
        heads, hd = self.vit_heads, self.vit_head_dim
        b, tq, _ = xq_in.shape
        tk = xkv_in.shape[1]
        q = (
            (xq_in @ sd[prefix + "wq.weight"].T + sd[prefix + "wq.bias"])
            .view(b, tq, heads, hd)
            .transpose(1, 2)
        )
        k = (
            (xkv_in @ sd[prefix + "wk.weight"].T + sd[prefix + "wk.bias"])
            .view(b, tk, heads, hd)
            .transpose(1, 2)
        )
        v = (
            (xkv_in @ sd[prefix + "wv.weight"].T + sd[prefix + "wv.bias"])
            .view(b, tk, heads, hd)
            .transpose(1, 2)
        )
        o = _attention(q, k, v, causal=False).transpose(1, 2).reshape(b, tq, heads * hd)
        return o @ sd[prefix + "wo.weight"].T + sd[prefix + "wo.bias"]

    def image_features(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """images [n, N, P], image_masks [n, N] -> [n, tokens_per_crop, d_model]."""
        sd, vb = self.sd, "model.vision_backbone."
        n = images.shape[0]
        valid = torch.all(images.view(n, -1) != -1, dim=1).float().view(n, 1, 1)
        outs = self.vit_block_outputs(images)
        feats = torch.cat([outs[i] for i in self.cfg["vit_layers"]], dim=-1)[:, 1:] * valid
        all_pad = (image_masks == 0).float()
        partial = ((image_masks < 1) & (image_masks != 0)).float()
        feats = (
            feats
            + sd[vb + "pad_embed"][0] * all_pad[..., None]
            + sd[vb + "pad_embed"][1] * partial[..., None]
        )
        s = self.crop_patches
        feats = feats.view(n, s, s, -1)
        if s % 2:
            feats = F.pad(feats, (0, 0, 0, 1, 0, 1))
        h = feats.shape[1] // 2
        groups = []
        for ci in range(n):
            for r in range(h):
                for c in range(h):
                    groups.append(feats[ci, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4, -1))
        groups = torch.stack(groups)  # [(n h w), 4, F]
        query = groups.mean(dim=1, keepdim=True)
        pooled = self._mhdpa(query, groups, vb + "image_pooling_2d.").view(n, h * h, -1)
        w1, w2, w3 = (sd[vb + f"image_projector.{k}.weight"] for k in ("w1", "w2", "w3"))
        return (F.silu(pooled @ w1.T) * (pooled @ w3.T)) @ w2.T

    # ------------------------------------------------------------------ LLM
    def _rope(self, x):
        """x [H, T, D] rotate-half RoPE at positions 0..T-1."""
        t, dim = x.shape[-2], x.shape[-1]
        inv = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        freqs = torch.arange(t, dtype=torch.float)[:, None] * inv[None]
        pos = torch.cat([freqs, freqs], dim=-1)
        x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
        return x * pos.cos() + torch.cat([-x2, x1], dim=-1) * pos.sin()

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        image_input_idx: torch.Tensor | None = None,
        top_k: Mapping[int, int] | None = None,
        skip: set[int] | frozenset[int] = frozenset(),
    ) -> torch.Tensor:
        """input_ids [T] -> logits [T, embedding_size]."""
        sd, t = self.sd, "model.transformer."
        table = torch.cat([sd[t + "wte.embedding"], sd[t + "wte.new_embedding"]], dim=0)
        x = table[input_ids.long()].clone()
        if images is not None:
            feats = self.image_features(images, image_masks).reshape(-1, self.d)
            for j, pos in enumerate(image_input_idx.reshape(-1).tolist()):
                if pos >= 0:
                    x[pos] = x[pos] + feats[j]
        T, d, H = x.shape[0], self.d, self.n_heads
        hd = d // H
        for i in range(self.n_layers):
            if i in skip:
                continue
            b = t + f"blocks.{i}."
            h = _rms_norm(x, sd[b + "attn.attn_norm.weight"], self.eps)
            q, k, v = (h @ sd[b + "attn.att_proj.weight"].T).split([d, d, d], dim=-1)
            q = _rms_norm(q, sd[b + "attn.q_norm.weight"], self.eps)
            k = _rms_norm(k, sd[b + "attn.k_norm.weight"], self.eps)
            q, k, v = (z.view(T, H, hd).transpose(0, 1) for z in (q, k, v))
            q, k = self._rope(q), self._rope(k)
            o = _attention(q[None], k[None], v[None], causal=True)[0].transpose(0, 1).reshape(T, d)
            x = x + o @ sd[b + "attn.attn_out.weight"].T
            h = _rms_norm(x, sd[b + "mlp.ff_norm.weight"], self.eps)
            probs = torch.softmax(h @ sd[b + "mlp.gate.weight"].T, dim=-1, dtype=torch.float)
            k_i = (top_k or {}).get(i, self.top_k)
            weights, chosen = torch.topk(probs, k_i, dim=-1)  # no renormalisation
            out = torch.zeros_like(h)
            expert_mask = F.one_hot(chosen, num_classes=self.n_experts).permute(2, 1, 0)
            for e in range(self.n_experts):
                slot, tok = torch.where(expert_mask[e])
                if tok.numel() == 0:
                    continue
                xe = h[tok]
                g = xe @ sd[b + f"mlp.experts.{e}.gate_proj.weight"].T
                u = xe @ sd[b + f"mlp.experts.{e}.up_proj.weight"].T
                y = (F.silu(g) * u) @ sd[b + f"mlp.experts.{e}.down_proj.weight"].T
                out.index_add_(0, tok, y * weights[tok, slot, None])
            x = x + out
        x = _rms_norm(x, sd[t + "ln_f.weight"], self.eps)
        return x @ sd["lm_head.weight"].T

    def greedy(
        self,
        input_ids,
        images=None,
        image_masks=None,
        image_input_idx=None,
        max_new_tokens=4,
        top_k=None,
        skip=frozenset(),
    ) -> list[int]:
        """Greedy decoding by full recomputation (no cache); stops after max_new_tokens."""
        ids = input_ids.clone()
        out = []
        for _ in range(max_new_tokens):
            logits = self.forward(ids, images, image_masks, image_input_idx, top_k=top_k, skip=skip)
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
        return out
