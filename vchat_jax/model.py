"""VisualChat in Flax NNX: the LLaMA decoder with MMCA, and the model that splices images into it.

Mirrors vchat_torch/model.py (itself the reference's `DeepSpeedViLModel` on transformers' LLaMA):
`vis_encoder` (frozen: its features are under stop_gradient), `projection`, `lang_embed` (a trained
copy of the decoder's embedding table that embeds every prompt token) and `lang_decoder` (LlamaForCausalLM:
`model.{embed_tokens, layers.N, norm}` and an `lm_head`, absent when `llm.tie_word_embeddings` makes the
logits `h @ embed_tokens.T`). The parameter tree mirrors the torch state dict; vchat/param_map.py names
every leaf. Decoder weights are drawn from normal(`llm.initializer_range`), as transformers' LLaMA.

The public API mirrors vchat_torch.VisualChat method for method (encode_images, plan, splice, decode,
forward / __call__, generate, save_pretrained, from_pretrained; VisualChatOutput; forward_planned):
docs/ARCHITECTURE.md lists it. Everything below `plan` is jit-able: a SplicePlan is a pytree here.

Order: RMSNorm, RoPE, attention, MLP, block, decoder, causal LM, the KV cache, the loss, VisualChat.
RMSNorm statistics, RoPE tables and the attention softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vchat.config import LLMConfig, ModelConfig
from vchat.splice import IGNORE_INDEX, SplicePlan, check_image_count, order_for, plan_splice

from .attention import attention
from .layers import ACT, constrain, embed, linear, param
from .projection import build_projection
from .vision import build_vision
from .xla import jit

# A plan (numpy arrays, or traced ones inside jit) passes through jax.jit like any pytree.
jax.tree_util.register_dataclass(SplicePlan, data_fields=[f.name for f in dataclasses.fields(SplicePlan)],
                                 meta_fields=[])


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
        q, kv, std = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.initializer_range
        self.q_proj = linear(c.hidden_size, q, ("embed", "heads"), rngs, bias=False, std=std)
        self.k_proj = linear(c.hidden_size, kv, ("embed", "kv_heads"), rngs, bias=False, std=std)
        self.v_proj = linear(c.hidden_size, kv, ("embed", "kv_heads"), rngs, bias=False, std=std)
        self.o_proj = linear(q, c.hidden_size, ("heads", "embed"), rngs, bias=False, std=std)

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
        y = attention(q, k, v, m_q, m_k, self.cfg.mmca, self.cfg.compat, offset, self.cfg.attention)
        y = y.transpose(0, 2, 1, 3).reshape(B, L, self.num_heads * hd)  # (B, L, H*hd)
        return self.o_proj(y), (k, v)


class LlamaMLP(nnx.Module):
    def __init__(self, c: LLMConfig, rngs: nnx.Rngs):
        D, F, std = c.hidden_size, c.intermediate_size, c.initializer_range
        self.gate_proj = linear(D, F, ("embed", "mlp"), rngs, bias=False, std=std)
        self.up_proj = linear(D, F, ("embed", "mlp"), rngs, bias=False, std=std)
        self.down_proj = linear(F, D, ("mlp", "embed"), rngs, bias=False, std=std)
        self.act = c.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(ACT[self.act](self.gate_proj(x)) * self.up_proj(x), ("act_batch", "act_len", "act_mlp"))
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
        self.embed_tokens = embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), rngs, std=c.initializer_range)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs) for _ in range(c.num_hidden_layers)])
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, h, position_ids, m_q, cache: list | None = None, m_k=None, index=None):
        """h: (B, L, D) input embeddings; position_ids, m_q: (B, L). Returns the normed hidden states
        (B, L, D) and the new cache (per layer (k, v), each (B, Hkv, Lmax, hd))."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.llm.head_dim, self.cfg.llm.rope_theta)
        new_cache = []
        for i, layer in enumerate(self.layers):
            h = constrain(h, ("act_batch", "act_len", "act_embed"))
            h, kv = layer(h, cos, sin, m_q, None if cache is None else cache[i], m_k, index)
            new_cache.append(kv)
        return self.norm(h), new_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        c = cfg.llm
        self.model = LlamaModel(cfg, rngs)
        self.tied = c.tie_word_embeddings
        if not self.tied:
            self.lm_head = linear(c.hidden_size, c.vocab_size, ("embed", "vocab"), rngs, bias=False,
                                  std=c.initializer_range)

    def __call__(self, h, position_ids, m_q, cache=None, m_k=None, index=None):
        h, new_cache = self.model(h, position_ids, m_q, cache, m_k, index)
        logits = self.model.embed_tokens.attend(h) if self.tied else self.lm_head(h)  # (B, L, V)
        return constrain(logits, ("act_batch", "act_len", "act_vocab")), new_cache


