"""The single-image readers: aokvqa, coco_caption, llava, llava_dial, minigpt4, ocr_vqa.

Each mirrors one file of the reference's `utils/data/` (`aokvqa_dataset.py`, `coco_caption_dataset.py`,
`llava_dataset.py`, `dial_dataset.py`, `cc_sbu_align_dataset.py`, `ocr_vqa_dataset.py`): one image per
annotation, shown in the first turn. These are the reference's "VQA path" datasets, whose
concatenated samples number their images at the token level (inventory section 2); `vchat.data.encode`
reproduces that with `numbering="token"`.
"""

from __future__ import annotations

import os
import random

from PIL import Image, UnidentifiedImageError

from vchat.data.prompts import CAPTION_PROMPTS, REASON_PROMPTS
from vchat.data.readers.base import Reader, load_json, require_dir, require_file
from vchat.data.sample import DataError, Sample, Turn
from vchat.template import DEFAULT_IMAGE_TOKEN, clean_question

COCO_TRAIN2017 = "coco/train2017"


class AokvqaReader(Reader):
    """A-OKVQA: Q = question + a "why" prompt; A = "The answer is {choice}. Because {rationales}"."""

    name = "aokvqa"

    def __init__(self, root: str, prompts: tuple[str, ...] = REASON_PROMPTS):
        super().__init__(root)
        self.image_dir = require_dir(root, COCO_TRAIN2017, self.name)
        ann = require_file(root, "aokvqa/annotations/aokvqa_v1p0_train.json", self.name)
        self.items = list(load_json(ann, self.name))
        self.prompts = tuple(prompts)
        self._check_nonempty(ann)

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        question = a["question"] + " " + rng.choice(self.prompts)
        answer = "The answer is " + a["choices"][a["correct_choice_idx"]] + ". Because " + " ".join(a["rationales"])
        image = os.path.join(self.image_dir, f"{int(a['image_id']):012d}.jpg")
        return Sample((Turn((image,), question, answer),), origin=self.origin(index))


class CocoCaptionReader(Reader):
    """Karpathy COCO captions: a random caption prompt, a random reference caption. All splits are
    used, as the reference does (B26); pass `splits=("train", "restval")` to leave val/test out."""

    name = "coco_caption"

    def __init__(self, root: str, prompts: tuple[str, ...] = CAPTION_PROMPTS, splits: tuple[str, ...] | None = None):
        super().__init__(root)
        self.image_dir = require_dir(root, "coco/2014", self.name)
        ann = require_file(root, "coco_caption/dataset.json", self.name)
        images = load_json(ann, self.name, key="images")
        self.items = [im for im in images if splits is None or im.get("split") in splits]
        self.prompts = tuple(prompts)
        self._check_nonempty(ann)

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        captions = a["sentences"] if isinstance(a["sentences"], list) else [a["sentences"]]
        caption = rng.choice(captions)["raw"]
        question = rng.choice(self.prompts)
        image = os.path.join(self.image_dir, a["filename"])
        return Sample((Turn((image,), question, caption),), origin=self.origin(index))


class MiniGpt4Reader(Reader):
    """MiniGPT-4's cc_sbu_align: a random caption prompt, A = the curated caption."""

    name = "minigpt4"

    def __init__(self, root: str, prompts: tuple[str, ...] = CAPTION_PROMPTS):
        super().__init__(root)
        self.image_dir = require_dir(root, "cc_sbu_align/image", self.name)
        ann = require_file(root, "cc_sbu_align/filter_cap.json", self.name)
        self.items = list(load_json(ann, self.name, key="annotations"))
        self.prompts = tuple(prompts)
        self._check_nonempty(ann)

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        question = rng.choice(self.prompts)
        image = os.path.join(self.image_dir, f"{a['image_id']}.jpg")
        return Sample((Turn((image,), question, a["caption"]),), origin=self.origin(index))


class LlavaReader(Reader):
    """LLaVA detail + complex reasoning: the first exchange only, the question cleaned."""

    name = "llava"
    files = ("llava/detail_23k.json", "llava/complex_reasoning_77k.json")

    def __init__(self, root: str):
        super().__init__(root)
        self.image_dir = require_dir(root, COCO_TRAIN2017, self.name)
        paths = [require_file(root, rel, self.name) for rel in self.files]
        for p in paths:
            self.items.extend(load_json(p, self.name))
        self._check_nonempty(*paths)

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        conv = a["conversations"]
        image = os.path.join(self.image_dir, a["image"])
        return Sample((Turn((image,), clean_question(conv[0]["value"]), conv[1]["value"]),), origin=self.origin(index))


class LlavaDialReader(Reader):
    """LLaVA conversations: every exchange is a turn; the image is shown in the turn whose raw
    question holds `<image>`. Only the first such turn shows it (the reference would emit a second,
    image-less block and break the image count)."""

    name = "llava_dial"

    def __init__(self, root: str):
        super().__init__(root)
        self.image_dir = require_dir(root, COCO_TRAIN2017, self.name)
        ann = require_file(root, "llava/conversation_58k.json", self.name)
        self.items = list(load_json(ann, self.name))
        self._check_nonempty(ann)

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        conv = a["conversations"]
        image = os.path.join(self.image_dir, a["image"])
        turns, shown = [], False
        for k in range(len(conv) // 2):
            raw = conv[2 * k]["value"]
            with_image = DEFAULT_IMAGE_TOKEN in raw and not shown
            shown = shown or with_image
            turns.append(Turn((image,) if with_image else (), clean_question(raw), conv[2 * k + 1]["value"]))
        return Sample(tuple(turns), origin=self.origin(index))


class OcrVqaReader(Reader):
    """OCR-VQA book covers: a random (question, answer) pair of the cover. Covers with a side of 1 px
    or less are dropped at load (the reference's one-time preprocessing; we read only the header)."""

    name = "ocr_vqa"

    def __init__(self, root: str):
        super().__init__(root)
        self.image_dir = require_dir(root, "OCR_VQA/images", self.name)
        ann = require_file(root, "OCR_VQA/dataset.json", self.name)
        raw = load_json(ann, self.name)
        for key, a in raw.items():
            filename = key + os.path.splitext(a["imageURL"])[1]
            path = os.path.join(self.image_dir, filename)
            if os.path.isfile(path) and min(self._size(path, key)) <= 1:
                self._skip("image side <= 1")
            else:  # a missing cover is kept here: the mixture's image check counts it
                self.items.append({**a, "filename": filename, "key": key})
        self._check_nonempty(ann)

    def _size(self, path: str, key: str) -> tuple[int, int]:
        try:
            with Image.open(path) as im:
                return im.size
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"dataset {self.name}: cannot read image {path} of annotation {key!r}: {e}") from e

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        k = rng.randrange(len(a["questions"]))
        image = os.path.join(self.image_dir, a["filename"])
        return Sample((Turn((image,), a["questions"][k], a["answers"][k]),), origin=self.origin(index))
