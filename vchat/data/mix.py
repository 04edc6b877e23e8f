"""Mixing datasets: concatenation of samples, per-dataset subsampling, the mixture, shuffle and split.

Mirrors the reference's `utils/data/builder.py` (`build_dataset`: one dataset per name,
`--dataset_samples`, a `ConcatDataset` of all), `DST.random_grouping` (`--dataset_concatenate_samples`)
and `utils/data/utils.py` (`shuffle_dataset`, `split_dataset`, driven from `training/main.py`).

Order of operations, as the reference:
1. per dataset, shuffle its annotations and cut them into groups of random size U{1..k}
   (`--dataset_concatenate_samples k`); a group is one sample whose turns are its members' turns;
2. per dataset, keep `n` groups drawn without replacement (`--dataset_samples n`, or `all`);
3. concatenate the datasets in the order named;
4. permute the whole mixture with `np.random.RandomState(seed)` and take the first
   `int(len * ratio)` for training, the rest for evaluation (`--data_train_split_ratio`).
Unlike the reference, grouping works for every dataset (its otter, sparkles and blend readers keep
only the first member of a group, B12), and each step draws from its own seeded stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vchat.data.readers import make_reader
from vchat.data.readers.base import Reader
from vchat.data.sample import DataError, Sample, concat_samples, sample_rng, stable_seed


def random_grouping(n: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle 0..n-1 and cut it into consecutive groups of random size in 1..k (the last group
    takes what is left). With k=1 every group is one index."""
    if k < 1:
        raise ValueError(f"dataset_concatenate_samples must be >= 1, got {k}")
    order = rng.permutation(n)
    groups, start = [], 0
    while start < n:
        size = int(rng.integers(1, k + 1))
        groups.append(order[start:start + size].tolist())
        start += size
    return groups


class GroupedDataset:
    """A reader's annotations grouped into (possibly concatenated) samples.

    `dataset[i]` draws group i for the current epoch (`set_epoch`); its random choices come from
    (seed, dataset name, group index, epoch), so the same call gives the same sample.
    """

    def __init__(self, reader: Reader, groups: list[list[int]], seed: int = 0):
        self.reader, self.groups, self.seed, self.epoch = reader, groups, seed, 0
        self.name = reader.name

    def __len__(self) -> int:
        return len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self, i: int, epoch: int | None = None) -> Sample:
        if not 0 <= i < len(self.groups):
            raise IndexError(f"dataset {self.name}: group {i} out of range for {len(self.groups)}")
        rng = sample_rng(self.seed, self.name, "group", i, self.epoch if epoch is None else epoch)
        members = [self.reader.get(j, rng=rng) for j in self.groups[i]]
        if len(members) == 1:
            return members[0]
        return concat_samples(members, origin=f"{self.name}[{'+'.join(map(str, self.groups[i]))}]")

    def __getitem__(self, i: int) -> Sample:
        return self.get(i)


class Subset:
    """Samples `indices` of a dataset, in that order."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, i: int) -> Sample:
        return self.dataset[self.indices[i]]


class Mixture:
    """The datasets one after another (the reference's `ConcatDataset`)."""

    def __init__(self, parts: list):
        if not parts:
            raise DataError("the mixture is empty: no dataset was given")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def locate(self, i: int) -> tuple[int, int]:
        """(part, index within the part) of sample i."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a mixture of {len(self)}")
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return part, i - int(self.offsets[part])

    def __getitem__(self, i: int) -> Sample:
        part, j = self.locate(i)
        return self.parts[part][j]


def broadcast_flag(values: Sequence, n: int, flag: str) -> list:
    """One value per dataset; a single value is used for all (the reference's rule)."""
    values = list(values)
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise ValueError(f"{flag}: give one value or one per dataset ({n}), got {len(values)}")


def check_images(reader: Reader, skip_missing: bool = False) -> None:
    """Refuse a dataset whose annotations name missing image files, or drop those annotations."""
    missing = reader.missing_images()
    if not missing:
        return
    if not skip_missing:
        raise DataError(f"{len(missing)} of {len(reader)} samples of dataset {reader.name} name missing images, "
                        f"first: {missing[0][1]} ({reader.origin(missing[0][0])}); --skip_missing_images "
                        f"drops them")
    if len(missing) == len(reader):
        raise DataError(f"all {len(reader)} samples of dataset {reader.name} name missing images, "
                        f"first: {missing[0][1]}")
    reader.drop([i for i, _ in missing], "missing image file")


def build_mixture(data_root: str, dataset_names: Sequence[str], dataset_samples: Sequence = ("all",),
                  dataset_concatenate_samples: Sequence = (1,), max_num_image_per_sample: int = 8,
                  seed: int = 1234, reader_kwargs: dict | None = None, verbose: bool = True,
                  skip_missing_images: bool = False) -> Mixture:
    """The training mixture from the reference's flags.

    dataset_samples: per dataset `"all"` or a count of (grouped) samples to draw without replacement;
    dataset_concatenate_samples: per dataset the largest group k. `reader_kwargs` maps a dataset
    name to extra reader arguments (e.g. `{"coco_caption": {"splits": ("train",)}}`).
    Every image file a dataset names must exist (checked here, before any training): a DataError
    counts the annotations that name missing ones, unless `skip_missing_images` drops them (counted
    in the reader's `skipped`).
    """
    names = list(dataset_names)
    if not names:
        raise DataError("no dataset named (dataset_names is empty)")
    samples = broadcast_flag(dataset_samples, len(names), "dataset_samples")
    ks = [int(k) for k in broadcast_flag(dataset_concatenate_samples, len(names), "dataset_concatenate_samples")]
    parts = []
    for name, n, k in zip(names, samples, ks):
        reader = make_reader(name, data_root, max_num_image_per_sample, **(reader_kwargs or {}).get(name, {}))
        check_images(reader, skip_missing_images)
        rng = np.random.default_rng(stable_seed(seed, name, "mixture"))
        grouped = GroupedDataset(reader, random_grouping(len(reader), k, rng), seed=seed)
        if str(n) != "all":
            n = int(n)
            if n < 0:
                raise ValueError(f"dataset_samples for {name} must be 'all' or >= 0, got {n}")
            keep = rng.choice(len(grouped), min(n, len(grouped)), replace=False)
            grouped = Subset(grouped, keep)
        if verbose:
            skipped = f", skipped at load: {reader.skipped}" if reader.skipped else ""
            print(f"[data] {name}: {len(grouped)} samples from {len(reader)} annotations (k={k}){skipped}")
        parts.append(grouped)
    return Mixture(parts)


def shuffle_indices(n: int, seed: int) -> np.ndarray:
    """The reference's global shuffle: `np.random.RandomState(seed).shuffle(arange(n))`."""
    idx = np.arange(n, dtype=np.uint32 if n < np.iinfo(np.uint32).max - 1 else np.int64)
    np.random.RandomState(seed).shuffle(idx)
    return idx.astype(np.int64)


def split_train_eval(dataset, ratio: float = 0.9, seed: int = 1234) -> tuple[Subset, Subset]:
    """Shuffle by `seed`, then the first `int(len * ratio)` samples train and the rest evaluate."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"data_train_split_ratio must be in [0, 1], got {ratio}")
    idx = shuffle_indices(len(dataset), seed)
    cut = int(len(dataset) * ratio)
    return Subset(dataset, idx[:cut]), Subset(dataset, idx[cut:])
