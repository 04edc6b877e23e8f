"""Dataset readers by name: the 13 of the reference (`utils/data/builder.py:build_dataset`) plus
`synthetic`, the built-in dataset once saved to disk."""

from __future__ import annotations

from vchat.data.readers.base import Reader
from vchat.data.readers.blend import LlavaOtterBlendReader
from vchat.data.readers.multi import MultiImageReader
from vchat.data.readers.otter import (OtterCgdReader, OtterSdReader, OtterSnReader, OtterTvcReader,
                                      OtterVstReader)
from vchat.data.readers.sparkles import SparklesReader
from vchat.data.readers.vqa import (AokvqaReader, CocoCaptionReader, LlavaDialReader, LlavaReader,
                                    MiniGpt4Reader, OcrVqaReader)

READERS: dict[str, type[Reader]] = {
    "aokvqa": AokvqaReader,
    "coco_caption": CocoCaptionReader,
    "llava": LlavaReader,
    "llava_dial": LlavaDialReader,
    "llava_otter_blend": LlavaOtterBlendReader,
    "minigpt4": MiniGpt4Reader,
    "ocr_vqa": OcrVqaReader,
    "otter_mimicit_cgd": OtterCgdReader,
    "otter_mimicit_sd": OtterSdReader,
    "otter_mimicit_sn": OtterSnReader,
    "otter_mimicit_tvc": OtterTvcReader,
    "otter_mimicit_vst": OtterVstReader,
    "sparkles_dialogue": SparklesReader,
    "synthetic": MultiImageReader,
}
REFERENCE_DATASETS = tuple(n for n in READERS if n != "synthetic")
# The reference's VQA-path datasets: their concatenated samples number images at the token level.
TOKEN_NUMBERED = ("aokvqa", "coco_caption", "llava", "llava_dial", "minigpt4", "ocr_vqa")
# Readers that take `max_num_image_per_sample` (the reference passes it only to these).
_TAKES_MAX_IMAGES = ("otter_mimicit_sn", "otter_mimicit_tvc", "otter_mimicit_vst")


def make_reader(name: str, data_root: str, max_num_image_per_sample: int = 8, **kwargs) -> Reader:
    """The reader of dataset `name` over `data_root` (the reference's `--data_path`)."""
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(READERS)}")
    if name in _TAKES_MAX_IMAGES:
        kwargs["max_num_image_per_sample"] = max_num_image_per_sample
    return READERS[name](data_root, **kwargs)


__all__ = ["READERS", "REFERENCE_DATASETS", "TOKEN_NUMBERED", "Reader", "make_reader"]
