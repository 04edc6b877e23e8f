"""Vision -> language projections (the reference's `--vis_proj`), with its parameter names.

- baseline: `projection.0` Linear(vision, lang) + `projection.1` LayerNorm(lang, eps 1e-12), per token.
- vit: one extra CLIP encoder layer (`projection.vis_layer`), then `projection.projection.{0,1}` as
  baseline. Keeps every token.
- perceiver: grid**2 learned queries cross-attend (`nn.MultiheadAttention`, heads = lang // 128) to
  the patch tokens (CLS dropped) with 2-D sin-cos positions, then LayerNorm -> Linear (vision.QueryPool,
  as Qwen's resampler). The key positions are the query table resized to isqrt(token count): the
  reference counts the CLS token, which gives the same side for a square patch grid.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from vchat.config import ModelConfig

from .vision import QueryPool, clip_config


def linear_norm(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out, eps=1e-12))


class VisProjectionViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vis_layer = CLIPEncoderLayer(clip_config(cfg.vision))
        self.projection = linear_norm(cfg.vision.hidden_size, cfg.llm.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vis_layer(x, None))


class VisProjectionPerceiver(QueryPool):
    def __init__(self, cfg: ModelConfig):
        dim = cfg.llm.hidden_size
        super().__init__(dim, cfg.projection.perceiver_grid, cfg.vision.out_dim, 1e-12, kv_bias=True, query_std=0.02)
        self.projection = nn.Sequential(nn.LayerNorm(dim, eps=1e-12), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pool(x[:, 1:]))  # (N, Q, D), CLS dropped


def build_projection(cfg: ModelConfig) -> nn.Module:
    kind = cfg.projection.kind
    if kind == "baseline":
        return linear_norm(cfg.vision.out_dim, cfg.llm.hidden_size)
    if kind == "vit":
        return VisProjectionViT(cfg)
    return VisProjectionPerceiver(cfg)
