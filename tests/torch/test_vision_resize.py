"""vchat/vision_math.py's bicubic matrix against torch's F.interpolate (bicubic, align_corners=False),
called as vchat_torch.vision.resize_abs_pos calls it, and against resize_abs_pos itself."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vchat.vision_math import bicubic_matrix, resize_matrix
from vchat_torch.vision import resize_abs_pos


@pytest.mark.parametrize("src,tgt", [(16, 4), (4, 16), (16, 7), (5, 3), (3, 8), (24, 32)])
def test_torch_resize_abs_pos_is_the_bicubic_matrix(src, tgt):
    rng = np.random.default_rng(src * 100 + tgt + 1)
    table = rng.standard_normal((src * src, 5))  # (S*S, C), row-major over the grid
    grid = torch.from_numpy(table).reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, C, S, S)
    want = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).numpy()  # (T*T, C)
    R = bicubic_matrix(src, tgt)
    np.testing.assert_allclose(np.kron(R, R) @ table, want, atol=1e-12, rtol=0)  # float64: the same arithmetic
    t32 = table.astype(np.float32)
    got = resize_abs_pos(torch.from_numpy(t32), tgt * tgt).numpy()  # float32, as the model runs it
    assert got.dtype == np.float32 and got.shape == (tgt * tgt, 5)
    np.testing.assert_allclose(resize_matrix(src * src, tgt * tgt) @ t32, got, atol=5e-6, rtol=0)
