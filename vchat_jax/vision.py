"""The frozen vision towers in Flax NNX: Hugging Face's CLIP ViT and Qwen-VL's ViT with its resampler.

Mirrors vchat_torch/vision.py. CLIP follows transformers' CLIPVisionModel (quick_gelu, `pre_layrnorm`)
and returns `last_hidden_state`, i.e. the encoder output BEFORE `post_layernorm` (which is kept as a
parameter so checkpoints round-trip, but not applied), as the reference does. The Qwen tower follows
the reference's `third_party_model/qwen_clip/qwen_clip.py`: per-head [q|k|v] packing of `in_proj`,
exact GELU, LayerNorm eps 1e-6, a positional table resized by bicubic interpolation (a fixed matrix,
vchat/vision_math.py's `bicubic_matrix`), and a resampler (`QueryPool`: one nn.MultiheadAttention of
learned queries, shared with the perceiver projection).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vchat.config import VisionConfig
from vchat.vision_math import resize_matrix, sincos_2d

from .layers import ACT, constrain, embed, layer_norm, linear, param, sdpa

# -- position tables ---------------------------------------------------------------------------------


def resize_abs_pos(pos: jax.Array, tgt_len: int) -> jax.Array:
    """The reference's `get_abs_pos`: (S*S, C) -> (T*T, C), T = isqrt(tgt_len); unchanged when S == T."""
    s, t = int(math.sqrt(pos.shape[0])), int(math.sqrt(tgt_len))
    if s == t:
        return pos
    return jnp.asarray(resize_matrix(pos.shape[0], tgt_len)) @ pos.astype(jnp.float32)  # (T*T, C)


# -- CLIP (transformers' CLIPVisionModel) ---------------------------------------------------------------


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        D, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = param(jax.random.normal(rngs.params(), (D,)) * 0.02, ("vis_embed",))
        self.patch_embedding = nnx.Conv(cfg.num_channels, D, (p, p), strides=(p, p), padding="VALID",
                                        use_bias=False, rngs=rngs,
                                        kernel_metadata={"logical_axes": (None, None, None, "vis_embed")})
        self.position_embedding = embed(cfg.num_patches + 1, D, (None, "vis_embed"), rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        N = pixels.shape[0]
        x = self.patch_embedding(pixels.transpose(0, 2, 3, 1))  # (N, g, g, D) from NCHW pixels
        x = x.reshape(N, -1, x.shape[-1])  # (N, g*g, D), row-major over the grid like torch's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding[...], (N, 1, x.shape[-1]))  # (N, 1, D)
        return jnp.concatenate([cls, x], axis=1) + self.position_embedding.embedding[...][None]  # (N, 1+P, D)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.k_proj = linear(D, D, ("vis_embed", "vis_heads"), rngs)
        self.v_proj = linear(D, D, ("vis_embed", "vis_heads"), rngs)
        self.q_proj = linear(D, D, ("vis_embed", "vis_heads"), rngs)
        self.out_proj = linear(D, D, ("vis_heads", "vis_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        N, L, D = x.shape
        H = self.num_heads

        def heads(t):
            return t.reshape(N, L, H, D // H).transpose(0, 2, 1, 3)  # (N, H, L, hd)

        y = sdpa(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))  # (N, H, L, hd)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(N, L, D))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("vis_embed", "vis_mlp"), rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("vis_mlp", "vis_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACT[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, rngs)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "vis_embed", rngs)
        self.mlp = CLIPMLP(cfg, rngs)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "vis_embed", rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(constrain(x, ("act_batch", "act_len", "act_embed")))
        return x


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs)
        self.pre_layrnorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "vis_embed", rngs)
        self.encoder = CLIPEncoder(cfg, rngs)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "vis_embed", rngs)  # unused

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """(N, C, H, W) -> last_hidden_state (N, 1 + patches, D), before post_layernorm."""
        return self.encoder(self.pre_layrnorm(self.embeddings(pixels)))


