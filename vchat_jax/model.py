"""VisualChat in Flax NNX: the LLaMA decoder with MMCA, and the model that splices images into it.

Mirrors vchat_torch/model.py (itself the reference's `DeepSpeedViLModel` on transformers' LLaMA):
`vis_encoder` (frozen: its features are under stop_gradient), `projection`, `lang_embed` (a trained
copy of the decoder's embedding table that embeds every prompt token) and `lang_decoder` (LlamaForCausalLM:
`model.{embed_tokens, layers.N, norm}` and an untied `lm_head`). The parameter tree mirrors the torch
state dict; convert/param_map.py names every leaf.

Order: RMSNorm, RoPE, attention, MLP, block, decoder, causal LM, the loss, VisualChat.
RMSNorm statistics, RoPE tables and the attention softmax run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.config import LLMConfig, ModelConfig
from vchat.splice import IGNORE_INDEX, SplicePlan, order_for, plan_splice

from .attention import attention
from .layers import constrain, embed, linear, param
from .projection import build_projection
from .vision import build_vision

KVCache = list  # per layer: (k, v), each (B, Hkv, Lmax, hd)


class LlamaRMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = param(jnp.ones((dim,), jnp.float32), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, 1, L, hd) in float32 for integer positions (B, L): angles pos * inv_freq, halves doubled."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # (B, L, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None]  # (B, 1, L, hd)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        c = cfg.llm
        self.cfg = cfg
        self.num_heads, self.num_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = linear(c.hidden_size, c.num_attention_heads * c.head_dim, ("embed", "heads"), rngs, bias=False)
        self.k_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), rngs, bias=False)
        self.v_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), rngs, bias=False)
        self.o_proj = linear(c.num_attention_heads * c.head_dim, c.hidden_size, ("heads", "embed"), rngs, bias=False)

    def __call__(self, x, cos, sin, m_q, cache=None, m_k=None, index=None):
        """x: (B, L, D). Prefill (cache None): keys are x itself, m_k = m_q. Decode: write k, v at
        `index` of the cache (B, Hkv, Lmax, hd) and attend to it, modality m_k (B, Lmax).
        Returns (B, L, D) and the layer's (k, v)."""
        B, L, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).reshape(B, L, self.num_heads, hd).transpose(0, 2, 1, 3)  # (B, H, L, hd)
        k = self.k_proj(x).reshape(B, L, self.num_kv, hd).transpose(0, 2, 1, 3)  # (B, Hkv, L, hd)
        v = self.v_proj(x).reshape(B, L, self.num_kv, hd).transpose(0, 2, 1, 3)  # (B, Hkv, L, hd)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q = constrain(q, ("act_batch", "act_heads", "act_len", None))
        k = constrain(k, ("act_batch", "act_kv_heads", "act_len", None))
        v = constrain(v, ("act_batch", "act_kv_heads", "act_len", None))
        if cache is None:
            m_k, offset = m_q, None
        else:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=2)
            offset = index
        y = attention(q, k, v, m_q, m_k, self.cfg.mmca, self.cfg.compat, q_offset=offset)  # (B, H, L, hd)
        y = y.transpose(0, 2, 1, 3).reshape(B, L, self.num_heads * hd)  # (B, L, H*hd)
        return self.o_proj(y), (k, v)


class LlamaMLP(nnx.Module):
    def __init__(self, c: LLMConfig, rngs: nnx.Rngs):
        self.gate_proj = linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs, bias=False)
        self.up_proj = linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), rngs, bias=False)
        self.down_proj = linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), rngs, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("act_batch", "act_len", "act_mlp"))
        return self.down_proj(h)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(cfg, rngs)
        self.mlp = LlamaMLP(cfg.llm, rngs)
        self.input_layernorm = LlamaRMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)

    def __call__(self, x, cos, sin, m_q, cache=None, m_k=None, index=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, m_q, cache, m_k, index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        c = cfg.llm
        self.cfg = cfg
        self.embed_tokens = embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs) for _ in range(c.num_hidden_layers)])
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, h, position_ids, m_q, cache: KVCache | None = None, m_k=None, index=None):
        """h: (B, L, D) input embeddings; position_ids, m_q: (B, L). Returns the normed hidden states
        (B, L, D) and the new cache (per layer (k, v))."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.llm.head_dim, self.cfg.llm.rope_theta)
        new_cache = []
        for i, layer in enumerate(self.layers):
            h = constrain(h, ("act_batch", "act_len", "act_embed"))
            h, kv = layer(h, cos, sin, m_q, None if cache is None else cache[i], m_k, index)
            new_cache.append(kv)
        return self.norm(h), new_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.model = LlamaModel(cfg, rngs)
        self.lm_head = linear(cfg.llm.hidden_size, cfg.llm.vocab_size, ("embed", "vocab"), rngs, bias=False)

    def __call__(self, h, position_ids, m_q, cache=None, m_k=None, index=None):
        h, new_cache = self.model(h, position_ids, m_q, cache, m_k, index)
        return constrain(self.lm_head(h), ("act_batch", "act_len", "act_vocab")), new_cache  # (B, L, V)


def visualchat_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:], averaged over every supervised token of
    the batch. With none, the reference falls back on the last two positions of the flattened batch,
    whose labels are then ignored too: the loss is 0/0 = NaN, as in the reference and vchat_torch."""
    V = logits.shape[-1]
    lg = logits[:, :-1].reshape(-1, V).astype(jnp.float32)  # (N, V)
    lb = labels[:, 1:].reshape(-1)  # (N,)
    keep = lb != IGNORE_INDEX
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, lb, 0)[:, None], axis=-1)[:, 0]  # (N,)
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.sum(keep)


