"""Image preprocessing to float32 (3, H, W) arrays: CLIP, and Qwen-VL as the reference does it.

Mirrors what the reference gets from `CLIPImageProcessor.from_pretrained(vision path)`
(`modeling_dsvl.py`, inventory D8): RGB, shortest side resized to `size` with PIL bicubic
(the other side `int(size * long / short)`), a centre crop to `crop_size` (top-left at
`((h - crop) // 2, (w - crop) // 2)`), rescale by 1/255 in float64 then cast to float32, and
`(x - mean) / std` in float32 with the CLIP mean and std.

CLIP-L/14 uses 224/224. The reference's Qwen ViT uses the same processor at 448/448
(`helper/qwen_clip/preprocessor_config.json`), which crops the edges of non-square images (B28);
`ImageProcessor.qwen(native=True)` gives Qwen-VL's own direct 448x448 bicubic resize instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vchat.data.sample import ImageRef, open_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "square")


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side `size` (transformers' `default_to_square=False`)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


@dataclass(frozen=True)
class ImageProcessor:
    """`processor(image)` -> (3, crop_size, crop_size) float32."""

    size: int = 224
    crop_size: int = 224
    resize: str = "shortest"  # "shortest" + centre crop (CLIP, reference Qwen) or "square" (native Qwen-VL)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.size < self.crop_size:
            raise ValueError(f"size ({self.size}) must be at least crop_size ({self.crop_size})")

    @classmethod
    def clip(cls, size: int = 224) -> "ImageProcessor":
        return cls(size=size, crop_size=size)

    @classmethod
    def qwen(cls, size: int = 448, native: bool = False) -> "ImageProcessor":
        return cls(size=size, crop_size=size, resize="square" if native else "shortest")

    @classmethod
    def for_vision(cls, vision, native_qwen: bool = False) -> "ImageProcessor":
        """The processor of a `vchat.config.VisionConfig` (its kind and image_size)."""
        if vision.kind == "qwen":
            return cls.qwen(vision.image_size, native=native_qwen)
        return cls.clip(vision.image_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.crop_size, self.crop_size)

    def __call__(self, image: ImageRef, where: str = "?") -> np.ndarray:
        img = open_image(image, where)
        if self.resize == "square":
            img = img.resize((self.size, self.size), Image.BICUBIC)
            x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # torchvision ToTensor
        else:
            img = img.resize(shortest_side_size(img.width, img.height, self.size), Image.BICUBIC)
            top, left = (img.height - self.crop_size) // 2, (img.width - self.crop_size) // 2
            arr = np.asarray(img)[top:top + self.crop_size, left:left + self.crop_size]  # (H, W, 3) uint8
            x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)  # (H, W, 3)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)

    def batch(self, images, where: str = "?") -> np.ndarray:
        """(N, 3, H, W) float32 for a list of images (N may be 0)."""
        if not len(images):
            return np.zeros((0, *self.shape), np.float32)
        return np.stack([self(im, f"{where} image {i + 1}") for i, im in enumerate(images)])
