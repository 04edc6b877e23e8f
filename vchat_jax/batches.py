"""The JAX trainer's batches: a collated `vchat.data.Batch` planned (vchat/splice.py) and padded to
bucketed shapes for the jitted step, and one epoch of this process's batches. vchat_torch/batches.py
is the torch twin."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from vchat.config import ModelConfig
from vchat.data import Batch, EncodedDataset, iterate_batches
from vchat.splice import order_for, plan_splice

BATCH_KEYS = ("images", "ids", "image_index", "modality", "position_ids", "labels")


def plan_batch(config: ModelConfig, batch, seq_multiple: int = 64, seq_len: int | None = None,
               images_per_sample: int | None = None) -> dict[str, np.ndarray]:
    """A collated `vchat.data.Batch` -> the model's planned arrays (vchat/splice.py), padded.

    The spliced length L rounds up to a multiple of `seq_multiple` (or is `seq_len`, fixed); the images
    (N, 3, H, W) are padded with zero images to B * `images_per_sample` (fixed) or else to B times the
    next power of two of ceil(N / B), so N is a multiple of the batch size. Padding images are never
    referenced by `image_index`; padding positions have modality 0 and label -100."""
    a = batch.arrays() if hasattr(batch, "arrays") else batch
    ids = np.asarray(a["input_ids"])
    B = ids.shape[0]
    p = plan_splice(ids, np.asarray(a["attention_mask"]), np.asarray(a["image_num"]), config.image_tokens,
                    config.image_token_id, config.pad_token_id, labels=np.asarray(a["labels"]),
                    order=order_for(config.compat), pad_multiple=seq_len or seq_multiple)
    if seq_len is not None and p.ids.shape[1] != seq_len:
        raise ValueError(f"a batch spliced to {p.ids.shape[1]} positions does not fit seq_len {seq_len}")
    images = np.asarray(a["images"], np.float32)
    n = images.shape[0]
    if images_per_sample is not None:
        if n > B * images_per_sample:
            raise ValueError(f"{n} images exceed {images_per_sample} per sample x batch {B}")
        n_pad = B * images_per_sample
    else:
        n_pad = B * (1 << max(0, math.ceil(max(n, 1) / B) - 1).bit_length())
    c = config.vision
    full = np.zeros((n_pad, c.num_channels, c.image_size, c.image_size), np.float32)
    full[:n] = images
    return {"images": full, "ids": p.ids.astype(np.int32), "image_index": p.image_index.astype(np.int32),
            "modality": p.modality.astype(np.int32), "position_ids": p.position_ids.astype(np.int32),
            "labels": p.labels.astype(np.int32)}


def epoch_batches(data: EncodedDataset, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  skip: int = 0) -> Iterator[Batch]:
    """Process `rank` of `world`'s batches of one epoch (drop_last), the first `skip` not built."""
    for i, batch in enumerate(iterate_batches(data, batch_size, seed=seed, epoch=epoch, drop_last=True, rank=rank,
                                              world_size=world)):
        if i >= skip:
            yield batch
