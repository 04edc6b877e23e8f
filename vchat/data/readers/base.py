"""The reader protocol shared by all datasets, and the file checks every reader runs first.

A reader mirrors one `VQADataset` subclass of the reference (`utils/data/vqa_dataset.py`): it finds
its files under the data root with the reference's on-disk layout (inventory section 1.6), loads
the annotations once, and builds sample `i` on demand with `sample(i, rng)`. The randomness the
reference takes from the global `random` inside `__getitem__` (which prompt, which rounds, their
order) comes from `rng` here, so a draw is reproducible from (seed, dataset, index, epoch).

Readers write nothing: where the reference caches a preprocessed annotation file into the data
directory, we recompute it in memory.
"""

from __future__ import annotations

import json
import os
import random

from vchat.data.sample import DataError, Sample, sample_rng


def require_root(root: str, name: str) -> None:
    """A data root that is not there is named as such, not as its first missing sub-folder."""
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise DataError(f"dataset {name}: the data root {root} (--data_path) {what}")


def require_dir(root: str, rel: str, name: str) -> str:
    require_root(root, name)
    path = os.path.join(root, rel)
    if not os.path.isdir(path):
        raise DataError(f"dataset {name}: image directory {path} not found (expected <data_root>/{rel})")
    return path


def require_file(root: str, rel: str, name: str) -> str:
    require_root(root, name)
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise DataError(f"dataset {name}: annotation file {path} not found (expected <data_root>/{rel})")
    return path


def load_json(path: str, name: str, key: str | None = None):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"dataset {name}: cannot read {path}: {e}") from e
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"dataset {name}: {path} has no top-level key {key!r}")
        data = data[key]
    return data


class FileIndex:
    """`path in index`: is `path` a file? One directory listing per folder, so checking the images of
    every annotation costs a listing of each image folder, not a stat per image."""

    def __init__(self):
        self.folders: dict[str, frozenset[str]] = {}

    def __contains__(self, path: str) -> bool:
        folder, base = os.path.split(os.path.abspath(path))
        if folder not in self.folders:
            try:
                with os.scandir(folder) as it:
                    self.folders[folder] = frozenset(e.name for e in it if e.is_file())
            except OSError:
                self.folders[folder] = frozenset()
        return base in self.folders[folder]


class Reader:
    """Base class: subclasses set `name`, fill `self.items` in `__init__` and implement `sample`."""

    name: str = ""

    def __init__(self, root: str):
        self.root = root
        self.items: list = []
        self.skipped: dict[str, int] = {}  # reason -> annotations dropped at load, as the reference filters
        self.seed, self.epoch = 0, 0

    def __len__(self) -> int:
        return len(self.items)

    def _check_nonempty(self, *files: str) -> None:
        if not self.items:
            raise DataError(f"dataset {self.name}: no usable samples in {', '.join(files)}"
                            + (f" (skipped: {self.skipped})" if self.skipped else ""))

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def image_files(self, index: int) -> list[str]:
        """The image files annotation `index` names (in-memory images are not files). Readers name
        the same images whatever the random draw, so one draw with a fixed stream lists them."""
        sample = self.get(index, rng=random.Random(0))
        return [os.fspath(im) for im in sample.images if isinstance(im, (str, os.PathLike))]

    def missing_images(self) -> list[tuple[int, str]]:
        """(annotation, first missing file) for each annotation naming an image file that is not there."""
        index, missing = FileIndex(), []
        for i in range(len(self)):
            gone = [f for f in self.image_files(i) if f not in index]
            if gone:
                missing.append((i, gone[0]))
        return missing

    def drop(self, indices, reason: str) -> None:
        """Leave annotations `indices` out, counting them in `skipped` under `reason`."""
        gone = set(indices)
        self.items = [a for i, a in enumerate(self.items) if i not in gone]
        self.skipped[reason] = self.skipped.get(reason, 0) + len(gone)

    def origin(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def sample(self, index: int, rng: random.Random) -> Sample:
        raise TypeError(f"{type(self).__name__} must define sample() (a reader subclass hook)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        """Sample `index` drawn with the reader's `seed` and current `epoch`."""
        return self.get(index, self.seed, self.epoch)

    def get(self, index: int, seed: int = 0, epoch: int = 0, rng: random.Random | None = None) -> Sample:
        """Sample `index`, its random choices drawn from `rng` or from (seed, name, index, epoch)."""
        if not 0 <= index < len(self):
            raise IndexError(f"dataset {self.name}: index {index} out of range for {len(self)} samples")
        rng = rng if rng is not None else sample_rng(seed, self.name, index, epoch)
        try:
            return self.sample(index, rng)
        except (KeyError, IndexError, TypeError) as e:
            raise DataError(f"{self.origin(index)}: malformed annotation ({type(e).__name__}: {e})") from e
