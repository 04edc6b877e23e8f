"""From samples to batches: the dataset a trainer indexes and a batch iterator.

Mirrors the reference's `DataLoader(..., collate_fn=DataCollatorPadToMaxLen)` over the split
mixture (`training/main.py`). `EncodedDataset` is an index-able dataset (a torch `DataLoader` with a
`DistributedSampler` can take it directly, with `collate_fn=dataset.collate`); `iterate_batches` is
the framework-free loader the JAX trainer uses: a seeded per-epoch order (fixes B8), sharded by
rank, refilling batches past samples the budget drops.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from vchat.data.collate import Batch, Example, collate
from vchat.data.encode import Budget, Dropped, encode_sample, render_turns
from vchat.data.preprocess import ImageProcessor
from vchat.data.readers import TOKEN_NUMBERED
from vchat.data.sample import open_image, stable_seed
from vchat.data.tokenizer import TextTokenizer

NUMBERING_MODES = ("text", "token", "reference")


class EncodedDataset:
    """`dataset[i]` -> `Example` (ids, labels, pixels) or `Dropped`.

    numbering: "text" (default), "token", or "reference" (token-level for the reference's VQA-path
    datasets, text-level for the others, as the reference mixes them).
    """

    def __init__(self, source, tokenizer: TextTokenizer, processor: ImageProcessor, budget: Budget = Budget(),
                 numbering: str = "text"):
        if numbering not in NUMBERING_MODES:
            raise ValueError(f"numbering must be one of {NUMBERING_MODES}, got {numbering!r}")
        self.source, self.tokenizer, self.processor = source, tokenizer, processor
        self.budget, self.numbering = budget, numbering

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def _numbering(self, origin: str) -> str:
        if self.numbering != "reference":
            return self.numbering
        return "token" if origin.split("[", 1)[0] in TOKEN_NUMBERED else "text"

    def __getitem__(self, i: int) -> Example | Dropped:
        sample = self.source[i]
        enc = encode_sample(sample, self.tokenizer, self.budget, self._numbering(sample.origin))
        if isinstance(enc, Dropped):
            return enc
        pixels = self.processor.batch(enc.images, where=enc.origin)
        return Example(enc.input_ids, enc.labels, pixels, enc.origin)

    def collate(self, examples: list, pad_multiple: int = 1) -> Batch | None:
        return collate(examples, self.tokenizer.pad_id, self.processor.shape, pad_multiple)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(stable_seed(seed, "epoch", epoch)).permutation(n)


def iterate_batches(dataset: EncodedDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                    epoch: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                    pad_multiple: int = 1, verbose: bool = False) -> Iterator[Batch]:
    """Batches of `batch_size` kept samples for one epoch; this rank sees every `world_size`-th
    index of the epoch's order. Dropped samples are skipped; each batch counts them in `dropped`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset.set_epoch(epoch)
    order = epoch_order(len(dataset), seed, epoch, shuffle)[rank::world_size]
    pending, dropped, total_dropped = [], 0, 0
    for i in order:
        ex = dataset[int(i)]
        if isinstance(ex, Dropped):
            dropped += 1
            total_dropped += 1
            if verbose:
                print(f"[data] dropped {ex.origin}: {ex.reason}")
            continue
        pending.append(ex)
        if len(pending) == batch_size:
            batch = dataset.collate(pending, pad_multiple)
            yield dataclasses.replace(batch, dropped=dropped)
            pending, dropped = [], 0
    if pending and not drop_last:
        batch = dataset.collate(pending, pad_multiple)
        yield dataclasses.replace(batch, dropped=dropped)
    if verbose and total_dropped:
        print(f"[data] epoch {epoch}: {total_dropped} samples dropped by the budget")


