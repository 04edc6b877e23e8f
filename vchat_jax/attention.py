"""Multi-Modal Causal Attention in JAX: the numpy oracle (`vchat/attention.py`) mirrored line for line.

reference/MMCA.md states the semantics. Masks stay boolean (True = may attend) until `branch_weights`,
the one place that turns them into softmax weights. The only generalisation over the oracle is
`q_offset`: the key index of the first query. The oracle puts the queries at the end of the keys
(`Lk - Lq`, the default here too); a decode step against a preallocated KV cache passes the current
write index instead, so cache slots not yet written fall outside the causal term.

A 7-token example with text before the first image, m = [1 1 2 2 1 2 1] (x = allowed, u = an empty
row's uniform set under "dsvc", . = weight 0)::

    image branch        text branch
      k 0123456           k 0123456
    q0  u.uu.u.         q0  x......
    q1  uuuu.u.         q1  xx.....
    q2  ..x....         q2  xx.....
    q3  ...x...         q3  xx.....
    q4  ..xx...         q4  xx..x..
    q5  .....x.         q5  xx..x..
    q6  ..xx.x.         q6  xx..x.x
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def branch_terms(m_q: jax.Array, m_k: jax.Array, mmca: bool, q_offset=None) -> list[tuple[jax.Array, jax.Array]]:
    """The (key_ok, causal) boolean pair of each branch, each (B, Lq, Lk).

    m_q: (B, Lq) modality of the queries; m_k: (B, Lk); q_offset: key index of query 0 (default
    Lk - Lq, may be traced). Plain causal attention has one branch; MMCA has two (image, text).
    """
    B, Lq = m_q.shape
    Lk = m_k.shape[1]
    qi = jnp.arange(Lq) + ((Lk - Lq) if q_offset is None else q_offset)  # (Lq,) key index of each query
    ki = jnp.arange(Lk)
    causal = jnp.broadcast_to(ki[None, None, :] <= qi[None, :, None], (B, Lq, Lk))
    if not mmca:
        return [(jnp.broadcast_to((m_k > 0)[:, None, :], (B, Lq, Lk)), causal)]
    img = jnp.broadcast_to((m_k == 2)[:, None, :], (B, Lq, Lk))
    img = jnp.where((m_q == 2)[:, :, None], ki[None, None, :] == qi[None, :, None], img)  # image rows: self only
    txt = jnp.broadcast_to((m_k == 1)[:, None, :], (B, Lq, Lk))
    return [(img, causal), (txt, causal)]


def branch_weights(scores: jax.Array, key_ok: jax.Array, causal: jax.Array, compat: str) -> jax.Array:
    """Attention weights of one branch. scores: (B, H, Lq, Lk) float32; terms: (B, Lq, Lk)."""
    allowed = (key_ok & causal)[:, None]  # (B, 1, Lq, Lk)
    s = jnp.where(allowed, scores, -jnp.inf)
    mx = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.where(allowed, jnp.exp(jnp.where(allowed, s - mx, 0.0)), 0.0)
    w = e / jnp.maximum(e.sum(-1, keepdims=True), jnp.finfo(e.dtype).tiny)
    empty = ~allowed.any(-1, keepdims=True)  # (B, 1, Lq, 1)
    if compat == "dsvc":
        uniform = (key_ok ^ causal)[:, None].astype(scores.dtype)  # entries that are exactly M
        fallback = uniform / jnp.maximum(uniform.sum(-1, keepdims=True), 1.0)
    elif compat == "fixed":
        fallback = jnp.zeros_like(w)
    else:
        raise ValueError(f"compat must be 'dsvc' or 'fixed', got {compat!r}")
    return jnp.where(empty, fallback, w)


def attention_weights(q, k, m_q, m_k, mmca: bool, compat: str, q_offset=None) -> jax.Array:
    """Summed branch weights (B, H, Lq, Lk) in float32. q: (B, H, Lq, D); k: (B, Hkv, Lk, D)."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    terms = branch_terms(m_q, m_k, mmca, q_offset)
    return sum(branch_weights(scores, ko, c, compat) for ko, c in terms)


def attention(q, k, v, m_q, m_k, mmca: bool, compat: str, q_offset=None) -> jax.Array:
    """Dense MMCA (or plain causal) attention: (B, H, Lq, D) in the dtype of v.

    Each branch's softmax runs in float32 and is cast back before the branches are summed, as in the
    reference.
    """
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    terms = branch_terms(m_q, m_k, mmca, q_offset)
    w = sum(branch_weights(scores, ko, c, compat).astype(v.dtype) for ko, c in terms)  # (B, H, Lq, Lk)
    return jnp.einsum("bhqk,bhkd->bhqd", w, v)


def repeat_kv(x: jax.Array, n: int) -> jax.Array:
    """(B, Hkv, L, D) -> (B, Hkv * n, L, D), each kv head repeated n times in place (GQA)."""
    return jnp.repeat(x, n, axis=1) if n > 1 else x
