"""vchat.data: the framework-free data pipeline (numpy, PIL, `tokenizers`; no torch, no jax).

Mirrors the reference's `utils/data/` package and the data part of `training/main.py`:

    readers/      the 13 datasets by name (+ `synthetic` saved to disk)  utils/data/*_dataset.py
    mix.py        --dataset_samples, --dataset_concatenate_samples, shuffle and split  builder.py, DST.py
    encode.py     tokenisation, label masking, image numbering, length budget  vqa_dataset.py
    preprocess.py CLIP / Qwen image preprocessing  CLIPImageProcessor
    collate.py    numpy batches  utils/data/utils.py:DataCollatorPadToMaxLen
    pipeline.py   EncodedDataset and iterate_batches  the DataLoader of training/main.py
    synthetic.py  the built-in multi-image shapes dataset and its tokenizer (not in the reference)

Typical use (a trainer):

    mix = build_mixture(args.data_path, args.dataset_names, args.dataset_samples,
                        args.dataset_concatenate_samples, args.max_num_image_per_sample, seed=args.seed)
    train, evaluate = split_train_eval(mix, args.data_train_split_ratio, seed=args.seed)
    tok = TextTokenizer.from_file("tokenizer.json")
    data = EncodedDataset(train, tok, ImageProcessor.for_vision(cfg.vision),
                          Budget(args.max_seq_len, cfg.image_tokens, args.max_num_image_per_sample))
    for batch in iterate_batches(data, batch_size, seed=args.seed, epoch=epoch):
        plan = plan_splice(batch.input_ids, batch.attention_mask, batch.image_num, cfg.image_tokens,
                           tok.image_id, tok.pad_id, labels=batch.labels)
"""

from vchat.data.collate import Batch, Example, collate
from vchat.data.encode import Budget, Dropped, EncodedSample, encode_sample, render_turns, tokenize_turn
from vchat.data.mix import (GroupedDataset, Mixture, Subset, build_mixture, random_grouping, shuffle_indices,
                            split_train_eval)
from vchat.data.pipeline import EncodedDataset, dump_samples, iterate_batches
from vchat.data.preprocess import CLIP_MEAN, CLIP_STD, ImageProcessor
from vchat.data.readers import READERS, REFERENCE_DATASETS, make_reader
from vchat.data.sample import DataError, Sample, Turn, concat_samples, open_image
from vchat.data.synthetic import (SYNTH_IDS, SYNTH_VOCAB_SIZE, SyntheticDataset, build_synthetic_tokenizer,
                                  save_synthetic, synthetic_text_tokenizer)
from vchat.data.tokenizer import TextTokenizer

__all__ = [
    "Batch", "Budget", "CLIP_MEAN", "CLIP_STD", "DataError", "Dropped", "EncodedDataset", "EncodedSample",
    "Example", "GroupedDataset", "ImageProcessor", "Mixture", "READERS", "REFERENCE_DATASETS", "SYNTH_IDS",
    "SYNTH_VOCAB_SIZE", "Sample", "Subset", "SyntheticDataset", "TextTokenizer", "Turn", "build_mixture",
    "build_synthetic_tokenizer", "collate", "concat_samples", "dump_samples", "encode_sample", "iterate_batches", "make_reader",
    "open_image", "random_grouping", "render_turns", "save_synthetic", "shuffle_indices", "split_train_eval",
    "synthetic_text_tokenizer", "tokenize_turn",
]
