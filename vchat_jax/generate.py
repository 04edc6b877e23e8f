"""Generation with a preallocated KV cache: batched (left-padded), greedy or sampled.

Mirrors vchat_torch/generate.py, which reproduces the reference's `generate` (transformers' generate
over the spliced prompt embeddings). The prompt is spliced with no padding to 8 and positions
`cumsum(mask > 0) - 1`; a batch of spliced prompts is re-aligned to the right (left padding), so every
row's last prompt token sits at the same index. Step 0 runs the whole prompt (one jit-compiled prefill
whose keys and values fill the first L slots of a cache of L + max_new_tokens); each later step feeds
one token through a jit-compiled decode step whose shapes never change (the write index is traced),
so nothing recompiles per token. compat "dsvc" embeds each generated token with the decoder's own
`embed_tokens` (the reference's behaviour), "fixed" with `lang_embed`, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.splice import SplicePlan, positions_from_modality


@dataclass
class GenerateOutput:
    ids: np.ndarray  # (B, n) generated tokens (pad after EOS)
    step_logits: np.ndarray  # (B, n, V) last-position logits of every step
    cache: object = None  # per layer (k, v), each (B, Hkv, L + max_new_tokens, hd)
    modality: np.ndarray | None = None  # (B, L + n - 1) modality of every cached position


def right_align(p: SplicePlan, pad_id: int) -> SplicePlan:
    """Shift each row of a right-padded plan so that its last token sits at index L - 1."""
    L = p.shape[1]

    def roll(a, fill):
        out = np.full_like(a, fill)
        for b, n in enumerate(p.lengths):
            out[b, L - n:] = a[b, :n]
        return out

    mod = roll(p.modality, 0)
    return SplicePlan(ids=roll(p.ids, pad_id), image_index=roll(p.image_index, -1),
                      modality=mod, labels=roll(p.labels, -100), position_ids=positions_from_modality(mod),
                      lengths=p.lengths)


def pick_next(logits: jax.Array, key, do_sample: bool, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """(B, V) -> (B,) next tokens: argmax, or a sample after temperature, top-k and top-p."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)  # sorted, descending
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs > top_p  # keep the smallest prefix reaching top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@partial(jax.jit, static_argnums=(0, 7))
def _prefill(graphdef, state, images, ids, image_index, modality, position_ids, cache_len: int):
    """Run the prompt; return last-position logits (B, V) and the cache padded to cache_len slots."""
    model = nnx.merge(graphdef, state)
    h = model.splice(images, ids, image_index)
    logits, kv = model.lang_decoder(h, position_ids, modality)
    pad = [(0, 0), (0, 0), (0, cache_len - ids.shape[1]), (0, 0)]
    cache = [(jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in kv]
    return logits[:, -1], cache


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(graphdef, state, cache, modality, tokens, index, positions):
    """One token per row (B,) at cache slot `index` with positions (B,). Returns logits (B, V), cache, modality."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    table = model.lang_decoder.model.embed_tokens if cfg.compat == "dsvc" else model.lang_embed
    h = table(tokens[:, None])  # (B, 1, D)
    modality = jax.lax.dynamic_update_slice_in_dim(modality, jnp.ones_like(modality[:, :1]), index, axis=1)
    m_q = jax.lax.dynamic_slice_in_dim(modality, index, 1, axis=1)  # (B, 1)
    logits, cache = model.lang_decoder(h, positions[:, None], m_q, cache, modality, index)
    return logits[:, -1], cache, modality


def generate(model, images, input_ids, attention_mask=None, image_num=None, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, seed: int = 0) -> GenerateOutput:
    """input_ids: (B, T) prompts, left-padded (attention_mask 0 on the padding); images: every image of
    the batch in sample order; image_num: images per sample (all images in one sample for B == 1).
    Stops when every row has produced EOS or after max_new_tokens."""
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = np.asarray(input_ids)
    B = ids.shape[0]
    n_images = 0 if images is None else int(np.shape(images)[0])
    if image_num is None:
        if B != 1 and n_images:
            raise ValueError("image_num is required for a batch of several prompts")
        image_num = [n_images]
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    p = right_align(model.plan(ids, attention_mask, image_num, pad_multiple=1, positions="cumsum"), cfg.pad_token_id)
    L = p.shape[1]
    graphdef, state = nnx.split(model)
    imgs = None if n_images == 0 else jnp.asarray(images, model.dtype)
    logits, cache = _prefill(graphdef, state, imgs, jnp.asarray(p.ids), jnp.asarray(p.image_index),
                             jnp.asarray(p.modality), jnp.asarray(p.position_ids), L + max_new_tokens)
    modality = jnp.zeros((B, L + max_new_tokens), jnp.int32).at[:, :L].set(jnp.asarray(p.modality, jnp.int32))
    pos = jnp.asarray(p.position_ids[:, -1] + 1)  # (B,) position of the first generated token
    key = jax.random.key(seed)
    done = np.zeros(B, dtype=bool)
    out_ids, out_logits = [], []
    for t in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = np.asarray(pick_next(logits, sub, do_sample, temperature, top_k, top_p)).astype(np.int64)
        tok = np.where(done, cfg.pad_token_id, tok)
        out_ids.append(tok)
        out_logits.append(np.asarray(logits, dtype=np.float32))
        done |= tok == eos
        if done.all() or t == max_new_tokens - 1:
            break
        logits, cache, modality = _decode(graphdef, state, cache, modality, jnp.asarray(tok, jnp.int32),
                                          jnp.int32(L + t), pos + t)
    n = len(out_ids)
    return GenerateOutput(ids=np.stack(out_ids, axis=1), step_logits=np.stack(out_logits, axis=1),
                          cache=cache, modality=np.asarray(modality[:, :L + n - 1]))
