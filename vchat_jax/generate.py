"""Generation with a preallocated KV cache: batched (left-padded), greedy or sampled.

Mirrors vchat_torch/generate.py, which reproduces the reference's `generate` (transformers' generate
over the spliced prompt embeddings). The prompt is planned with no padding to 8, positions
`cumsum(mask > 0) - 1` and `pad_side="left"` (vchat/splice.py), so every row's last prompt token sits at
the same index. Step 0 runs the whole prompt (one jit-compiled prefill that writes the first L slots of a
`KVCache` of L + max_new_tokens); each later step feeds one token through a jit-compiled decode step whose
shapes never change (the write index is traced), so nothing recompiles per token. compat "dsvc" embeds
each generated token with the decoder's own `embed_tokens` (the reference's behaviour), "fixed" with
`lang_embed`, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.splice import SplicePlan, check_image_count

from .model import KVCache
from .xla import jit


@dataclass
class GenerateOutput:
    ids: np.ndarray  # (B, n) generated tokens (pad after EOS)
    step_logits: np.ndarray  # (B, n, V) last-position logits of every step
    cache: KVCache | None = None  # capacity L + max_new_tokens; L + n - 1 slots written
    modality: np.ndarray | None = None  # (B, L + n - 1) modality of every cached position


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


def sampling_key(seed: int | None) -> jax.Array:
    """The PRNG key of a `seed`; None draws a fresh seed (unseeded sampling, as torch's global generator)."""
    return jax.random.key(int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else seed)


@partial(jit, static_argnums=(0,), donate_argnums=(4,))
def prefill(graphdef, state, plan: SplicePlan, images, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Write a planned chunk (its images spliced in) at the cache's index; last-position logits (B, V)."""
    model = nnx.merge(graphdef, state)
    feats = None if images is None else model.encode_images(images)
    logits, cache = model.decode(model.splice(plan, feats), jnp.asarray(plan.modality),
                                 jnp.asarray(plan.position_ids), cache)
    return logits[:, -1], cache


@partial(jit, static_argnums=(0, 5), donate_argnums=(2,))
def decode_token(graphdef, state, cache: KVCache, tokens, positions, lang_embed: bool) -> tuple[jax.Array, KVCache]:
    """One text token per row (B,) at positions (B,), embedded with lang_embed (else the decoder's
    embed_tokens) and written at the cache's index. Returns logits (B, V) and the cache."""
    model = nnx.merge(graphdef, state)
    table = model.lang_embed if lang_embed else model.lang_decoder.model.embed_tokens
    logits, cache = model.decode(table(tokens[:, None]), jnp.ones_like(tokens)[:, None], positions[:, None], cache)
    return logits[:, -1], cache


def generate(model, images, input_ids, attention_mask=None, image_num=None, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, seed: int | None = None) -> GenerateOutput:
    """input_ids: (B, T) prompts, left-padded (attention_mask 0 on the padding); images: every image of
    the batch in sample order, or None; image_num: images per sample (default: each row's <image> count).
    Sampling draws from `seed` (None: unseeded). Stops when every row has produced EOS or after
    max_new_tokens."""
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    p = model.plan(input_ids, attention_mask, image_num, pad_multiple=1, positions="cumsum", pad_side="left")
    n_images = check_image_count(p, 0 if images is None else int(np.shape(images)[0]), cfg.image_tokens)
    B, L = p.shape
    graphdef, state = nnx.split(model)
    imgs = jnp.asarray(images, model.dtype) if n_images else None
    cache = KVCache.empty(cfg, B, L + max_new_tokens, model.dtype)
    logits, cache = prefill(graphdef, state, p, imgs, cache)
    pos = p.position_ids[:, -1] + 1  # (B,) position of the first generated token
    key = sampling_key(seed)
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
        tokens, positions = jnp.asarray(tok, jnp.int32), jnp.asarray(pos + t, jnp.int32)
        logits, cache = decode_token(graphdef, state, cache, tokens, positions, cfg.compat != "dsvc")
    n = len(out_ids)
    return GenerateOutput(ids=np.stack(out_ids, axis=1), step_logits=np.stack(out_logits, axis=1),
                          cache=cache, modality=np.asarray(cache.modality[:, :L + n - 1]))
