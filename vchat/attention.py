"""Multi-Modal Causal Attention, the executable spec: dense numpy, slow, obviously correct.

This is the oracle both frameworks are tested against (reference/MMCA.md states the semantics).
Every position k carries a modality m[k]: 0 padding, 1 text, 2 image. Attention is computed per
*branch*; each branch is two boolean terms over (query q, key k):

- `key_ok[q, k]`: the key's modality is right for the branch (plain causal: m[k] > 0; MMCA image
  branch: m[k] == 2, except that an image query sees only itself, key_ok[q, k] = (k == q); MMCA text
  branch: m[k] == 1);
- `causal[q, k]`: k <= q, with queries at the end of the keys (a KV-cache decode step is the last
  row of a prefill).

A key is allowed where both terms hold; the branch's softmax runs over allowed keys and the branch
outputs are summed (two softmaxes, no renormalisation: MMCA rows weigh 2). The reference adds the
terms as `finfo.min` biases, so a row with no allowed key does not vanish: its entries are M (one
term fails) or M + M = -inf (both fail), and the softmax spreads the row evenly over the M entries.
compat "dsvc" reproduces that empty-row rule; compat "fixed" makes an empty row contribute zero.

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

Text tokens before the first image average, under "dsvc", all earlier positions and every later
image token; under "fixed" their image branch is zero. Image tokens see themselves and earlier text.
"""

from __future__ import annotations

import numpy as np


def branch_terms(m_q: np.ndarray, m_k: np.ndarray, mmca: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (key_ok, causal) boolean pair of each branch, each (B, Lq, Lk).

    m_q: (B, Lq) modality of the queries, which are the last Lq of the Lk keys; m_k: (B, Lk).
    Plain causal attention has one branch; MMCA has two (image, text).
    """
    B, Lq = m_q.shape
    Lk = m_k.shape[1]
    qi = np.arange(Lq) + (Lk - Lq)  # (Lq,) key index of each query
    ki = np.arange(Lk)
    causal = np.broadcast_to(ki[None, None, :] <= qi[None, :, None], (B, Lq, Lk))
    if not mmca:
        return [(np.broadcast_to((m_k > 0)[:, None, :], (B, Lq, Lk)), causal)]
    img = np.broadcast_to((m_k == 2)[:, None, :], (B, Lq, Lk))
    img = np.where((m_q == 2)[:, :, None], ki[None, None, :] == qi[None, :, None], img)  # image rows: self only
    txt = np.broadcast_to((m_k == 1)[:, None, :], (B, Lq, Lk))
    return [(img, causal), (txt, causal)]


def branch_weights(scores: np.ndarray, key_ok: np.ndarray, causal: np.ndarray, compat: str) -> np.ndarray:
    """Attention weights of one branch. scores: (B, H, Lq, Lk); terms: (B, Lq, Lk)."""
    allowed = (key_ok & causal)[:, None]  # (B, 1, Lq, Lk)
    s = np.where(allowed, scores, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(allowed, np.exp(s - mx), 0.0)
    w = e / np.maximum(e.sum(-1, keepdims=True), np.finfo(e.dtype).tiny)
    empty = ~allowed.any(-1, keepdims=True)  # (B, 1, Lq, 1)
    if compat == "dsvc":
        uniform = (key_ok ^ causal)[:, None].astype(scores.dtype)  # entries that are exactly M
        fallback = uniform / np.maximum(uniform.sum(-1, keepdims=True), 1.0)
    elif compat == "fixed":
        fallback = np.zeros_like(w)
    else:
        raise ValueError(f"compat must be 'dsvc' or 'fixed', got {compat!r}")
    return np.where(empty, fallback, w)


def attention_weights(q, k, m_q, m_k, mmca: bool, compat: str) -> np.ndarray:
    """Summed branch weights (B, H, Lq, Lk). q: (B, H, Lq, D); k: (B, Hkv, Lk, D) (GQA repeats k)."""
    q = np.asarray(q, dtype=np.float64)
    k = repeat_kv(np.asarray(k, dtype=np.float64), q.shape[1] // k.shape[1])
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    return sum(branch_weights(scores, ko, c, compat) for ko, c in branch_terms(m_q, m_k, mmca))


def attention(q, k, v, m_q, m_k, mmca: bool, compat: str) -> np.ndarray:
    """Dense MMCA (or plain causal) attention in float64: (B, H, Lq, D)."""
    w = attention_weights(q, k, m_q, m_k, mmca, compat)
    v = repeat_kv(np.asarray(v, dtype=np.float64), w.shape[1] // v.shape[1])
    return w @ v


def repeat_kv(x: np.ndarray, n: int) -> np.ndarray:
    """(B, Hkv, L, D) -> (B, Hkv * n, L, D), each kv head repeated n times in place (GQA)."""
    return np.repeat(x, n, axis=1) if n > 1 else x


def render(m: list[int] | np.ndarray, mmca: bool = True, compat: str = "dsvc") -> list[list[str]]:
    """The docstring's picture for one sequence: per branch, one string per query row."""
    m = np.asarray(m)[None]
    pics = []
    for key_ok, causal in branch_terms(m, m, mmca):
        allowed = (key_ok & causal)[0]
        uniform = (key_ok ^ causal)[0]
        rows = []
        for q in range(m.shape[1]):
            if allowed[q].any():
                rows.append("".join("x" if a else "." for a in allowed[q]))
            elif compat == "dsvc":
                rows.append("".join("u" if u else "." for u in uniform[q]))
            else:
                rows.append("." * m.shape[1])
        pics.append(rows)
    return pics
