"""The JAX position-table resize: vchat/vision_math.py's bicubic matrix, as vchat_jax applies it, against
torch's F.interpolate (bicubic, align_corners=False). The tables themselves: tests/core/test_vision_math.py."""

import numpy as np
import pytest
import torch

from vchat.vision_math import bicubic_matrix
from vchat_jax.vision import resize_abs_pos


def _torch_resize(table, src, tgt):
    t = torch.from_numpy(table).reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(t, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).numpy()


@pytest.mark.parametrize("src,tgt", [(16, 4), (4, 16), (16, 7), (5, 3), (3, 8), (32, 32), (24, 32)])
def test_bicubic_matrix_matches_torch_interpolate(src, tgt):
    rng = np.random.default_rng(src * 100 + tgt)
    table = rng.standard_normal((src * src, 6))  # (S*S, C), row-major over the grid
    # float64: the same arithmetic
    R = bicubic_matrix(src, tgt)
    np.testing.assert_allclose(np.kron(R, R) @ table, _torch_resize(table, src, tgt), atol=1e-12, rtol=0)
    # float32, as the models run it: a few ulps of accumulation order
    t32 = table.astype(np.float32)
    np.testing.assert_allclose(np.asarray(resize_abs_pos(t32, tgt * tgt)), _torch_resize(t32, src, tgt),
                               atol=5e-6, rtol=0)


def test_resize_is_identity_when_sizes_match():
    table = np.arange(32, dtype=np.float32).reshape(16, 2)
    assert resize_abs_pos(table, 16) is table
