"""The torch trainer's batches: a fixed count of them per epoch on every rank (ZeRO's collectives need
the same count), as tensors on the engine's device. vchat_jax/batches.py is the JAX twin."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vchat.data import Batch, EncodedDataset, iterate_batches


def fixed_batches(data: EncodedDataset, n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  shuffle: bool = True, skip: int = 0) -> Iterator[Batch]:
    """Exactly n batches on every rank, the epoch's order repeated if samples dropped by the budget
    leave a rank short; the first `skip` are not built."""
    done, rounds = 0, 0
    while done < n:
        for batch in iterate_batches(data, batch_size, shuffle=shuffle, seed=seed + rounds, epoch=epoch,
                                     drop_last=True, rank=rank, world_size=world):
            if done >= n:
                return
            done += 1
            if done > skip:
                yield batch
        rounds += 1
        if rounds > 100:
            raise RuntimeError("the data budget drops almost every sample; raise --max_seq_len")


def to_device(batch: Batch, device) -> dict:
    """The model's keyword arguments for a collated batch (images None when it has none)."""
    a = batch.arrays()
    return {"images": torch.from_numpy(a["images"]).to(device) if a["images"].shape[0] else None,
            "input_ids": torch.from_numpy(a["input_ids"]).to(device),
            "attention_mask": torch.from_numpy(a["attention_mask"]).to(device),
            "labels": torch.from_numpy(a["labels"]).to(device),
            "image_num": a["image_num"]}