@struct.dataclass
class KVCache:
    """The decoder's preallocated cache: per layer (k, v), each (B, Hkv, capacity, hd); the modality of
    every slot (B, capacity), 0 where nothing is written yet; `index`, the number of slots written."""

    layers: list
    modality: jax.Array
    index: jax.Array  # int32 scalar: traced, so a decode step compiles once per capacity

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, capacity: int, dtype) -> "KVCache":
        c = config.llm
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        layers = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_hidden_layers)]
        return cls(layers, jnp.zeros((batch, capacity), jnp.int32), jnp.int32(0))

    @property
    def capacity(self) -> int:
        return self.modality.shape[1]

    def grow(self, capacity: int) -> "KVCache":
        """The same cache with room for `capacity` slots (never fewer than it has)."""
        extra = max(0, capacity - self.capacity)
        pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
        layers = [(jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in self.layers]
        return self.replace(layers=layers, modality=jnp.pad(self.modality, [(0, 0), (0, extra)]))


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


@struct.dataclass
class VisualChatOutput:
    loss: jax.Array | None  # scalar, when labels were given
    logits: jax.Array  # (B, L, V)
    modality: jax.Array  # (B, L): 0 padding, 1 text, 2 image
    labels: jax.Array  # (B, L) spliced labels


class VisualChat(nnx.Module):
    # The parts `save_pretrained(trainable_only=True)` writes (vchat_torch: the parameters with requires_grad);
    # a trainer that trains other parts sets this.
    trainable_parts: tuple[str, ...] = ("lang_embed", "projection")

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.vis_encoder = build_vision(config.vision, rngs)
        self.projection = build_projection(config, rngs)
        self.lang_decoder = LlamaForCausalLM(config, rngs)
        self.lang_embed = embed(config.llm.vocab_size, config.llm.hidden_size, ("vocab", "embed"), rngs)
        self.lang_embed.embedding[...] = self.lang_decoder.model.embed_tokens.embedding[...]

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

    # -- pieces (jit-able) -------------------------------------------------------------------------
    def encode_images(self, images: jax.Array) -> jax.Array:
        """(N, 3, H, W) pixels (cast to the model's dtype) -> (N, image_tokens, hidden) projected features."""
        feats = jax.lax.stop_gradient(self.vis_encoder(jnp.asarray(images, self.dtype)))  # the tower is frozen
        return self.projection(feats)

    def plan(self, input_ids, attention_mask=None, image_num=None, labels=None, pad_multiple: int = 8,
             positions: str = "arange", pad_side: str = "right") -> SplicePlan:
        """The splice plan (numpy) of a batch; image_num defaults to each row's count of <image> tokens."""
        cfg = self.config
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if image_num is None:
            image_num = (ids == cfg.image_token_id).sum(axis=1)
        return plan_splice(ids, mask, np.asarray(image_num), cfg.image_tokens, cfg.image_token_id, cfg.pad_token_id,
                           None if labels is None else np.asarray(labels), order=order_for(cfg.compat),
                           pad_multiple=pad_multiple, positions=positions, pad_side=pad_side)

    def splice(self, plan: SplicePlan, feats: jax.Array | None) -> jax.Array:
        """Embeddings (B, L, hidden): lang_embed for text and padding, image features at image slots."""
        h = self.lang_embed(jnp.asarray(plan.ids))  # (B, L, D)
        if feats is None or feats.shape[0] == 0:
            return h
        index = jnp.asarray(plan.image_index)
        flat = feats.reshape(-1, feats.shape[-1]).astype(h.dtype)  # (N * T, D)
        picked = jnp.take(flat, jnp.maximum(index, 0), axis=0)  # (B, L, D)
        return jnp.where((index >= 0)[..., None], picked, h)

    def decode(self, embeds, modality, position_ids, cache: KVCache | None = None,
               m_keys=None) -> tuple[jax.Array, KVCache | None]:
        """Run the decoder on embeddings (B, Lq, D) with the queries' modality and positions (B, Lq).
        Without a cache the queries are the keys and no cache is returned; with one, their keys and
        values are written at `cache.index` and every written slot is attended to. `m_keys`, the
        modality of every cache slot after this write (B, capacity), defaults to the cache's record.
        Returns logits (B, Lq, V) and the updated cache."""
        if cache is None:
            logits, _ = self.lang_decoder(embeds, position_ids, modality)
            return logits, None
        if m_keys is None:
            m_keys = jax.lax.dynamic_update_slice_in_dim(cache.modality, modality.astype(cache.modality.dtype),
                                                         cache.index, axis=1)
        logits, layers = self.lang_decoder(embeds, position_ids, modality, cache.layers, m_keys, cache.index)
        return logits, KVCache(layers, m_keys, cache.index + embeds.shape[1])

    # -- the model ---------------------------------------------------------------------------------
    def forward(self, images, input_ids, attention_mask=None, labels=None, image_num=None,
                pad_multiple: int = 8) -> VisualChatOutput:
        """images: (sum image_num, 3, H, W) in sample order, or None; input_ids, attention_mask, labels:
        (B, T). Returns the loss (when labels are given) and logits over the spliced sequence."""
        plan = self.plan(input_ids, attention_mask, image_num, labels, pad_multiple=pad_multiple)
        nimg = check_image_count(plan, 0 if images is None else int(np.shape(images)[0]), self.config.image_tokens)
        return _forward_jit(self, plan, jnp.asarray(images, self.dtype) if nimg else None, labels is not None)

    __call__ = forward

    # -- checkpoints and generation live beside the model --------------------------------------------
    def generate(self, images, input_ids, attention_mask=None, image_num=None, **kwargs):
        """See vchat_jax.generate.generate."""
        from .generate import generate

        return generate(self, images, input_ids, attention_mask=attention_mask, image_num=image_num, **kwargs)

    def save_pretrained(self, path: str, trainable_only: bool = False, extra_files: dict | None = None) -> None:
        """See vchat_jax.checkpoint.save_pretrained."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, trainable_only=trainable_only, extra_files=extra_files)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "VisualChat":
        """See vchat_jax.checkpoint.from_pretrained."""
        from .checkpoint import from_pretrained

        return from_pretrained(path, **kwargs)


def forward_planned(model: VisualChat, plan: SplicePlan, images, with_loss: bool = True) -> VisualChatOutput:
    """The forward pass of a planned batch (jit-able): images (N, 3, H, W) or None, features spliced by
    `plan`; the loss when `with_loss`. `VisualChat.forward` is `plan` then this; trainers call it directly."""
    feats = None if images is None or images.shape[0] == 0 else model.encode_images(images)
    logits, _ = model.decode(model.splice(plan, feats), jnp.asarray(plan.modality), jnp.asarray(plan.position_ids))
    labels = jnp.asarray(plan.labels)
    loss = visualchat_loss(logits, labels) if with_loss else None
    return VisualChatOutput(loss=loss, logits=logits, modality=jnp.asarray(plan.modality), labels=labels)


def _forward_jit(model: VisualChat, plan: SplicePlan, images, with_loss: bool) -> VisualChatOutput:
    graphdef, state = nnx.split(model)
    return _forward_split(graphdef, state, plan, images, with_loss)


@partial(jit, static_argnums=(0, 4))
def _forward_split(graphdef, state, plan: SplicePlan, images, with_loss: bool) -> VisualChatOutput:
    return forward_planned(nnx.merge(graphdef, state), plan, images, with_loss)
