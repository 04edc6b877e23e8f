"""llava_otter_blend: LLaVA conversations about each COCO image, then MIMIC-IT CGD rounds that
compare the images.

Mirrors `llava_otter_blend_dataset.py` of the reference with `followup=False` (the reference
hard-codes it; the follow-up branch is not implemented). Inputs: `coco/train2017/`,
`llava/{detail_23k,complex_reasoning_77k,conversation_58k}.json` (indexed by image file) and
`MIMIC-IT/CGD_instructions.json` (merged by `rel_ins_ids` as for otter_mimicit_cgd). A CGD sample
is kept only when every image but the last has LLaVA conversations, so images appear in order.

One draw, for CGD images [x1..xn]:
  for each image xi with LLaVA data: draw m in [1, #conversations] (in [0, ...] for the last
  image), pick m conversations at random; their exchanges become turns, the first of them showing
  xi (its block numbered after the images already shown);
  then draw m in [1, #CGD rounds] CGD rounds in random order; the first shows the images not
  shown yet. The system prompt sits on the first turn overall.
"""

from __future__ import annotations

import os
import random

from vchat.data.readers.base import Reader, load_json, require_dir, require_file
from vchat.data.readers.otter import cgd_image_file, merge_related
from vchat.data.sample import Sample, Turn
from vchat.template import clean_question

LLAVA_FILES = ("llava/detail_23k.json", "llava/complex_reasoning_77k.json", "llava/conversation_58k.json")


class LlavaOtterBlendReader(Reader):
    name = "llava_otter_blend"

    def __init__(self, root: str):
        super().__init__(root)
        self.image_dir = require_dir(root, "coco/train2017", self.name)
        self.llava: dict[str, list] = {}
        for rel in LLAVA_FILES:
            for a in load_json(require_file(root, rel, self.name), self.name):
                self.llava.setdefault(a["image"], []).append(a["conversations"])
        ann = require_file(root, "MIMIC-IT/CGD_instructions.json", self.name)
        self.items = merge_related(load_json(ann, self.name, key="data"), keep=self._keep)
        self._check_nonempty(ann, *LLAVA_FILES)

    def _keep(self, entry: dict):
        files = [cgd_image_file(i) for i in entry["image_ids"]]
        if any(f not in self.llava for f in files[:-1]):
            self._skip("an image before the last has no LLaVA conversation")
            return None
        return files

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        files = a["image_ids"]
        turns: list[Turn] = []
        shown: set[str] = set()
        for n, f in enumerate(files):
            convs = self.llava.get(f)
            if not convs:
                continue
            lo = 1 if n < len(files) - 1 else 0
            for c in rng.sample(range(len(convs)), rng.randint(lo, len(convs))):
                conv = convs[c]
                for k in range(len(conv) // 2):
                    images = (os.path.join(self.image_dir, f),) if f not in shown else ()
                    shown.add(f)
                    turns.append(Turn(images, clean_question(conv[2 * k]["value"]), conv[2 * k + 1]["value"]))
        rest = tuple(os.path.join(self.image_dir, f) for f in files if f not in shown)
        n_cgd = len(a["instruction"])
        for j, c in enumerate(rng.sample(range(n_cgd), rng.randint(1, n_cgd))):
            turns.append(Turn(rest if j == 0 else (), clean_question(a["instruction"][c]), a["answer"][c]))
        return Sample(tuple(turns), origin=self.origin(index))