class VisualChat(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.vis_encoder = build_vision(config.vision, rngs)
        self.projection = build_projection(config, rngs)
        self.lang_decoder = LlamaForCausalLM(config, rngs)
        self.lang_embed = embed(config.llm.vocab_size, config.llm.hidden_size, ("vocab", "embed"), rngs)
        self.lang_embed.embedding[...] = self.lang_decoder.model.embed_tokens.embedding[...]

    # -- pure array code (jit-able) ----------------------------------------------------------------
    def encode_images(self, images: jax.Array) -> jax.Array:
        """(N, C, H, W) -> projected image tokens (N, image_tokens, hidden)."""
        feats = jax.lax.stop_gradient(self.vis_encoder(images))  # the tower is frozen, as in the reference
        return self.projection(feats)

    def splice(self, images, ids, image_index) -> jax.Array:
        """The decoder's input embeddings (B, L, D): projected image tokens at image slots, lang_embed elsewhere."""
        h = self.lang_embed(ids)  # (B, L, D)
        if images is None or images.shape[0] == 0:
            return h
        feats = self.encode_images(images)
        flat = feats.reshape(-1, feats.shape[-1]).astype(h.dtype)  # (N * T, D)
        img = jnp.take(flat, jnp.maximum(image_index, 0), axis=0)  # (B, L, D)
        return jnp.where((image_index >= 0)[..., None], img, h)

    def forward_spliced(self, images, ids, image_index, modality, position_ids, labels=None):
        """Loss (or None) and logits (B, L, V) for a planned batch (vchat/splice.py)."""
        h = self.splice(images, ids, image_index)
        logits, _ = self.lang_decoder(h, position_ids, modality)
        loss = visualchat_loss(logits, labels) if labels is not None else None
        return loss, logits

    # -- numpy front end ---------------------------------------------------------------------------
    def plan(self, input_ids, attention_mask, image_num, labels=None, pad_multiple: int = 8,
             positions: str = "arange") -> SplicePlan:
        cfg = self.config
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if image_num is None:
            image_num = [int((row == cfg.image_token_id).sum()) for row in ids]
        return plan_splice(ids, mask, image_num, cfg.image_tokens, cfg.image_token_id, cfg.pad_token_id,
                           labels=None if labels is None else np.asarray(labels), order=order_for(cfg.compat),
                           pad_multiple=pad_multiple, positions=positions)

    @property
    def dtype(self):
        """The parameters' dtype (that of lang_embed): the dtype the model computes in."""
        return self.lang_embed.embedding[...].dtype

    def astype(self, dtype) -> "VisualChat":
        """Cast every parameter to `dtype` (e.g. jnp.bfloat16) in place and return the model. The
        computation follows: matmuls in `dtype`; RMSNorm statistics, RoPE tables and softmax in
        float32 (DESIGN.md's numerics contract), as vchat_torch's model after `.to(dtype)`."""
        state = nnx.state(self, nnx.Param)
        nnx.update(self, jax.tree.map(lambda x: x.astype(dtype), state))
        for _, module in nnx.iter_modules(self):  # flax's layers (Linear, Embed, Conv, ...) carry their own dtype
            if module is not self and getattr(module, "dtype", None) is not None:
                module.dtype = dtype
        return self

    def __call__(self, images, input_ids, attention_mask=None, labels=None, image_num=None):
        """images: (N, C, H, W), every image of the batch in sample order; input_ids, attention_mask,
        labels: (B, T); image_num: images per sample. Returns (loss or None, logits (B, L, V)) over the
        spliced sequence, right-padded to a multiple of 8 (the plan is `self.plan(...)`)."""
        p = self.plan(input_ids, attention_mask, image_num, labels)
        imgs = None if images is None or np.shape(images)[0] == 0 else jnp.asarray(images, self.dtype)
        lab = None if labels is None else jnp.asarray(p.labels)
        return _forward_jit(self, imgs, jnp.asarray(p.ids), jnp.asarray(p.image_index), jnp.asarray(p.modality),
                            jnp.asarray(p.position_ids), lab)

    def generate(self, images, input_ids, attention_mask=None, image_num=None, **kw):
        """See vchat_jax.generate.generate."""
        from .generate import generate

        return generate(self, images, input_ids, attention_mask=attention_mask, image_num=image_num, **kw)

    def save_pretrained(self, path: str, extra_files: dict | None = None) -> None:
        """See vchat_jax.checkpoint.save_pretrained."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, extra_files=extra_files)

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "VisualChat":
        """See vchat_jax.checkpoint.from_pretrained."""
        from .checkpoint import from_pretrained

        return from_pretrained(path, **kw)


@nnx.jit
def _forward_jit(model: VisualChat, images, ids, image_index, modality, position_ids, labels):
    return model.forward_spliced(images, ids, image_index, modality, position_ids, labels)