def dump_samples(source, directory: str, n: int = 10, numbering: str = "text") -> list[str]:
    """Write the first `n` samples' prompt text and images for inspection (the reference's
    `--data_debug_path`, which dumps 10 per rank): `sample{i}.txt` and `sample{i}_image{k}.png`.
    Returns the files written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for i in range(min(n, len(source))):
        s = source[i]
        path = os.path.join(directory, f"sample{i}.txt")
        with open(path, "w") as f:
            f.write(f"# {s.origin}\n")
            for instruction, answer in render_turns(s, "text" if numbering == "reference" else numbering):
                f.write(f"{instruction}{answer if answer is not None else ''}</s>\n")
        written.append(path)
        for k, im in enumerate(s.images):
            path = os.path.join(directory, f"sample{i}_image{k + 1}.png")
            open_image(im, s.origin).save(path)
            written.append(path)
    return written


def build_training_data(args, cfg, verbose: bool = True, model_tokenizer=None,
                        processor=None) -> tuple[EncodedDataset, EncodedDataset, str]:
    """(train, eval) datasets and the tokenizer's JSON from the trainers' flags (`vchat train` and
    `vchat train-jax` share them): data_path, dataset_names, dataset_samples,
    dataset_concatenate_samples, max_num_image_per_sample, data_train_split_ratio, max_seq_len, seed,
    synthetic_samples, skip_missing_images, tokenizer. `synthetic` alone, not on disk under data_path,
    is generated. `model_tokenizer` (a TextTokenizer over a `tokenizers` backend: what `from_hf` gives
    a model built from Hugging Face directories) is used when --tokenizer is not given, `processor` (the
    vision directory's preprocessing) instead of the tower's default."""
    import os

    from vchat.data.mix import build_mixture, split_train_eval
    from vchat.data.synthetic import (MAX_SAMPLE_IMAGES, SyntheticDataset, build_synthetic_tokenizer,
                                      synthetic_text_tokenizer)

    synthetic = list(args.dataset_names) == ["synthetic"]
    if synthetic and not os.path.exists(os.path.join(args.data_path, "synthetic")):
        max_images = min(MAX_SAMPLE_IMAGES, args.max_num_image_per_sample)
        source = SyntheticDataset(args.synthetic_samples, seed=args.seed, image_size=cfg.vision.image_size,
                                  max_images=max_images)
        if verbose:
            print(f"[data] synthetic: {len(source)} samples of 1-{max_images} images generated from seed "
                  f"{args.seed}", flush=True)
    else:
        source = build_mixture(args.data_path, args.dataset_names, args.dataset_samples,
                               args.dataset_concatenate_samples, args.max_num_image_per_sample, seed=args.seed,
                               verbose=verbose, skip_missing_images=args.skip_missing_images)
    if len(source) == 0:
        raise SystemExit(f"the datasets {args.dataset_names} under {args.data_path} hold no sample")
    train, evaluate = split_train_eval(source, args.data_train_split_ratio, seed=args.seed)
    if args.tokenizer:  # the ids come from the model: a tokenizer need not name them "<s>" / "</s>"
        tok = TextTokenizer.from_file(args.tokenizer, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id,
                                      pad_id=cfg.pad_token_id, image_id=cfg.image_token_id,
                                      image_pretoken_id=cfg.image_pretoken_id)
        with open(args.tokenizer) as f:
            tok_json = f.read()
    elif model_tokenizer is not None:
        tok, tok_json = model_tokenizer, model_tokenizer.backend.to_str()
    elif synthetic:
        tok, tok_json = synthetic_text_tokenizer(), build_synthetic_tokenizer().to_str()
    else:
        raise SystemExit("--tokenizer is required (a tokenizer.json with the reference's special tokens)")
    if tok.image_id != cfg.image_token_id or tok.pad_id != cfg.pad_token_id:
        raise SystemExit(f"tokenizer ids (<image> {tok.image_id}, pad {tok.pad_id}) differ from the model's "
                         f"(<image> {cfg.image_token_id}, pad {cfg.pad_token_id})")
    budget = Budget(args.max_seq_len, cfg.image_tokens, args.max_num_image_per_sample)
    proc = processor or ImageProcessor.for_vision(cfg.vision)
    return EncodedDataset(train, tok, proc, budget), EncodedDataset(evaluate, tok, proc, budget), tok_json