class CLIPTower(nnx.Module):
    """CLIPVisionModel under `vision_model`, so paths read `vis_encoder.vision_model.*`."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.vision_model = CLIPVisionTransformer(cfg, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.vision_model(pixels)


# -- Qwen-VL's ViT and resampler ----------------------------------------------------------------------


class VisualAttention(nnx.Module):
    """Self-attention whose in_proj packs [q|k|v] per head: output (L, H, 3 * hd)."""

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.num_heads = heads
        self.in_proj = linear(width, 3 * width, ("vis_embed", "vis_heads"), rngs)
        self.out_proj = linear(width, width, ("vis_heads", "vis_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        N, L, D = x.shape
        H = self.num_heads
        qkv = self.in_proj(x).reshape(N, L, H, 3 * (D // H)).transpose(0, 2, 1, 3)  # (N, H, L, 3 hd)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x (N, H, L, hd)
        y = sdpa(q, k, v)  # (N, H, L, hd)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(N, L, D))


class QwenMLP(nnx.Module):
    def __init__(self, width: int, mlp: int, act: str, rngs: nnx.Rngs):
        self.act = act  # "gelu" (exact) in Qwen-VL
        self.c_fc = linear(width, mlp, ("vis_embed", "vis_mlp"), rngs)
        self.c_proj = linear(mlp, width, ("vis_mlp", "vis_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(ACT[self.act](self.c_fc(x)))


class VisualAttentionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        w = cfg.hidden_size
        self.ln_1 = layer_norm(w, cfg.layer_norm_eps, "vis_embed", rngs)
        self.ln_2 = layer_norm(w, cfg.layer_norm_eps, "vis_embed", rngs)
        self.attn = VisualAttention(w, cfg.num_attention_heads, rngs)
        self.mlp = QwenMLP(w, cfg.intermediate_size, cfg.hidden_act, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.resblocks = nnx.List([VisualAttentionBlock(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.resblocks:
            x = block(constrain(x, ("act_batch", "act_len", "act_embed")))
        return x


class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention: in_proj packs [q; k; v] blockwise (3 * D outputs), then out_proj."""

    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.num_heads = heads
        self.in_proj = linear(dim, 3 * dim, ("embed", "heads"), rngs)
        self.out_proj = linear(dim, dim, ("heads", "embed"), rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        D, H = q.shape[-1], self.num_heads
        w, b = self.in_proj.kernel[...], self.in_proj.bias[...]  # (D, 3D), (3D,)

        def heads(x, i):
            y = x @ w[:, i * D:(i + 1) * D] + b[i * D:(i + 1) * D]  # (N, L, D)
            return y.reshape(*y.shape[:2], H, D // H).transpose(0, 2, 1, 3)  # (N, H, L, hd)

        y = sdpa(heads(q, 0), heads(k, 1), heads(v, 2))  # (N, H, Lq, hd)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], D))


class QueryPool(nnx.Module):
    """Learned queries (with 2-D sin-cos positions) cross-attending once to a token sequence: the pooling
    of Qwen-VL's resampler and of the perceiver projection. Subclasses keep its parameter names
    (`pos_embed`, `query`, `kv_proj`, `attn`, `ln_q`, `ln_kv`) at their own level, as the reference's.
    `kv_proj` is a Linear with bias when `kv_bias`, else a bias-free Linear only when the widths differ."""

    def __init__(self, dim: int, grid: int, kv_dim: int, eps: float, rngs: nnx.Rngs, kv_bias: bool = False,
                 kv_axis: str = "vis_embed"):
        self.pos_embed = param(jnp.asarray(sincos_2d(dim, grid)), (None, "embed"))
        self.query = param(jax.random.truncated_normal(rngs.params(), -2, 2, (grid * grid, dim)) * 0.02,
                           (None, "embed"))
        self.kv_proj = linear(kv_dim, dim, (kv_axis, "embed"), rngs, bias=kv_bias) \
            if kv_bias or kv_dim != dim else None
        self.attn = MultiheadAttention(dim, dim // 128, rngs)
        self.ln_q = layer_norm(dim, eps, "embed", rngs)
        self.ln_kv = layer_norm(dim, eps, "embed", rngs)

    def pool(self, x: jax.Array) -> jax.Array:
        """(N, L, kv_dim) -> (N, Q, D); the key positions are the query table resized to isqrt(L) squared."""
        pos_k = resize_abs_pos(self.pos_embed[...], x.shape[1])  # (L, D)
        x = self.ln_kv(self.kv_proj(x) if self.kv_proj is not None else x)  # (N, L, D)
        q = self.ln_q(self.query[...]) + self.pos_embed[...]  # (Q, D)
        q = jnp.broadcast_to(q, (x.shape[0], *q.shape))  # (N, Q, D)
        return self.attn(q, x + pos_k, x)  # (N, Q, D)


class Resampler(QueryPool):
    """Qwen-VL's `attn_pool`: n_queries learned queries over the ViT tokens."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        super().__init__(cfg.output_dim, math.isqrt(cfg.n_queries), cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pool(x)  # (N, Q, D)


class QwenVisionTransformer(nnx.Module):
    """Qwen-VL's ViT (the reference's `VisionTransformer`): (N, 3, H, W) -> (N, n_queries, output_dim)."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        w, p = cfg.hidden_size, cfg.patch_size
        self.conv1 = nnx.Conv(cfg.num_channels, w, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                              rngs=rngs, kernel_metadata={"logical_axes": (None, None, None, "vis_embed")})
        self.positional_embedding = param(jax.random.normal(rngs.params(), (cfg.pos_embed_rows, w)) * w**-0.5,
                                          (None, "vis_embed"))
        self.ln_pre = layer_norm(w, cfg.layer_norm_eps, "vis_embed", rngs)
        self.transformer = TransformerBlock(cfg, rngs)
        self.attn_pool = Resampler(cfg, rngs)
        self.ln_post = layer_norm(cfg.output_dim, cfg.layer_norm_eps, "embed", rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        N = pixels.shape[0]
        x = self.conv1(pixels.transpose(0, 2, 3, 1))  # (N, g, g, W)
        x = x.reshape(N, -1, x.shape[-1])  # (N, g*g, W)
        x = self.ln_pre(x + resize_abs_pos(self.positional_embedding[...], x.shape[1]))
        x = self.transformer(x)
        return self.ln_post(self.attn_pool(x))  # (N, Q, D)


def build_vision(cfg: VisionConfig, rngs: nnx.Rngs) -> nnx.Module:
    return CLIPTower(cfg, rngs) if cfg.kind == "clip" else QwenVisionTransformer(cfg, rngs)
