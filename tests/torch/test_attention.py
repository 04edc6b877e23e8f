"""The torch MMCA kernel against the numpy oracle on random modality layouts."""

import types

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vchat import attention as oracle
from vchat_torch.attention import branch_terms, mmca_attention, prepare_branches


@st.composite
def layouts(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 20))
    rows = []
    for _ in range(B):
        kind = draw(st.sampled_from(["text", "image_first", "mixed", "images_then_text"]))
        n_pad = draw(st.integers(0, L - 1))
        n = L - n_pad
        if kind == "text":
            body = [1] * n
        elif kind == "image_first":
            body = [2] * draw(st.integers(1, n)) + [1] * n
        elif kind == "images_then_text":
            k = draw(st.integers(0, n))
            body = [1] * (n - k) + [2] * k
        else:
            body = draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n))
        body = body[:n]
        pad = [0] * n_pad
        rows.append(pad + body if draw(st.booleans()) else body + pad)
    return np.array(rows)


def run_both(m, Lq, mmca, compat, heads=4, kv_heads=2, seed=0):
    B, Lk = m.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, Lq, 8, generator=g) * 2
    k = torch.randn(B, kv_heads, Lk, 8, generator=g) * 2
    v = torch.randn(B, kv_heads, Lk, 8, generator=g)
    mt = torch.from_numpy(m)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    got, _ = mmca_attention(module, q, k, v, None, mmca_branches=prepare_branches(mt[:, Lk - Lq:], mt, mmca, compat))
    want = oracle.attention(q.numpy(), k.numpy(), v.numpy(), m[:, Lk - Lq:], m, mmca, compat)
    return got.transpose(1, 2).numpy(), want


@settings(max_examples=60, deadline=None)
@given(m=layouts(), mmca=st.booleans(), compat=st.sampled_from(["dsvc", "fixed"]), data=st.data())
def test_kernel_matches_oracle_prefill_and_decode(m, mmca, compat, data):
    L = m.shape[1]
    Lq = data.draw(st.sampled_from([L, 1, max(1, L // 2)]))  # prefill, one decode step, a chunk
    got, want = run_both(m, Lq, mmca, compat)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(m=layouts(), mmca=st.booleans())
def test_boolean_terms_mirror_the_oracle(m, mmca):
    mt = torch.from_numpy(m)
    for (ko, c), (ko_np, c_np) in zip(branch_terms(mt, mt, mmca), oracle.branch_terms(m, m, mmca)):
        np.testing.assert_array_equal(ko.numpy(), ko_np)
        np.testing.assert_array_equal(c.numpy(), c_np)


def test_fixed_mode_never_nan_and_dsvc_rows_weigh_two():
    m = np.array([[1, 1, 2, 2, 1, 0, 0]])
    got, _ = run_both(m, 7, True, "fixed")
    assert np.isfinite(got).all()
    mt = torch.from_numpy(m)
    q = torch.randn(1, 2, 7, 4)
    k = torch.randn(1, 2, 7, 4)
    module = types.SimpleNamespace(num_key_value_groups=1, training=False)
    _, w = mmca_attention(module, q, k, k, None, mmca_branches=prepare_branches(mt, mt, True, "dsvc"))
    np.testing.assert_allclose(w.sum(-1).numpy(), 2.0, atol=1e-6)
