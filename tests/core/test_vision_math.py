"""vchat/vision_math.py's fixed tables: the 2-D sin-cos table against hand-worked values, and the
bicubic matrix's rows (torch's F.interpolate comparisons: tests/torch/test_vision_resize.py and
tests/jax/test_jax_vision.py)."""

import math

import numpy as np

from vchat.vision_math import bicubic_matrix, resize_matrix, sincos_2d


def test_bicubic_rows_sum_to_one():
    for src, tgt in [(16, 4), (4, 16), (7, 5)]:
        np.testing.assert_allclose(bicubic_matrix(src, tgt).sum(1), 1.0, atol=1e-6)


def test_sincos_table():
    t = sincos_2d(8, 3)  # (9, 8): [sin x | cos x] over the column index, then [sin y | cos y] over the row
    assert t.shape == (9, 8) and t.dtype == np.float32
    col, row = np.tile(np.arange(3), 3), np.repeat(np.arange(3), 3)
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    np.testing.assert_allclose(t[:, 0:2], np.sin(col[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(t[:, 2:4], np.cos(col[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(t[:, 4:6], np.sin(row[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(t[:, 6:8], np.cos(row[:, None] * omega), atol=1e-6)


def test_sincos_table_by_hand():
    # dim 4: one frequency (w = 1); row i*2 + j of a 2 x 2 grid is [sin j, cos j, sin i, cos i]
    s1, c1 = math.sin(1.0), math.cos(1.0)
    want = [[0, 1, 0, 1],  # (0, 0)
            [s1, c1, 0, 1],  # (0, 1)
            [0, 1, s1, c1],  # (1, 0)
            [s1, c1, s1, c1]]  # (1, 1)
    np.testing.assert_allclose(sincos_2d(4, 2), want, atol=1e-7)
    # dim 8: frequencies 1 and 10000 ** -0.5 = 0.01; grid row 1, column 2 is position 1 * 3 + 2 = 5
    row = sincos_2d(8, 3)[5]
    np.testing.assert_allclose(row, [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
                                     math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)], atol=1e-7)


def test_bicubic_by_hand():
    # 2 -> 4, output 1: source x = 1.5 * 2 / 4 - 0.5 = 0.25, taps at -1, 0, 1, 2 clamped to 0, 0, 1, 1
    A, t = -0.75, 0.25
    far = lambda x: ((A * x - 5 * A) * x + 8 * A) * x - 4 * A  # noqa: E731
    near = lambda x: ((A + 2) * x - (A + 3)) * x * x + 1  # noqa: E731
    w = [far(1 + t), near(t), near(1 - t), far(2 - t)]
    np.testing.assert_allclose(bicubic_matrix(2, 4)[1], [w[0] + w[1], w[2] + w[3]], atol=1e-15)
    np.testing.assert_array_equal(bicubic_matrix(5, 5), np.eye(5))  # same size: the identity


def test_resize_matrix_is_the_separable_kronecker_product():
    R = bicubic_matrix(4, 3)
    M = resize_matrix(16, 9)
    assert M.shape == (9, 16) and M.dtype == np.float32
    grid = np.arange(16.0).reshape(4, 4)  # a (4, 4) grid, row-major as the (16, 1) table
    np.testing.assert_allclose(M @ grid.reshape(16), (R @ grid @ R.T).reshape(9), atol=1e-5)
