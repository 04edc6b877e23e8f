"""Collation of encoded samples into numpy batches that both trainers consume.

Mirrors the reference's `DataCollatorPadToMaxLen` (`utils/data/utils.py`): input ids right-padded
with the pad id (= eos), labels with -100, attention mask with 0, every image of the batch
concatenated in sample order into one (sum N_i, 3, H, W) array, and `image_num` per sample.
The batch feeds `vchat.splice.plan_splice(batch.input_ids, batch.attention_mask, batch.image_num,
..., labels=batch.labels)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vchat.template import DEFAULT_LABEL_PADDING_NUM


@dataclass(frozen=True)
class Example:
    """One encoded sample with its preprocessed images."""

    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64
    pixel_values: np.ndarray  # (N, 3, H, W) float32
    origin: str = "?"

    @property
    def image_num(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # (B, T) int64, right-padded with pad_id
    attention_mask: np.ndarray  # (B, T) int64, 1 on tokens, 0 on padding
    labels: np.ndarray  # (B, T) int64, -100 on padding and masked positions
    images: np.ndarray  # (sum N_i, 3, H, W) float32, sample after sample
    image_num: np.ndarray  # (B,) int64
    origins: tuple[str, ...] = ()
    dropped: int = 0  # samples left out of this batch by the length/image budget

    def arrays(self) -> dict[str, np.ndarray]:
        """The five arrays by the names the trainers take."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "images": self.images, "image_num": self.image_num}

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(examples: list, pad_id: int, image_shape: tuple[int, int, int] | None = None,
            pad_multiple: int = 1) -> Batch | None:
    """Pad and stack `Example`s; entries that are not `Example` (a `Dropped`, None) are counted in
    `Batch.dropped` and left out. Returns None when nothing is left. `image_shape` (3, H, W) sizes
    the empty image array of a batch without images; `pad_multiple` rounds T up."""
    kept = [e for e in examples if isinstance(e, Example)]
    dropped = len(examples) - len(kept)
    if not kept:
        return None
    T = max(len(e.input_ids) for e in kept)
    T = -(-T // pad_multiple) * pad_multiple
    B = len(kept)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    labels = np.full((B, T), DEFAULT_LABEL_PADDING_NUM, dtype=np.int64)
    for b, e in enumerate(kept):
        n = len(e.input_ids)
        if len(e.labels) != n:
            raise ValueError(f"{e.origin}: {n} input ids but {len(e.labels)} labels")
        ids[b, :n] = e.input_ids
        mask[b, :n] = 1
        labels[b, :n] = e.labels
    pix = [e.pixel_values for e in kept if e.image_num]
    shapes = {p.shape[1:] for p in pix}
    if len(shapes) > 1:
        raise ValueError(f"images of different shapes in one batch: {sorted(shapes)}")
    if pix:
        images = np.concatenate(pix, axis=0).astype(np.float32, copy=False)
    else:
        images = np.zeros((0, *(image_shape or (3, 0, 0))), dtype=np.float32)
    return Batch(input_ids=ids, attention_mask=mask, labels=labels, images=images,
                 image_num=np.asarray([e.image_num for e in kept], dtype=np.int64),
                 origins=tuple(e.origin for e in kept), dropped=dropped)
