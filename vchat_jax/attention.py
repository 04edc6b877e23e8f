"""Multi-Modal Causal Attention in JAX: the numpy oracle (`vchat/attention.py`) mirrored line for line,
and a blockwise kernel that computes the same thing in O(L x block) memory.

`attention(..., kind)` picks by `ModelConfig.attention`: "dense" is the oracle's mirror (one
(B, H, Lq, Lk) softmax per branch); every other choice ("auto", "sdpa", "flex": the names are the
torch kernels') runs `flash_attention`, a one-pass flash attention over key blocks with a running max
and sum per branch and a custom VJP that recomputes the tiles (see "the blockwise kernel" below).

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

import functools

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


def attention(q, k, v, m_q, m_k, mmca: bool, compat: str, q_offset=None, kind: str = "dense") -> jax.Array:
    """MMCA (or plain causal) attention: (B, H, Lq, D) in the dtype of v. q: (B, H, Lq, D); k, v:
    (B, Hkv, Lk, D). kind "dense" (the oracle's mirror) or any fast choice of `ModelConfig.attention`
    ("auto", "sdpa", "flex": the blockwise kernel, `flash_attention`)."""
    if kind != "dense":
        return flash_attention(q, k, v, m_q, m_k, mmca, compat, q_offset)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    terms = branch_terms(m_q, m_k, mmca, q_offset)
    # Each branch's softmax runs in float32 and is cast back before the branches are summed, as in the reference.
    w = sum(branch_weights(scores, ko, c, compat).astype(v.dtype) for ko, c in terms)  # (B, H, Lq, Lk)
    return jnp.einsum("bhqk,bhkd->bhqd", w, v)


def repeat_kv(x: jax.Array, n: int) -> jax.Array:
    """(B, Hkv, L, D) -> (B, Hkv * n, L, D), each kv head repeated n times in place (GQA)."""
    return jnp.repeat(x, n, axis=1) if n > 1 else x


# -- the blockwise kernel ----------------------------------------------------------------------------
# One pass over key blocks per query block, both MMCA branches at once: image and text keys are
# disjoint, so each score belongs to at most one branch (its key's modality); a running max and sum per
# branch rescale each branch's accumulator (flash attention). Masks are made inside each (query block,
# key block) tile from the modality ids and positions; key blocks past a query block's last query are
# skipped, and a key block without image keys skips the image branch (most blocks: images are a few
# hundred tokens). The custom VJP keeps only the inputs, each branch's output and log-sum-exp, and
# recomputes the tiles in the backward, where both branches share one pass (dO is the same for both):
# memory O(L x block), never (B, H, Lq, Lk). Block 256 measured fastest on CPU (2 threads) with XLA's own
# emitters (vchat_jax/xla.py): the training step at L = 1024 / 2048 took 1.26x / 1.40x the anchor's time,
# against 1.41x / 1.52x with block 128.

BLOCK = 256


def flash_attention(q, k, v, m_q, m_k, mmca: bool, compat: str, q_offset=None, block: int = BLOCK) -> jax.Array:
    """Blockwise MMCA, exact to the dense form: (B, H, Lq, D) in the dtype of v. Rows of a branch with
    no allowed key give 0 ("fixed") or the mean of V over the set X of MMCA.md ("dsvc", `empty_row_mean`)."""
    if compat not in ("dsvc", "fixed"):
        raise ValueError(f"compat must be 'dsvc' or 'fixed', got {compat!r}")
    B, H, Lq, D = q.shape
    n_rep = H // k.shape[1]
    Lk = k.shape[2]
    offset = jnp.asarray(Lk - Lq if q_offset is None else q_offset, jnp.int32)
    bq, bk = min(block, Lq), min(block, Lk)
    pad_q, pad_k = -Lq % bq, -Lk % bk  # padded keys have modality 0: no branch takes them
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, pad_q), (0, 0)))
    kp, vp = (jnp.pad(repeat_kv(x, n_rep), ((0, 0), (0, 0), (0, pad_k), (0, 0))) for x in (k, v))
    mq, mk = jnp.pad(m_q, ((0, 0), (0, pad_q))), jnp.pad(m_k, ((0, 0), (0, pad_k)))
    out = _flash(mmca, bq, bk, qp, kp, vp, mq, mk, offset)[:, :, :Lq]  # (B, H, Lq, D) float32
    if compat == "dsvc":
        key_ok = [m_k == 2, m_k == 1] if mmca else [m_k > 0]
        rows = [m_q != 2, None] if mmca else [None]
        for ok, r in zip(key_ok, rows):
            out = out + repeat_kv(empty_row_mean(v, ok, offset, Lq, r), n_rep)
    return out.astype(v.dtype)


def empty_row_mean(v, key_ok, offset, Lq: int, rows=None) -> jax.Array:
    """compat "dsvc": a branch's empty rows, (B, Hkv, Lq, D) float32, zero elsewhere. v: (B, Hkv, Lk, D);
    key_ok: (B, Lk) the branch's keys; rows: (B, Lq) the rows it applies to (default all). Row q (key
    index qi = offset + q) is empty when no key k <= qi is ok; it averages V over {k <= qi} + {k > qi, ok},
    by prefix sums."""
    Lk = v.shape[2]
    qi = jnp.minimum(jnp.arange(Lq) + offset, Lk - 1)  # (Lq,)
    empty = jnp.take(jnp.cumsum(key_ok, axis=-1), qi, axis=1) == 0  # (B, Lq)
    if rows is not None:
        empty &= rows
    vf = v.astype(jnp.float32)
    prefix = jnp.take(jnp.cumsum(vf, axis=2), qi, axis=2)  # (B, Hkv, Lq, D)
    total = jnp.einsum("bk,bhkd->bhd", key_ok.astype(jnp.float32), vf)[:, :, None]  # (B, Hkv, 1, D)
    count = (qi[None] + 1 + key_ok.sum(-1, keepdims=True)).astype(jnp.float32)  # (B, Lq) |X| of an empty row
    return jnp.where(empty[:, None, :, None], (prefix + total) / count[:, None, :, None], 0.0)


def _tile(mmca: bool, q, k, m_q, m_k, offset, i, j, bq: int, bk: int):
    """Query block i against key block j: scores (B, H, bq, bk) float32, -inf where no branch allows
    the key (the oracle's branch_terms, made from the tile's ids and positions), and each key's branch
    (B, 1, 1, bk), True = image: a key's branch is its modality's, whatever the query."""
    qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2)  # (B, H, bq, D)
    kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)  # (B, H, bk, D)
    s = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(q.shape[-1]))
    qi = (offset + i * bq + jnp.arange(bq))[:, None]  # (bq, 1) key index of each query
    ki = j * bk + jnp.arange(bk)[None, :]  # (1, bk)
    mq = jax.lax.dynamic_slice_in_dim(m_q, i * bq, bq, axis=1)[:, None, :, None]  # (B, 1, bq, 1)
    mk = jax.lax.dynamic_slice_in_dim(m_k, j * bk, bk, axis=1)[:, None, None, :]  # (B, 1, 1, bk)
    if mmca:  # text keys for every query; image keys for non-image queries, an image query only itself
        allowed = jnp.where(mq == 2, (ki == qi) | (mk == 1), mk > 0) & (ki <= qi)
    else:
        allowed = (mk > 0) & (ki <= qi)
    return jnp.where(allowed, s, -jnp.inf), mk == 2


def _pick(is_img, per_branch):
    """Each key's own branch's row value: per_branch (n, B, H, bq) -> (B, H, bq, bk)."""
    return jnp.where(is_img, per_branch[0][..., None], per_branch[-1][..., None])


def _key_blocks(offset, i, bq: int, bk: int, nk: int):
    """Key blocks that query block i can see: up to its last query."""
    return jnp.minimum((offset + (i + 1) * bq - 1) // bk + 1, nk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(mmca, bq, bk, q, k, v, m_q, m_k, offset):
    return _flash_fwd(mmca, bq, bk, q, k, v, m_q, m_k, offset)[0]


def _online(state, s, vb):
    """One key block into a branch's online softmax: state = (running max, sum (B, H, bq), P @ V
    (B, H, bq, D)); s (B, H, bq, bk), -inf where the branch does not allow the key."""
    m, l, acc = state
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)  # 0 while the row has seen no key of the branch
    pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv


def _both(states, s, is_img, vb):
    """A key block with image keys into both branches at once: one max per branch, one exp, and one
    matmul against [V of the image keys, V of the others]."""
    (m_i, l_i, a_i), (m_t, l_t, a_t) = states
    m_new = jnp.stack([jnp.maximum(m_i, jnp.where(is_img, s, -jnp.inf).max(-1)),
                       jnp.maximum(m_t, jnp.where(is_img, -jnp.inf, s).max(-1))])  # (2, B, H, bq)
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - _pick(is_img, m_safe))  # (B, H, bq, bk): each key against its own branch's max
    img = is_img[:, :, 0, :, None]  # (B, 1, bk, 1)
    vx = jnp.concatenate([jnp.where(img, vb, 0.0), jnp.where(img, 0.0, vb)], -1)  # (B, H, bk, 2D)
    pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vb.dtype), vx, preferred_element_type=jnp.float32)
    p_img = jnp.where(is_img, p, 0.0).sum(-1)
    alpha = jnp.exp(jnp.stack([m_i, m_t]) - m_safe)
    D = vb.shape[-1]
    return ((m_new[0], alpha[0] * l_i + p_img, alpha[0][..., None] * a_i + pv[..., :D]),
            (m_new[1], alpha[1] * l_t + p.sum(-1) - p_img, alpha[1][..., None] * a_t + pv[..., D:]))


def _flash_fwd(mmca, bq, bk, q, k, v, m_q, m_k, offset):
    B, H, Lq, D = q.shape
    nb, nq, nk = (2 if mmca else 1), Lq // bq, k.shape[2] // bk

    def q_block(i, carry):
        outs, lses = carry

        def k_block(j, states):
            s, is_img = _tile(mmca, q, k, m_q, m_k, offset, i, j, bq, bk)
            vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)  # (B, H, bk, D)
            if not mmca:
                return (_online(states[0], s, vb),)
            # most key blocks hold no image key: the image branch then skips them (block sparsity)
            return jax.lax.cond(is_img.any(), lambda st: _both(st, s, is_img, vb),
                                lambda st: (st[0], _online(st[1], s, vb)), states)

        init = (jnp.full((B, H, bq), -jnp.inf), jnp.zeros((B, H, bq)), jnp.zeros((B, H, bq, D)))
        states = jax.lax.fori_loop(0, _key_blocks(offset, i, bq, bk, nk), k_block, (init,) * nb)
        m, l, acc = (jnp.stack(x) for x in zip(*states))  # (n, B, H, bq), (n, B, H, bq), (n, B, H, bq, D)
        o = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
        return (jax.lax.dynamic_update_slice_in_dim(outs, o, i * bq, axis=3),
                jax.lax.dynamic_update_slice_in_dim(lses, lse, i * bq, axis=3))

    outs, lses = jax.lax.fori_loop(0, nq, q_block, (jnp.zeros((nb, B, H, Lq, D)), jnp.zeros((nb, B, H, Lq))))
    return outs.sum(0), (q, k, v, m_q, m_k, offset, outs, lses)


def _flash_bwd(mmca, bq, bk, res, d_out):
    q, k, v, m_q, m_k, offset, outs, lses = res
    nq, nk = q.shape[2] // bq, k.shape[2] // bk
    d_out = d_out.astype(jnp.float32)
    deltas = (outs * d_out[None]).sum(-1)  # (n, B, H, Lq): rowsum(dO * O) of each branch
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))

    def q_block(i, carry):
        dq, dk, dv = carry
        do = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=2).astype(v.dtype)  # (B, H, bq, D)
        lse = jax.lax.dynamic_slice_in_dim(lses, i * bq, bq, axis=3)  # (n, B, H, bq)
        delta = jax.lax.dynamic_slice_in_dim(deltas, i * bq, bq, axis=3)
        qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2)

        def k_block(j, c):
            dq_i, dk, dv = c
            s, is_img = _tile(mmca, q, k, m_q, m_k, offset, i, j, bq, bk)
            p = jnp.exp(s - _pick(is_img, lse))  # (B, H, bq, bk): both branches' weights
            kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
            dp = jnp.einsum("bhqd,bhkd->bhqk", do, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - _pick(is_img, delta)) * scale
            dq_i = dq_i + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
            dv_j = jnp.einsum("bhqk,bhqd->bhkd", p.astype(v.dtype), do, preferred_element_type=jnp.float32)
            return dq_i, _add_block(dk, dk_j, j * bk), _add_block(dv, dv_j, j * bk)

        dq_i, dk, dv = jax.lax.fori_loop(0, _key_blocks(offset, i, bq, bk, nk), k_block,
                                         (jnp.zeros(qb.shape, jnp.float32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=2), dk, dv

    dq, dk, dv = jax.lax.fori_loop(0, nq, q_block, tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


def _add_block(x, y, start):
    """x[:, :, start:start + len(y)] += y along axis 2."""
    return jax.lax.dynamic_update_slice_in_dim(x, jax.lax.dynamic_slice_in_dim(x, start, y.shape[2], axis=2) + y,
                                               start, axis=2)


_flash.defvjp(_flash_fwd, _flash_bwd)
