"""What a dataset reader yields: a sample is a list of turns, each (images, question, answer).

This is the common currency of `vchat.data`. It mirrors the per-sample dicts that the reference's
dataset classes (`utils/data/*_dataset.py`) build inside `__getitem__`, but without tokens: a reader
only says which images go with which question, and `vchat.data.encode` turns a sample into token
ids through `vchat.template`, the one prompt builder.

Images stay unopened (a path, raw bytes, or a PIL image) until the sample is encoded, so building
a mixture of datasets reads only annotation files.
"""

from __future__ import annotations

import io
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from vchat.errors import UserError
from vchat.template import Round

ImageRef = Union[str, os.PathLike, bytes, Image.Image]


class DataError(UserError):
    """Bad input data: the message names the dataset, the sample and the file."""


@dataclass(frozen=True)
class Turn:
    """One round of a conversation: the images shown in it (in order), the user's question and
    the answer (None when it is to be generated)."""

    images: tuple = ()
    question: str = ""
    answer: str | None = None

    def to_round(self) -> Round:
        return Round(question=self.question, num_images=len(self.images), answer=self.answer)


@dataclass(frozen=True)
class Sample:
    """A training conversation. `origin` names it in error messages ("llava[12]")."""

    turns: tuple[Turn, ...]
    origin: str = "?"
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def images(self) -> list[ImageRef]:
        return [im for t in self.turns for im in t.images]

    @property
    def num_images(self) -> int:
        return sum(len(t.images) for t in self.turns)

    def rounds(self) -> list[Round]:
        return [t.to_round() for t in self.turns]


def concat_samples(samples: list[Sample], origin: str | None = None) -> Sample:
    """The reference's `--dataset_concatenate_samples` join: the turns of each sample in order, so
    the system prompt stays on the very first turn and images are numbered 1..n across the join."""
    if not samples:
        raise DataError("cannot concatenate an empty group of samples")
    turns = tuple(t for s in samples for t in s.turns)
    name = origin if origin is not None else "+".join(s.origin for s in samples)
    return Sample(turns=turns, origin=name, meta={"members": [s.origin for s in samples]})


def open_image(ref: ImageRef, where: str = "?") -> Image.Image:
    """Open an image reference as an RGB PIL image (`Image.open(...).convert("RGB")` as the reference).

    Raises DataError naming `where` and the file when it is missing or unreadable.
    """
    try:
        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, (bytes, bytearray)):
            img = Image.open(io.BytesIO(ref))
        else:
            path = os.fspath(ref)
            if not os.path.isfile(path):
                raise DataError(f"{where}: image file {path} not found")
            img = Image.open(path)
        img.load()
        return img.convert("RGB")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        what = "in-memory image" if isinstance(ref, (bytes, bytearray, Image.Image)) else os.fspath(ref)
        raise DataError(f"{where}: cannot read image {what}: {e}") from e


def stable_seed(*parts: object) -> int:
    """A seed from ints and strings that is the same in every process (Python's `hash` is not)."""
    words = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence([w & 0xFFFFFFFF for w in words]).generate_state(1)[0])


def sample_rng(*parts: object) -> random.Random:
    """The random stream of one sample draw: the reference draws prompts and round orders with the
    global `random` at `__getitem__` time; we seed one stream per (seed, dataset, index, epoch)."""
    return random.Random(stable_seed(*parts))
