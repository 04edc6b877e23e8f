"""The frozen vision towers in Flax NNX: Hugging Face's CLIP ViT and Qwen-VL's ViT with its resampler.

Mirrors vchat_torch/vision.py. CLIP follows transformers' CLIPVisionModel (quick_gelu, `pre_layrnorm`)
and returns `last_hidden_state`, i.e. the encoder output BEFORE `post_layernorm` (which is kept as a
parameter so checkpoints round-trip, but not applied), as the reference does. The Qwen tower follows
the reference's `third_party_model/qwen_clip/qwen_clip.py`: per-head [q|k|v] packing of `in_proj`,
exact GELU, LayerNorm eps 1e-6, a positional table resized by bicubic interpolation (a fixed matrix,
see `bicubic_matrix`), and a resampler (one nn.MultiheadAttention of learned queries).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.config import VisionConfig

from .layers import ACT, constrain, embed, layer_norm, linear, param, sdpa

# -- fixed tables, computed once in numpy ------------------------------------------------------------


def _cubic_weights(t: float, A: float) -> list[float]:
    """The four taps of torch's bicubic kernel at fractional offset t (upsample_bicubic2d, A = -0.75)."""
    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@functools.lru_cache(maxsize=None)
def bicubic_matrix(src: int, tgt: int) -> np.ndarray:
    """(tgt, src) float64 matrix R with R @ x == F.interpolate(x, tgt, mode="bicubic", align_corners=False)
    along one axis: source index (i + 0.5) * src / tgt - 0.5, four taps clamped to the border. Exact for
    float64 inputs; torch's float32 kernel rounds its taps and sums to float32 (a few ulps)."""
    R = np.zeros((tgt, src), dtype=np.float64)
    for i in range(tgt):
        x = (i + 0.5) * src / tgt - 0.5
        x0 = math.floor(x)
        for j, w in enumerate(_cubic_weights(x - x0, -0.75)):
            R[i, min(max(x0 - 1 + j, 0), src - 1)] += w
    return R


@functools.lru_cache(maxsize=None)
def resize_matrix(src_len: int, tgt_len: int) -> np.ndarray:
    """(tgt_len, src_len) float32 matrix resizing a (side x side, C) table, rows row-major over the grid."""
    s, t = int(math.sqrt(src_len)), int(math.sqrt(tgt_len))
    R = bicubic_matrix(s, t)
    return np.kron(R, R).astype(np.float32)  # (t*t, s*s): out[(i, j)] = sum R[i, a] R[j, b] x[(a, b)]


def resize_abs_pos(pos: jax.Array, tgt_len: int) -> jax.Array:
    """The reference's `get_abs_pos`: (S*S, C) -> (T*T, C), T = isqrt(tgt_len); unchanged when S == T."""
    s, t = int(math.sqrt(pos.shape[0])), int(math.sqrt(tgt_len))
    if s == t:
        return pos
    return jnp.asarray(resize_matrix(pos.shape[0], tgt_len)) @ pos.astype(jnp.float32)  # (T*T, C)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D sin-cos table (grid*grid, dim), float32: [sin h | cos h | sin w | cos w] halves."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32) / (d / 2.0)
        omega = 1.0 / 10000**omega  # (d/2,)
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1).astype(np.float32)


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
    def __init__(self, width: int, mlp: int, rngs: nnx.Rngs):
        self.c_fc = linear(width, mlp, ("vis_embed", "vis_mlp"), rngs)
        self.c_proj = linear(mlp, width, ("vis_mlp", "vis_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(ACT["gelu"](self.c_fc(x)))


class VisualAttentionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        w = cfg.hidden_size
        self.ln_1 = layer_norm(w, cfg.layer_norm_eps, "vis_embed", rngs)
        self.ln_2 = layer_norm(w, cfg.layer_norm_eps, "vis_embed", rngs)
        self.attn = VisualAttention(w, cfg.num_attention_heads, rngs)
        self.mlp = QwenMLP(w, cfg.intermediate_size, rngs)

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


class Resampler(nnx.Module):
    """Learned queries (with 2-D sin-cos positions) cross-attending once to the ViT tokens."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        dim, grid = cfg.output_dim, int(math.sqrt(cfg.n_queries))
        self.pos_embed = param(jnp.asarray(sincos_2d(dim, grid)), (None, "embed"))
        self.query = param(jax.random.truncated_normal(rngs.params(), -2, 2, (cfg.n_queries, dim)) * 0.02,
                           (None, "embed"))
        self.kv_proj = linear(cfg.hidden_size, dim, ("vis_embed", "embed"), rngs, bias=False) \
            if cfg.hidden_size != dim else None
        self.attn = MultiheadAttention(dim, dim // 128, rngs)
        self.ln_q = layer_norm(dim, cfg.layer_norm_eps, "embed", rngs)
        self.ln_kv = layer_norm(dim, cfg.layer_norm_eps, "embed", rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        pos_k = resize_abs_pos(self.pos_embed[...], x.shape[1])  # (L, D)
        x = self.ln_kv(self.kv_proj(x) if self.kv_proj is not None else x)  # (N, L, D)
        q = self.ln_q(self.query[...]) + self.pos_embed[...]  # (Q, D)
        q = jnp.broadcast_to(q, (x.shape[0], *q.shape))  # (N, Q, D)
        return self.attn(q, x + pos_k, x)  # (N, Q, D)


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
