"""vchat_jax.attention against the numpy oracle (vchat/attention.py) on random modality layouts:
text-only, image-first, several images, padding, batch > 1, GQA, both compat modes, MMCA on and off,
prefill and a decode step against a preallocated cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vchat import attention as oracle
from vchat_jax import attention as jattn

B, H, HKV, L, D, EXTRA = 2, 4, 2, 12, 8, 5  # fixed shapes: every example reuses the compiled functions

layouts = st.lists(st.lists(st.sampled_from([0, 1, 2]), min_size=L, max_size=L), min_size=B, max_size=B)
modes = st.sampled_from([(True, "dsvc"), (True, "fixed"), (False, "dsvc"), (False, "fixed")])
TEXT_ONLY = [[1] * L, [1] * 9 + [0] * 3]
IMAGE_FIRST = [[2, 2, 2, 1, 1, 2, 2, 1, 1, 1, 0, 0], [1, 1, 2, 2, 1, 2, 2, 2, 1, 2, 2, 1]]


@functools.partial(jax.jit, static_argnames=("mmca", "compat"))
def _prefill(q, k, v, m, mmca, compat):
    return jattn.attention(q, k, v, m, m, mmca, compat)


@functools.partial(jax.jit, static_argnames=("mmca", "compat"))
def _decode(q, k_cache, v_cache, m_q, m_cache, index, mmca, compat):
    return jattn.attention(q, k_cache, v_cache, m_q, m_cache, mmca, compat, q_offset=index)


def _qkv(seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, L, D)).astype(np.float32)
    k = rng.standard_normal((B, HKV, L, D)).astype(np.float32)
    v = rng.standard_normal((B, HKV, L, D)).astype(np.float32)
    return q, k, v


@settings(max_examples=40, deadline=None)
@given(m=layouts, mode=modes, seed=st.integers(0, 2**16))
@example(m=TEXT_ONLY, mode=(True, "dsvc"), seed=0)
@example(m=TEXT_ONLY, mode=(True, "fixed"), seed=0)
@example(m=IMAGE_FIRST, mode=(True, "dsvc"), seed=1)
@example(m=IMAGE_FIRST, mode=(True, "fixed"), seed=1)
def test_prefill_matches_oracle(m, mode, seed):
    mmca, compat = mode
    m = np.asarray(m, dtype=np.int64)
    q, k, v = _qkv(seed)
    want = oracle.attention(q, k, v, m, m, mmca, compat)
    got = np.asarray(_prefill(q, k, v, m, mmca, compat))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(m=layouts, mode=modes, seed=st.integers(0, 2**16), n=st.integers(1, L))
@example(m=TEXT_ONLY, mode=(True, "dsvc"), seed=0, n=L)
@example(m=IMAGE_FIRST, mode=(True, "dsvc"), seed=2, n=4)
def test_decode_step_matches_oracle(m, mode, seed, n):
    """One query at cache index n - 1, slots n.. of the cache unwritten (modality 0, garbage values)."""
    mmca, compat = mode
    m = np.asarray(m, dtype=np.int64)
    m[:, n - 1] = 1  # a generated token is text
    q, k, v = _qkv(seed)
    want = oracle.attention(q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], m[:, n - 1:n], m[:, :n], mmca, compat)
    m_cache = np.zeros((B, L + EXTRA), np.int64)
    m_cache[:, :n] = m[:, :n]
    rng = np.random.default_rng(seed + 1)
    k_cache = rng.standard_normal((B, HKV, L + EXTRA, D)).astype(np.float32) * 100  # garbage beyond n
    v_cache = rng.standard_normal((B, HKV, L + EXTRA, D)).astype(np.float32) * 100
    k_cache[:, :, :n], v_cache[:, :, :n] = k[:, :, :n], v[:, :, :n]
    got = np.asarray(_decode(q[:, :, n - 1:n], k_cache, v_cache, m[:, n - 1:n], m_cache, jnp.int32(n - 1),
                             mmca, compat))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_docstring_picture():
    """The 7-token example of the docstrings: the nonzero weights are the x's (and u's under "dsvc")."""
    m = np.array([[1, 1, 2, 2, 1, 2, 1]])
    for compat in ("dsvc", "fixed"):
        pics = oracle.render(m[0], mmca=True, compat=compat)
        for (key_ok, causal), pic in zip(jattn.branch_terms(m, m, True), pics):
            scores = jnp.zeros((1, 1, 7, 7))
            w = np.asarray(jattn.branch_weights(scores, key_ok, causal, compat))[0, 0]
            drawn = np.array([[c != "." for c in row] for row in pic])
            np.testing.assert_array_equal(w > 0, drawn)


def test_fixed_mode_gradient_is_finite_on_empty_rows():
    m = jnp.asarray(IMAGE_FIRST)
    q, k, v = _qkv(3)

    def f(q, k, v):
        return jattn.attention(q, k, v, m, m, True, "fixed").sum()

    for g in jax.grad(f, argnums=(0, 1, 2))(q, k, v):
        assert np.isfinite(np.asarray(g)).all()
