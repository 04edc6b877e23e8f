"""The frozen vision towers: transformers' CLIPVisionModel, and Qwen-VL's ViT with its resampler.

CLIP is used as is (features = `last_hidden_state`, before `post_layernorm`, as the reference).
The Qwen-VL ViT-bigG is not in transformers, so it is written here with the reference's parameter
names (`conv1`, `positional_embedding`, `ln_pre`, `transformer.resblocks.N.*`, `attn_pool.*`,
`ln_post`) and its numerics: per-head [q|k|v] packing of `in_proj`, softmax in the input dtype,
exact GELU, LayerNorm eps 1e-6, `nn.MultiheadAttention` in the resampler (`QueryPool`, shared with
the perceiver projection), and absolute position tables resized with torch's bicubic interpolation
(align_corners=False; vchat/vision_math.py's `bicubic_matrix` is the same map as a matrix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.activations import ACT2FN

from vchat.config import VisionConfig
from vchat.vision_math import sincos_2d


def clip_config(cfg: VisionConfig) -> CLIPVisionConfig:
    hf = CLIPVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                          num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                          num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
                          layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act)
    hf._attn_implementation = "eager"
    return hf


def resize_abs_pos(pos: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """(S*S, C) position table -> (T*T, C) for T = isqrt(tgt_len), bicubic, align_corners=False."""
    src, tgt = int(math.sqrt(pos.shape[0])), int(math.sqrt(tgt_len))
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, C, S, S)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)  # (T*T, C)


class VisualAttention(nn.Module):
    """Self-attention whose `in_proj` output is laid out per head as [q|k|v]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        qkv = self.in_proj(x).view(B, L, self.heads, 3 * self.head_dim)  # (B, L, nh, 3*hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # (B, nh, L, hd)
        att = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)  # (B, nh, L, L)
        y = att.softmax(dim=-1) @ v  # (B, nh, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, eps: float, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp))
        self.mlp.add_module("gelu", ACT2FN[act])  # "gelu" (exact) in Qwen-VL
        self.mlp.add_module("c_proj", nn.Linear(mlp, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            VisualAttentionBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps,
                                 cfg.hidden_act)
            for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class QueryPool(nn.Module):
    """Learned queries (with 2-D sin-cos positions) cross-attending once to a token sequence: the pooling
    of Qwen-VL's resampler and of the perceiver projection. Subclasses keep its parameter names
    (`pos_embed`, `query`, `kv_proj`, `attn`, `ln_q`, `ln_kv`) at their own level, as the reference's.
    `kv_proj` is a Linear with bias when `kv_bias`, else a bias-free Linear only when the widths differ;
    `query_std` > 0 draws the queries from a truncated normal (else zeros, for a checkpoint to fill)."""

    def __init__(self, dim: int, grid: int, kv_dim: int, eps: float, kv_bias: bool = False, query_std: float = 0.0):
        super().__init__()
        # Frozen (the perceiver's reference means to freeze it, then re-enables its gradient: bug B15).
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(dim, grid)), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid * grid, dim))
        if query_std:
            nn.init.trunc_normal_(self.query, std=query_std)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=kv_bias) if kv_bias or kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, dim // 128, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, kv_dim) -> (N, Q, D); the key positions are the query table resized to isqrt(L) squared."""
        pos_k = resize_abs_pos(self.pos_embed, x.shape[1])  # (L, D)
        x = self.ln_kv(self.kv_proj(x))  # (N, L, D)
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # (N, Q, D)
        return self.attn(q, x + pos_k, x, need_weights=False)[0]  # (N, Q, D)


class Resampler(QueryPool):
    """Qwen-VL's `attn_pool`: n_queries learned queries over the ViT tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg.output_dim, math.isqrt(cfg.n_queries), cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)  # (N, Q, D)


class QwenVisionTransformer(nn.Module):
    """Qwen-VL's ViT (the reference's `VisionTransformer`): (N, 3, H, W) -> (N, n_queries, output_dim)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        w = cfg.hidden_size
        self.conv1 = nn.Conv2d(cfg.num_channels, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(w**-0.5 * torch.randn(cfg.pos_embed_rows, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.transformer = TransformerBlock(cfg)
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=cfg.layer_norm_eps)

    def gradient_checkpointing_enable(self, **_):
        self.transformer.gradient_checkpointing = True

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # (N, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, W)
        x = self.ln_pre(x + resize_abs_pos(self.positional_embedding, x.shape[1]))
        x = self.transformer(x)
        return self.ln_post(self.attn_pool(x))  # (N, Q, D)


class CLIPTower(nn.Module):
    """transformers' CLIPVisionModel under the attribute `vision_model`, so its parameters are named
    `vision_model.*` as in the reference's checkpoints and in CLIP's own Hub checkpoints
    (transformers 5 dropped that level from CLIPVisionModel itself)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(clip_config(cfg))

    def gradient_checkpointing_enable(self, **kw):
        self.vision_model.activation_checkpointing_enable(**kw)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1 + patches, C): last_hidden_state, before post_layernorm."""
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        return self.vision_model(pixel_values=pixels.to(dtype)).last_hidden_state


def build_vision(cfg: VisionConfig) -> nn.Module:
    return CLIPTower(cfg) if cfg.kind == "clip" else QwenVisionTransformer(cfg)
