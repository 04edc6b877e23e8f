"""A LLaVA-style JSON layout with several images per conversation (our format, not the reference's).

`<dir>/<name>.json` is a list of `{"id", "image": [files relative to <dir>], "conversations":
[{"from": "human", "value": "<image>\\n<image>\\nQuestion"}, {"from": "gpt", "value": "A"}, ...]}`
(a single string `image` is allowed, as in LLaVA). Each `<image>` mark in a human turn shows the
next image of the list in that turn. The built-in synthetic dataset is saved in this layout
(`vchat.data.synthetic.save_synthetic`) and read back as dataset `synthetic`.
"""

from __future__ import annotations

import os
import random

from vchat.data.readers.base import Reader, load_json, require_file
from vchat.data.sample import DataError, Sample, Turn
from vchat.template import DEFAULT_IMAGE_TOKEN, MAX_IMAGES, clean_question


class MultiImageReader(Reader):
    def __init__(self, root: str, name: str = "synthetic", subdir: str = "synthetic"):
        self.name = name
        super().__init__(root)
        self.dir = os.path.join(root, subdir)
        self.path = require_file(root, os.path.join(subdir, f"{name}.json"), name)
        data = load_json(self.path, name)
        if not isinstance(data, list):
            raise DataError(f"dataset {name}: {self.path} must hold a list of conversations")
        for i, a in enumerate(data):
            self.items.append(self._check(i, a))
        self._check_nonempty(self.path)

    def _check(self, i: int, a: dict) -> dict:
        where = f"{self.name}[{i}] (id {a.get('id', '?')!r} in {self.path})"
        files = a.get("image", [])
        files = [files] if isinstance(files, str) else list(files)
        conv = a.get("conversations")
        if not conv or len(conv) % 2:
            raise DataError(f"{where}: 'conversations' must hold human/gpt pairs")
        marks = sum(c["value"].count(DEFAULT_IMAGE_TOKEN) for c in conv[0::2])
        if marks != len(files):
            raise DataError(f"{where}: {marks} <image> marks in the questions but {len(files)} image files")
        if len(files) > MAX_IMAGES:
            raise DataError(f"{where}: {len(files)} images; a sample holds at most {MAX_IMAGES}")
        return {"files": files, "conversations": conv}

    def sample(self, index: int, rng: random.Random) -> Sample:
        a = self.items[index]
        it = iter(os.path.join(self.dir, f) for f in a["files"])
        conv = a["conversations"]
        turns = []
        for k in range(len(conv) // 2):
            raw = conv[2 * k]["value"]
            images = tuple(next(it) for _ in range(raw.count(DEFAULT_IMAGE_TOKEN)))
            turns.append(Turn(images, clean_question(raw), conv[2 * k + 1]["value"]))
        return Sample(tuple(turns), origin=self.origin(index))
