"""The vision -> language projections (`--vis_proj` of the reference), in Flax NNX.

Mirrors vchat_torch/projection.py and the reference's `modeling_dsvl.build_projection` / `vis_proj.py`:
- baseline: Linear + LayerNorm(eps 1e-12), an nn.Sequential (`projection.0`, `projection.1`);
- vit: one more CLIP encoder layer over the tower's tokens, then Linear + LayerNorm;
- perceiver: grid**2 learned queries cross-attend (nn.MultiheadAttention, hidden // 128 heads) to the
  tower's patch tokens (CLS dropped), then LayerNorm + Linear (vision.QueryPool, as Qwen's resampler).
  The key positions are the query table resized (bicubic) to isqrt(token count): the reference counts
  the CLS token, which gives the same side for a square patch grid.
"""

from __future__ import annotations

import jax
from flax import nnx

from vchat.config import ModelConfig

from .layers import layer_norm, linear
from .vision import CLIPEncoderLayer, QueryPool


def linear_norm(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Sequential:
    return nnx.Sequential(linear(d_in, d_out, ("vis_out", "embed"), rngs), layer_norm(d_out, 1e-12, "embed", rngs))


class VisProjectionViT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.vis_layer = CLIPEncoderLayer(cfg.vision, rngs)
        self.projection = linear_norm(cfg.vision.hidden_size, cfg.llm.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projection(self.vis_layer(x))  # (N, T, hidden)


class VisProjectionPerceiver(QueryPool):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dim = cfg.llm.hidden_size
        super().__init__(dim, cfg.projection.perceiver_grid, cfg.vision.out_dim, 1e-12, rngs, kv_bias=True,
                         kv_axis="vis_out")
        self.projection = nnx.Sequential(layer_norm(dim, 1e-12, "embed", rngs),
                                         linear(dim, dim, ("embed", "embed_out"), rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projection(self.pool(x[:, 1:]))  # (N, Q, D), CLS dropped


def build_projection(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    kind = cfg.projection.kind
    if kind == "baseline":
        return linear_norm(cfg.vision.out_dim, cfg.llm.hidden_size, rngs)
    if kind == "vit":
        return VisProjectionViT(cfg, rngs)
    if kind == "perceiver":
        return VisProjectionPerceiver(cfg, rngs)
    raise ValueError(f"unknown projection kind {kind!r}")
