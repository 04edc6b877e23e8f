"""The fast torch MMCA kernels ("sdpa", "flex") against the dense spec on random modality layouts.

Outputs are checked against the numpy oracle (float64); gradients against the dense kernel run in
float64 (itself checked against the oracle in test_attention.py). Layouts: text first, image first,
several images, left and right padding, text-only rows, batch > 1, GQA; both compat modes, MMCA on and
off, prefill, one decode step and a few queries against the keys.
"""

import types

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from vchat import attention as oracle
from vchat_torch.attention import FastBranches, mmca_attention, prepare_branches


@st.composite
def layouts(draw, max_len=24):
    """(B, L) modality ids: each row runs of text (1) and image (2) tokens, padded (0) left or right."""
    B = draw(st.integers(1, 3))
    L = draw(st.integers(2, max_len))
    rows = []
    for _ in range(B):
        n = draw(st.integers(1, L))
        body = []
        kind = draw(st.sampled_from([1, 2]))
        while len(body) < n:
            body += [kind] * draw(st.integers(1, 6))
            kind = 3 - kind
        if draw(st.booleans()):
            body = [1] * n  # a text-only row
        body, pad = body[:n], [0] * (L - n)
        rows.append(pad + body if draw(st.booleans()) else body + pad)
    return np.array(rows)


def qkv(B, Lq, Lk, heads, kv_heads, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, kv_heads, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, kv_heads, Lk, D, generator=g, dtype=torch.float64)
    return q, k, v


def run(kind, m, Lq, mmca, compat, q, k, v):
    """Output (B, Lq, H, D) and the gradients of a fixed random projection of it w.r.t. q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    mt = torch.from_numpy(m)
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=True)
    branches = prepare_branches(mt[:, m.shape[1] - Lq:], mt, mmca, compat, kind)
    assert isinstance(branches, FastBranches) == (kind != "dense")
    out, weights = mmca_attention(module, q, k, v, None, mmca_branches=branches)
    assert (weights is None) == (kind != "dense")
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    (out * proj).sum().backward()
    return out.detach(), [x.grad for x in (q, k, v)]


def check(m, Lq, mmca, compat, heads=4, kv_heads=2, seed=0):
    B, Lk = m.shape
    q, k, v = qkv(B, Lq, Lk, heads, kv_heads, seed=seed)
    want = oracle.attention(q.numpy(), k.numpy(), v.numpy(), m[:, Lk - Lq:], m, mmca, compat)
    _, want_grads = run("dense", m, Lq, mmca, compat, q, k, v)
    got, grads = run("sdpa", m, Lq, mmca, compat, q.float(), k.float(), v.float())
    np.testing.assert_allclose(got.transpose(1, 2).numpy(), want, atol=1e-5, rtol=0)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-5, rtol=0)


TEXT_FIRST = np.array([[1, 1, 2, 2, 1, 2, 1]])  # the docstring's 7-token example
IMAGE_FIRST_PADDED = np.array([[2, 2, 1, 1, 2, 2, 1, 0, 0], [0, 0, 0, 1, 2, 2, 2, 1, 1]])


@settings(max_examples=80, deadline=None)
@given(m=layouts(), mmca=st.booleans(), compat=st.sampled_from(["dsvc", "fixed"]), gqa=st.booleans(),
       data=st.data())
@example(m=TEXT_FIRST, mmca=True, compat="dsvc", gqa=True, data=None)
@example(m=IMAGE_FIRST_PADDED, mmca=True, compat="dsvc", gqa=False, data=None)
@example(m=IMAGE_FIRST_PADDED, mmca=True, compat="fixed", gqa=True, data=None)
def test_sdpa_matches_oracle_prefill_and_decode(m, mmca, compat, gqa, data):
    L = m.shape[1]
    Lq = L if data is None else data.draw(st.sampled_from([L, 1, min(3, L)]))  # prefill, a step, a few
    if Lq < L:
        m = m.copy()
        m[:, L - Lq:] = np.where(m[:, L - Lq:] == 0, 1, m[:, L - Lq:])  # new tokens are not padding
    check(m, Lq, mmca, compat, heads=4, kv_heads=2 if gqa else 4)


def test_sdpa_stays_on_the_flash_kernel():
    """Forward and backward run the CPU flash kernel and its backward, never the math backend."""
    m = np.array([[1] * 40 + [2] * 17 + [1] * 30 + [2] * 17 + [1] * 24] * 2)
    q, k, v = (x.float() for x in qkv(2, m.shape[1], m.shape[1], 4, 2))
    with torch.profiler.profile() as prof:
        run("sdpa", m, m.shape[1], True, "dsvc", q, k, v)
    ops = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert not any("math" in op for op in ops), sorted(op for op in ops if "math" in op)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mmca,compat", [(True, "dsvc"), (True, "fixed"), (False, "dsvc")])
def test_sdpa_builds_no_lxl_tensor(mmca, compat):
    """Forward and backward at L = 512: no tensor as large as L x L (q, k, v are B*H*L*D = L*L/2)."""
    L = 512
    m = np.array([[0] * 8 + [1] * 100 + [2] * 64 + [1] * 150 + [2] * 64 + [1] * 126])
    q, k, v = (x.float() for x in qkv(1, L, L, 4, 4, D=64))
    with LargestTensor() as mode:
        run("sdpa", m, L, mmca, compat, q, k, v)
    assert mode.largest < L * L, mode.largest


def flex_or_skip():
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(2))
    except Exception as e:  # no C++ compiler: compiled FlexAttention cannot run on this CPU
        pytest.skip(f"torch.compile unavailable: {e}")


@pytest.mark.parametrize("mmca,compat", [(True, "dsvc"), (True, "fixed"), (False, "dsvc")])
def test_flex_forward_matches_oracle(mmca, compat):
    """FlexAttention's compiled forward (CPU inference; it trains on CUDA) with block masks made from
    the modality ids: a prefill over several 128-tiles and a decode step, GQA."""
    flex_or_skip()
    L = 300
    m = np.array([[1] * 90 + [2] * 70 + [1] * 60 + [2] * 50 + [1] * 30,
                  [0] * 20 + [2] * 150 + [1] * 100 + [2] * 30])
    for Lq in (L, 1):
        q, k, v = qkv(2, Lq, L, 4, 2, D=16)
        mt = torch.from_numpy(m)
        module = types.SimpleNamespace(num_key_value_groups=2, training=False)
        with torch.no_grad():
            got, w = mmca_attention(module, q.float(), k.float(), v.float(), None,
                                    mmca_branches=prepare_branches(mt[:, L - Lq:], mt, mmca, compat, "flex"))
        want = oracle.attention(q.numpy(), k.numpy(), v.numpy(), m[:, L - Lq:], m, mmca, compat)
        assert w is None
        np.testing.assert_allclose(got.transpose(1, 2).numpy(), want, atol=1e-5, rtol=0)


def test_auto_is_sdpa_on_cpu():
    m = torch.tensor([[1, 2, 1]])
    assert prepare_branches(m, m, True, "fixed", "auto").kind == "sdpa"
    with pytest.raises(ValueError, match="attention"):
        prepare_branches(m, m, True, "fixed", "fast")
