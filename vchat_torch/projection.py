"""Vision -> language projections (the reference's `--vis_proj`), with its parameter names.

- baseline: `projection.0` Linear(vision, lang) + `projection.1` LayerNorm(lang, eps 1e-12), per token.
- vit: one extra CLIP encoder layer (`projection.vis_layer`), then `projection.projection.{0,1}` as
  baseline. Keeps every token.
- perceiver: grid**2 learned queries cross-attend (`nn.MultiheadAttention`, heads = lang // 128) to
  the patch tokens (CLS dropped) with 2-D sin-cos positions, then LayerNorm -> Linear.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from vchat.config import ModelConfig

from .vision import clip_config, resize_abs_pos, sincos_2d


def linear_norm(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out, eps=1e-12))


class VisProjectionViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vis_layer = CLIPEncoderLayer(clip_config(cfg.vision))
        self.projection = linear_norm(cfg.vision.hidden_size, cfg.llm.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vis_layer(x, None))


class VisProjectionPerceiver(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, grid = cfg.llm.hidden_size, cfg.projection.perceiver_grid
        # Frozen (the reference means to freeze it, then re-enables its gradient: bug B15).
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(dim, grid)), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid * grid, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(cfg.vision.out_dim, dim)
        self.attn = nn.MultiheadAttention(dim, dim // 128, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-12)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-12)
        self.projection = nn.Sequential(nn.LayerNorm(dim, eps=1e-12), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos_k = resize_abs_pos(self.pos_embed, x.shape[1])  # sized from the token count, CLS included
        x = self.ln_kv(self.kv_proj(x[:, 1:]))  # (N, P, D), CLS dropped
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # (N, Q, D)
        out = self.attn(q, x + pos_k, x, need_weights=False)[0]
        return self.projection(out)


def build_projection(cfg: ModelConfig) -> nn.Module:
    kind = cfg.projection.kind
    if kind == "baseline":
        return linear_norm(cfg.vision.out_dim, cfg.llm.hidden_size)
    if kind == "vit":
        return VisProjectionViT(cfg)
    return VisProjectionPerceiver(cfg)
