"""Fixed tables of the vision side, in numpy, shared by both frameworks: the 2-D sin-cos position
table of the learned-query poolings, and the bicubic resize of square position tables.

    sincos_2d(dim, grid)        (grid*grid, dim) float32, MAE's 2-D sin-cos table
    bicubic_matrix(src, tgt)    (tgt, src) float64 R: R @ x == F.interpolate(x, tgt, "bicubic") on one axis
    resize_matrix(src, tgt)     (tgt, src) float32 kron(R, R): resizes a (side*side, C) table in one matmul
"""

from __future__ import annotations

import functools
import math

import numpy as np


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D sin-cos table (grid*grid, dim), float32. Row i*grid + j (grid row i, column j) is
    [sin(j w) | cos(j w) | sin(i w) | cos(i w)] with w_k = 10000 ** (-k / (dim/4)), k < dim/4."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4.0))  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def enc(p: np.ndarray) -> np.ndarray:  # (grid, grid) -> (grid*grid, dim/2)
        out = np.einsum("m,d->md", p.reshape(-1), omega)  # (grid*grid, dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([enc(cols), enc(rows)], axis=1).astype(np.float32)


def _cubic_weights(t: float, A: float) -> list[float]:
    """The four taps of torch's bicubic kernel at fractional offset t (upsample_bicubic2d, A = -0.75)."""
    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@functools.lru_cache(maxsize=None)
def bicubic_matrix(src: int, tgt: int) -> np.ndarray:
    """(tgt, src) float64 matrix R with R @ x == F.interpolate(x, tgt, mode="bicubic", align_corners=False)
    along one axis: source index (i + 0.5) * src / tgt - 0.5, four taps clamped to the border. Exact for
    float64 inputs; torch's float32 kernel rounds its taps and sums to float32 (a few ulps)."""
    R = np.zeros((tgt, src), dtype=np.float64)
    for i in range(tgt):
        x = (i + 0.5) * src / tgt - 0.5
        x0 = math.floor(x)
        for j, w in enumerate(_cubic_weights(x - x0, -0.75)):
            R[i, min(max(x0 - 1 + j, 0), src - 1)] += w
    return R


@functools.lru_cache(maxsize=None)
def resize_matrix(src_len: int, tgt_len: int) -> np.ndarray:
    """(tgt_len, src_len) float32 matrix resizing a (side x side, C) table, rows row-major over the grid
    (sides isqrt of the lengths, as the reference's `get_abs_pos`)."""
    s, t = math.isqrt(src_len), math.isqrt(tgt_len)
    R = bicubic_matrix(s, t)
    return np.kron(R, R).astype(np.float32)  # (t*t, s*s): out[(i, j)] = sum R[i, a] R[j, b] x[(a, b)]
