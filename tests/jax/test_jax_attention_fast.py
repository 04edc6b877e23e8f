"""The blockwise JAX MMCA kernel (`flash_attention`) against the dense spec on random modality layouts.

Outputs against the numpy oracle; gradients (its custom VJP) against autodiff of the dense mirror,
itself checked against the oracle in test_jax_attention.py. Layouts: text first, image first, several
images, left and right padding, text-only rows, batch > 1, GQA; both compat modes, MMCA on and off;
prefill over several blocks (and a padded last block), one decode step and a few queries against a
preallocated cache with unwritten slots.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vchat import attention as oracle
from vchat_jax import attention as jattn

B, H, HKV, L, D, EXTRA, BLOCK = 2, 4, 2, 21, 8, 6, 8  # fixed shapes: the compiled functions are reused

modes = st.sampled_from([(True, "dsvc"), (True, "fixed"), (False, "dsvc"), (False, "fixed")])
TEXT_FIRST = [[1, 1, 2, 2, 1, 2, 1] * 3, [1] * 16 + [0] * 5]  # the docstring's example; a text-only row
IMAGE_FIRST = [[2] * 9 + [1] * 4 + [2] * 5 + [1] * 3, [0] * 4 + [2] * 3 + [1] * 2 + [2] * 10 + [1] * 2]


@st.composite
def layouts(draw):
    """(B, L) modality ids: runs of text (1) and image (2) tokens, padded (0) left or right."""
    rows = []
    for _ in range(B):
        n = draw(st.integers(1, L))
        body, kind = [], draw(st.sampled_from([1, 2]))
        while len(body) < n:
            body += [kind] * draw(st.integers(1, 9))
            kind = 3 - kind
        body = [1] * n if draw(st.booleans()) else body[:n]  # some rows text only
        pad = [0] * (L - n)
        rows.append(pad + body if draw(st.booleans()) else body + pad)
    return rows


def _qkv(seed, Lk=L):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, D)).astype(np.float32) * 2
    k = rng.standard_normal((B, HKV, Lk, D)).astype(np.float32) * 2
    v = rng.standard_normal((B, HKV, Lk, D)).astype(np.float32)
    w = rng.standard_normal((B, H, L, D)).astype(np.float32)  # projects the output to a scalar loss
    return q, k, v, w


@functools.partial(jax.jit, static_argnames=("mmca", "compat", "kind"))
def _value_and_grads(q, k, v, w, m, mmca, compat, kind):
    def f(q, k, v):
        if kind == "dense":
            out = jattn.attention(q, k, v, m, m, mmca, compat)
        else:
            out = jattn.flash_attention(q, k, v, m, m, mmca, compat, block=BLOCK)
        return (out * w).sum(), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@settings(max_examples=60, deadline=None)
@given(m=layouts(), mode=modes, seed=st.integers(0, 2**16))
@example(m=TEXT_FIRST, mode=(True, "dsvc"), seed=0)
@example(m=TEXT_FIRST, mode=(True, "fixed"), seed=0)
@example(m=IMAGE_FIRST, mode=(True, "dsvc"), seed=1)
@example(m=IMAGE_FIRST, mode=(False, "dsvc"), seed=1)
def test_prefill_outputs_and_gradients_match(m, mode, seed):
    mmca, compat = mode
    m = np.asarray(m, dtype=np.int32)
    q, k, v, w = _qkv(seed)
    want = oracle.attention(q, k, v, m, m, mmca, compat)
    got, grads = _value_and_grads(q, k, v, w, m, mmca, compat, "flash")
    _, want_grads = _value_and_grads(q, k, v, w, m, mmca, compat, "dense")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    for g, wg in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(wg), atol=1e-5, rtol=0)


@functools.partial(jax.jit, static_argnames=("mmca", "compat"))
def _decode(q, k_cache, v_cache, m_q, m_cache, index, mmca, compat):
    return jattn.flash_attention(q, k_cache, v_cache, m_q, m_cache, mmca, compat, q_offset=index, block=BLOCK)


@settings(max_examples=40, deadline=None)
@given(m=layouts(), mode=modes, seed=st.integers(0, 2**16), n=st.integers(3, L), lq=st.sampled_from([1, 3]))
@example(m=TEXT_FIRST, mode=(True, "dsvc"), seed=0, n=L, lq=1)
@example(m=IMAGE_FIRST, mode=(True, "dsvc"), seed=2, n=4, lq=3)
def test_decode_matches_oracle(m, mode, seed, n, lq):
    """lq new text queries written at cache slots n - lq .. n - 1; slots n.. unwritten (modality 0,
    garbage values): the oracle on the first n keys."""
    mmca, compat = mode
    m = np.asarray(m, dtype=np.int32)
    m[:, n - lq:n] = 1  # generated tokens are text
    q, k, v, _ = _qkv(seed, Lk=L + EXTRA)
    k[:, :, n:] *= 100  # garbage in the unwritten slots
    v[:, :, n:] *= 100
    want = oracle.attention(q[:, :, n - lq:n], k[:, :, :n], v[:, :, :n], m[:, n - lq:n], m[:, :n], mmca, compat)
    m_cache = np.zeros((B, L + EXTRA), np.int32)
    m_cache[:, :n] = m[:, :n]
    got = _decode(q[:, :, n - lq:n], k, v, m[:, n - lq:n], m_cache, jnp.int32(n - lq), mmca, compat)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_model_attention_dispatches_on_the_config_choice():
    m = jnp.asarray(IMAGE_FIRST, jnp.int32)
    q, k, v, _ = _qkv(5)
    want = jattn.attention(q, k, v, m, m, True, "dsvc")
    for kind in ("auto", "sdpa", "flex"):
        np.testing.assert_allclose(np.asarray(jattn.attention(q, k, v, m, m, True, "dsvc", kind=kind)),
                                   np.asarray(want), atol=1e-5, rtol=0)


def test_no_l_by_l_buffer_in_forward_or_backward():
    """The compiled gradient at L = 512, block 64, holds no array with two axes of length >= L."""
    Lb = 512
    m = jnp.asarray(np.array([[1] * 100 + [2] * 64 + [1] * 200 + [2] * 64 + [1] * 84] * 2), jnp.int32)
    x = jnp.zeros((2, 4, Lb, 16))

    def loss(q, k, v):
        return jattn.flash_attention(q, k, v, m, m, True, "dsvc", block=64).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
    shapes = [[int(d) for d in s.split(",") if d] for s in re.findall(r"\[([\d,]*)\]", hlo)]
    assert shapes and not [s for s in shapes if sum(d >= Lb for d in s) >= 2]
    dense = jax.jit(jax.grad(lambda q, k, v: jattn.attention(q, k, v, m, m, True, "dsvc").sum(),
                             argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
    assert f"[2,4,{Lb},{Lb}]" in dense  # the check sees an L x L buffer where there is one
