"""The MIMIC-IT (Otter) readers: otter_mimicit_cgd, _sd, _sn, _tvc, _vst.

Mirrors `otter_mimicit_{cgd,sd,sn,tvc,vst}_dataset.py` of the reference. An instruction file
`MIMIC-IT/{X}_instructions.json` holds `{"data": {ins_id: {instruction, answer, image_ids,
rel_ins_ids}}}`; related instructions are merged into one multi-round sample (the reference's
`*_merged*.json` cache, recomputed here in memory, in file order). Per sample the rounds are
shuffled; the first carries the system prompt and every image, numbered as text.

Images: CGD uses the COCO files (`CGD_IMG_000000123456` -> `coco/train2017/000000123456.jpg`);
SD/SN/TVC/VST decode base64 JPEGs from `MIMIC-IT/{X}.json` (id -> base64). SN/TVC/VST keep only
samples with 1..`max_num_image_per_sample` images; SD keeps samples with at least one.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import random

from PIL import Image, UnidentifiedImageError

from vchat.data.readers.base import Reader, load_json, require_dir, require_file
from vchat.data.sample import DataError, Sample, Turn
from vchat.template import MAX_IMAGES, clean_question


def cgd_image_file(image_id: str) -> str:
    """`CGD_IMG_000000123456` -> `000000123456.jpg` (the reference strips 8 characters)."""
    return image_id[8:] + ".jpg"


def merge_related(data: dict, keep=None) -> list[dict]:
    """Group instructions with their `rel_ins_ids`, visiting ids in file order.

    Each id not yet used starts a group and takes each of its related ids that is not yet used
    (one level, not transitive). `keep(entry) -> image_ids | None` filters the head entry; a dropped
    head frees nothing. Returns `[{"image_ids", "instruction": [...], "answer": [...]}]`.
    """
    used: set = set()
    groups = []
    for key, entry in data.items():
        if key in used:
            continue
        image_ids = entry["image_ids"] if keep is None else keep(entry)
        used.add(key)
        if image_ids is None:
            continue
        group = {"image_ids": list(image_ids), "instruction": [entry["instruction"]], "answer": [entry["answer"]]}
        for rel in entry.get("rel_ins_ids", []):
            if rel in data and rel not in used:
                group["instruction"].append(data[rel]["instruction"])
                group["answer"].append(data[rel]["answer"])
                used.add(rel)
        groups.append(group)
    return groups


class OtterReader(Reader):
    """Common logic; subclasses name the split and where images come from."""

    split = ""

    def __init__(self, root: str):
        super().__init__(root)
        self.ann_path = require_file(root, f"MIMIC-IT/{self.split}_instructions.json", self.name)
        self.items = merge_related(load_json(self.ann_path, self.name, key="data"), keep=self._keep)
        self._check_nonempty(self.ann_path)

    def _keep(self, entry: dict):
        return entry["image_ids"]

    def _image(self, image_id: str, index: int):
        raise TypeError(f"{type(self).__name__} must define _image() (a reader subclass hook)")

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        images = tuple(self._image(i, index) for i in a["image_ids"])
        order = list(range(len(a["instruction"])))
        rng.shuffle(order)
        turns = [Turn(images if n == 0 else (), clean_question(a["instruction"][k]), a["answer"][k])
                 for n, k in enumerate(order)]
        return Sample(tuple(turns), origin=self.origin(index))


class OtterCgdReader(OtterReader):
    name = "otter_mimicit_cgd"
    split = "CGD"

    def __init__(self, root: str):
        self.image_dir = require_dir(root, "coco/train2017", self.name)
        super().__init__(root)

    def _image(self, image_id: str, index: int):
        return os.path.join(self.image_dir, cgd_image_file(image_id))


class Base64ImageStore:
    """`MIMIC-IT/{X}.json`: image id -> base64 JPEG, decoded on demand."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self.data = load_json(path, name)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.data

    def get(self, image_id: str, where: str) -> Image.Image:
        """The image, opened lazily (PIL reads the header now and the pixels when used)."""
        if image_id not in self.data:
            raise DataError(f"{where}: image id {image_id!r} not in {self.path}")
        try:
            return Image.open(io.BytesIO(base64.b64decode(self.data[image_id], validate=True)))
        except (binascii.Error, ValueError, TypeError) as e:
            raise DataError(f"{where}: image {image_id!r} in {self.path} is not valid base64: {e}") from e
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{where}: cannot read image {image_id!r} in {self.path}: {e}") from e


class OtterBase64Reader(OtterReader):
    """SD: keep a sample if any of its images is in the store. SN/TVC/VST (`max_images` set): keep
    it if 1..max_images of its images are."""

    max_images: int | None = None

    def __init__(self, root: str, max_num_image_per_sample: int = MAX_IMAGES):
        self.store = Base64ImageStore(require_file(root, f"MIMIC-IT/{self.split}.json", self.name), self.name)
        if self.max_images is not None:
            if not 1 <= max_num_image_per_sample <= MAX_IMAGES:
                raise ValueError(f"max_num_image_per_sample must be in 1..{MAX_IMAGES}, got {max_num_image_per_sample}")
            self.max_images = max_num_image_per_sample
        super().__init__(root)

    def _keep(self, entry: dict):
        ids = [i for i in entry["image_ids"] if i in self.store]
        if not ids:
            self._skip("no image in the store")
            return None
        if self.max_images is not None and len(ids) > self.max_images:
            self._skip(f"more than {self.max_images} images")
            return None
        return ids

    def _image(self, image_id: str, index: int):
        return self.store.get(image_id, self.origin(index))

    def image_files(self, index: int) -> list[str]:
        """None: the images are in the store, and `_keep` kept only ids it holds."""
        return []


class OtterSdReader(OtterBase64Reader):
    name = "otter_mimicit_sd"
    split = "SD"


class OtterSnReader(OtterBase64Reader):
    name = "otter_mimicit_sn"
    split = "SN"
    max_images = MAX_IMAGES


class OtterTvcReader(OtterBase64Reader):
    name = "otter_mimicit_tvc"
    split = "TVC"
    max_images = MAX_IMAGES


class OtterVstReader(OtterBase64Reader):
    name = "otter_mimicit_vst"
    split = "VST"
    max_images = MAX_IMAGES
