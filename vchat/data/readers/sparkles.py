"""SparklesDialogue (CC and VG): native multi-image, multi-round dialogues.

Mirrors `sparkles_dialogue_dataset.py` of the reference. Layout: `SparklesDialogue{CC,VG}/images/
{image_id}.jpg` and `SparklesDialogue{CC,VG}/annotations/SparklesDialogue{CC,VG}.json`, a list of
`{"dialogue": [{"role": "user", "content", "images": [{"image_id"}]}, {"role": "assistant",
"content"}, ...]}`.

At load a dialogue is kept when its turns alternate user/assistant (even count), every image file
exists and it has at most 8 images (skips are counted in `reader.skipped`). Per sample one tag style
is drawn ("image a", "image A" or "the first image"); each `IMAGE#<id>` reference becomes the tag of
that image's position in the dialogue, `<Img><ImageHere></Img>` marks are removed, and each sentence
start is re-capitalised (`str.capitalize`, which also lower-cases the rest of that word).
"""

from __future__ import annotations

import os
import random
import re

from vchat.data.readers.base import Reader, load_json, require_dir, require_file
from vchat.data.sample import Sample, Turn
from vchat.template import MAX_IMAGES, clean_question

SUBSETS = ("CC", "VG")
IMG_MARK = "<Img><ImageHere></Img>"
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
TAG_STYLES: tuple[tuple[str, ...], ...] = (
    tuple(f"image {chr(ord('a') + i)}" for i in range(MAX_IMAGES)),
    tuple(f"image {chr(ord('A') + i)}" for i in range(MAX_IMAGES)),
    tuple(f"the {o} image" for o in _ORDINALS),
)
_IMAGE_REF = re.compile(r"IMAGE#\w+")
# A word at the very start, or right after ". ", "? " or "! " (one whitespace character).
_SENTENCE_START = re.compile(r"(?:^|(?<=[.?!]\s))\w+")


def capitalize_sentences(text: str) -> str:
    return _SENTENCE_START.sub(lambda m: m.group(0).capitalize(), text)


def replace_tags(text: str, tags: list[tuple[str, str]]) -> str:
    """Replace each whole `IMAGE#<id>` reference by its tag in one pass (the reference replaces
    substrings one by one, so `IMAGE#1` also hits the front of `IMAGE#12`)."""
    table = dict(tags)
    return _IMAGE_REF.sub(lambda m: table.get(m.group(0), m.group(0)), text)


class SparklesReader(Reader):
    name = "sparkles_dialogue"

    def __init__(self, root: str):
        super().__init__(root)
        files = []
        for sub in SUBSETS:
            image_dir = require_dir(root, f"SparklesDialogue{sub}/images", self.name)
            ann = require_file(root, f"SparklesDialogue{sub}/annotations/SparklesDialogue{sub}.json", self.name)
            files.append(ann)
            for d in load_json(ann, self.name):
                reason = self._reject(d, image_dir)
                if reason:
                    self._skip(reason)
                else:
                    self.items.append({**d, "image_dir": image_dir})
        self._check_nonempty(*files)

    @staticmethod
    def _reject(d: dict, image_dir: str) -> str | None:
        turns = d["dialogue"]
        if len(turns) % 2:
            return "odd number of turns"
        for k, t in enumerate(turns):
            if t["role"] != ("user" if k % 2 == 0 else "assistant"):
                return "roles do not alternate user/assistant"
        ids = [im["image_id"] for t in turns for im in t.get("images", [])]
        if any(not os.path.isfile(os.path.join(image_dir, f"{i}.jpg")) for i in ids):
            return "missing image file"
        if len(ids) > MAX_IMAGES:
            return f"more than {MAX_IMAGES} images"
        return None

    def sample(self, index: int, rng: random.Random) -> Sample:
        d = self.items[index]
        style = rng.choice(TAG_STYLES)
        tags: list[tuple[str, str]] = []
        turns = []
        dialogue = d["dialogue"]
        for k in range(len(dialogue) // 2):
            user, assistant = dialogue[2 * k], dialogue[2 * k + 1]
            images = []
            for im in user.get("images", []):
                tags.append((f"IMAGE#{im['image_id']}", style[len(tags)]))
                images.append(os.path.join(d["image_dir"], f"{im['image_id']}.jpg"))
            question = clean_question(user["content"].replace(IMG_MARK, ""))
            question = capitalize_sentences(replace_tags(question, tags))
            answer = capitalize_sentences(replace_tags(assistant["content"], tags))
            turns.append(Turn(tuple(images), question, answer))
        return Sample(tuple(turns), origin=self.origin(index))
