import numpy as np
import pytest

from vchat import attention as A

SEVEN = [1, 1, 2, 2, 1, 2, 1]


def docstring_picture():
    lines = A.__doc__.split("image branch")[1].splitlines()[2:9]
    img = [ln.split()[1] for ln in lines]
    txt = [ln.split()[3] for ln in lines]
    return img, txt


def test_docstring_example_is_what_the_oracle_computes():
    img, txt = docstring_picture()
    assert A.render(SEVEN, compat="dsvc") == [img, txt]
    fixed_img, fixed_txt = A.render(SEVEN, compat="fixed")
    assert fixed_txt == txt and fixed_img[:2] == ["." * 7] * 2 and fixed_img[2:] == img[2:]


def literal_reference(scores, m, mmca):
    """The reference's arithmetic: finfo.min biases added in float32 (M + M overflows to -inf)."""
    M = np.finfo(np.float32).min
    L = len(m)
    causal = np.where(np.arange(L)[None, :] <= np.arange(L)[:, None], 0, M).astype(np.float32)
    mk = np.asarray(m)
    out = 0
    with np.errstate(over="ignore", invalid="ignore"):
        if not mmca:
            biases = [np.where(mk[None, :] > 0, 0, M).astype(np.float32) + causal]
        else:
            img = np.where(mk[None, :] == 2, 0, M).repeat(L, 0).astype(np.float32)
            for q in range(L):
                if mk[q] == 2:
                    img[q, :] = M
                    img[q, q] = 0
            txt = np.where(mk[None, :] == 1, 0, M).repeat(L, 0).astype(np.float32)
            biases = [img + causal, txt + causal]
        for b in biases:
            s = scores.astype(np.float32) + b
            s = s - s.max(-1, keepdims=True)
            e = np.exp(s)
            out = out + e / e.sum(-1, keepdims=True)
    return out


@pytest.mark.parametrize("mmca", [True, False])
@pytest.mark.parametrize("m", [SEVEN, [2, 2, 1, 1, 2, 0, 0], [1, 1, 1, 0], [1, 2, 1, 2, 2, 1, 0, 0]])
def test_dsvc_rule_equals_the_reference_float_arithmetic(m, mmca):
    rng = np.random.default_rng(0)
    L = len(m)
    scores = rng.normal(size=(L, L)) * 3
    mm = np.asarray(m)[None]
    ours = sum(A.branch_weights(scores[None, None], ko, c, "dsvc") for ko, c in A.branch_terms(mm, mm, mmca))[0, 0]
    np.testing.assert_allclose(ours, literal_reference(scores, m, mmca), atol=1e-6)


def test_hand_worked_values():
    # Two tokens, text then image; scores 0 everywhere so every softmax is a plain mean.
    m = np.array([[1, 2]])
    w = lambda compat: sum(A.branch_weights(np.zeros((1, 1, 2, 2)), k, c, compat)
                           for k, c in A.branch_terms(m, m, True))[0, 0]
    # q0 (text): image branch empty -> dsvc: mean over {0 (past non-image), 1 (future image)}; text: itself.
    np.testing.assert_allclose(w("dsvc"), [[1.5, 0.5], [1.0, 1.0]])
    np.testing.assert_allclose(w("fixed"), [[1.0, 0.0], [1.0, 1.0]])


def test_decode_row_is_the_last_prefill_row():
    rng = np.random.default_rng(1)
    m = np.array([[1, 2, 2, 1, 1, 2, 1]])
    q = rng.normal(size=(1, 2, 7, 4))
    k = rng.normal(size=(1, 1, 7, 4))  # GQA: one kv head for two query heads
    v = rng.normal(size=(1, 1, 7, 4))
    for compat in ("dsvc", "fixed"):
        full = A.attention(q, k, v, m, m, True, compat)
        last = A.attention(q[:, :, -1:], k, v, m[:, -1:], m, True, compat)
        np.testing.assert_allclose(last[:, :, 0], full[:, :, -1], atol=1e-12)
