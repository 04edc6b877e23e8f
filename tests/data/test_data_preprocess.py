"""Image preprocessing against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_helpers import write_image
from vchat.data import CLIP_MEAN, CLIP_STD, DataError, ImageProcessor, open_image
from vchat.data.preprocess import shortest_side_size
from vchat.config import VisionConfig


def norm(v: int, c: int) -> float:
    return (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]


def test_clip_crop_and_normalise_by_hand():
    # 4 wide x 2 high: the short side is already 2, so no resize; the 2x2 centre crop keeps columns 1, 2
    px = np.array([[[0, 10, 20], [30, 40, 50], [60, 70, 80], [90, 100, 110]],
                   [[120, 130, 140], [150, 160, 170], [180, 190, 200], [210, 220, 255]]], dtype=np.uint8)
    out = ImageProcessor.clip(2)(Image.fromarray(px))
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    expected = np.array([[[norm(px[y, x, c], c) for x in (1, 2)] for y in (0, 1)] for c in range(3)])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert abs(out[0, 0, 0] - (30 / 255 - 0.48145466) / 0.26862954) < 1e-6  # red of pixel (row 0, col 1)


def test_shortest_side_resize_then_centre_crop():
    assert shortest_side_size(10, 6, 3) == (5, 3)  # int(3 * 10 / 6)
    assert shortest_side_size(6, 10, 3) == (3, 5)
    assert shortest_side_size(640, 480, 224) == (298, 224)  # int(224 * 640 / 480) = 298
    # a constant image stays constant through bicubic resampling
    out = ImageProcessor.clip(3)(Image.new("RGB", (10, 6), (255, 0, 51)))
    assert out.shape == (3, 3, 3)
    for c, v in enumerate((255, 0, 51)):
        np.testing.assert_allclose(out[c], norm(v, c), atol=1e-6)


def test_crop_offset_on_resized_image():
    # 8 x 4 image, left half black, right half white; size 2 -> resized to 4 x 2, crop columns 1..2
    px = np.zeros((4, 8, 3), np.uint8)
    px[:, 4:] = 255
    out = ImageProcessor.clip(2)(Image.fromarray(px))
    resized = np.asarray(Image.fromarray(px).resize((4, 2), Image.BICUBIC))[:, 1:3]
    np.testing.assert_allclose(out[0], (resized[..., 0] / 255 - CLIP_MEAN[0]) / CLIP_STD[0], atol=1e-6)
    assert out[0, 0, 0] < out[0, 0, 1]  # dark left, bright right survive the crop


def test_qwen_reference_and_native_modes():
    img = Image.new("RGB", (12, 6), (0, 128, 255))
    ref = ImageProcessor.qwen(4)(img)
    native = ImageProcessor.qwen(4, native=True)(img)
    assert ref.shape == native.shape == (3, 4, 4)
    for c, v in enumerate((0, 128, 255)):
        np.testing.assert_allclose(native[c], norm(v, c), atol=1e-6)
    # native squashes the whole picture, the reference crops its sides
    px = np.zeros((6, 12, 3), np.uint8)
    px[:, :2] = 255  # a white stripe at the far left
    ref = ImageProcessor.qwen(4)(Image.fromarray(px))
    native = ImageProcessor.qwen(4, native=True)(Image.fromarray(px))
    assert ref[0, :, 0].max() < norm(40, 0) and native[0, :, 0].min() > norm(100, 0)


def test_for_vision_config():
    assert ImageProcessor.for_vision(VisionConfig(kind="clip", image_size=32, patch_size=8)).shape == (3, 32, 32)
    q = ImageProcessor.for_vision(VisionConfig(kind="qwen", image_size=448, patch_size=14, hidden_size=64,
                                               num_attention_heads=4, output_dim=128, n_queries=4))
    assert q == ImageProcessor(size=448, crop_size=448, resize="shortest")


def test_batch_and_bad_images(tmp_path):
    p = ImageProcessor.clip(4)
    assert p.batch([]).shape == (0, 3, 4, 4)
    good = write_image(str(tmp_path / "a.png"), size=(5, 5))
    assert p.batch([good, Image.new("L", (4, 4), 7)]).shape == (2, 3, 4, 4)  # greyscale becomes RGB
    with pytest.raises(DataError, match=r"llava\[2\] image 2: image file .*missing.jpg not found"):
        p.batch([good, str(tmp_path / "missing.jpg")], where="llava[2]")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"s\[0\]: cannot read image .*broken.jpg"):
        open_image(str(bad), "s[0]")


def test_matches_transformers_clip_processor():
    """The reference uses transformers' CLIPImageProcessor (PIL backend); ours is bit-identical."""
    tf = pytest.importorskip("transformers")
    proc = getattr(tf, "CLIPImageProcessorPil", None) or tf.CLIPImageProcessor
    rng = np.random.default_rng(0)
    for w, h in ((37, 23), (23, 37), (50, 17)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = proc(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})(img, return_tensors="np")
        np.testing.assert_array_equal(ImageProcessor.clip(16)(img), ref["pixel_values"][0])
