"""The vision -> language projections (`--vis_proj` of the reference), in Flax NNX.

Mirrors vchat_torch/projection.py and the reference's `modeling_dsvl.build_projection` / `vis_proj.py`:
- baseline: Linear + LayerNorm(eps 1e-12), an nn.Sequential (`projection.0`, `projection.1`);
- vit: one more CLIP encoder layer over the tower's tokens, then Linear + LayerNorm;
- perceiver: grid**2 learned queries cross-attend (nn.MultiheadAttention, hidden // 128 heads) to the
  tower's patch tokens (CLS dropped), then LayerNorm + Linear. The key positions are the query table
  resized (bicubic) to the tower's token count, CLS included, as the reference computes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vchat.config import ModelConfig

from .layers import layer_norm, linear, param
from .vision import CLIPEncoderLayer, MultiheadAttention, resize_abs_pos, sincos_2d


def linear_norm(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Sequential:
    return nnx.Sequential(linear(d_in, d_out, ("vis_out", "embed"), rngs), layer_norm(d_out, 1e-12, "embed", rngs))


class VisProjectionViT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.vis_layer = CLIPEncoderLayer(cfg.vision, rngs)
        self.projection = linear_norm(cfg.vision.hidden_size, cfg.llm.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projection(self.vis_layer(x))  # (N, T, hidden)


class VisProjectionPerceiver(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dim, grid = cfg.llm.hidden_size, cfg.projection.perceiver_grid
        self.pos_embed = param(jnp.asarray(sincos_2d(dim, grid)), (None, "embed"))
        self.query = param(jax.random.truncated_normal(rngs.params(), -2, 2, (grid * grid, dim)) * 0.02,
                           (None, "embed"))
        self.kv_proj = linear(cfg.vision.out_dim, dim, ("vis_out", "embed"), rngs)
        self.attn = MultiheadAttention(dim, dim // 128, rngs)
        self.ln_q = layer_norm(dim, 1e-12, "embed", rngs)
        self.ln_kv = layer_norm(dim, 1e-12, "embed", rngs)
        self.projection = nnx.Sequential(layer_norm(dim, 1e-12, "embed", rngs),
                                         linear(dim, dim, ("embed", "embed_out"), rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        pos_k = resize_abs_pos(self.pos_embed[...], x.shape[1])  # sized from the token count, CLS included
        x = self.ln_kv(self.kv_proj(x[:, 1:]))  # (N, P, D), CLS dropped
        q = self.ln_q(self.query[...]) + self.pos_embed[...]  # (Q, D)
        q = jnp.broadcast_to(q, (x.shape[0], *q.shape))  # (N, Q, D)
        return self.projection(self.attn(q, x + pos_k, x))  # (N, Q, D)


def build_projection(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    kind = cfg.projection.kind
    if kind == "baseline":
        return linear_norm(cfg.vision.out_dim, cfg.llm.hidden_size, rngs)
    if kind == "vit":
        return VisProjectionViT(cfg, rngs)
    if kind == "perceiver":
        return VisProjectionPerceiver(cfg, rngs)
    raise ValueError(f"unknown projection kind {kind!r}")
