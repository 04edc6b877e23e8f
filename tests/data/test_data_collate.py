"""Collation into numpy batches, the batch iterator, and the splice plan taking the batch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from data_helpers import EOS, IMG, toy_tokenizer, write_cgd_tree
from vchat.data import (Budget, Dropped, EncodedDataset, Example, ImageProcessor, Sample, SyntheticDataset, Turn,
                        collate, iterate_batches, synthetic_text_tokenizer)
from vchat.splice import plan_splice


def ex(ids, labels, n_images, value=0.0, origin="?"):
    return Example(np.asarray(ids, np.int64), np.asarray(labels, np.int64),
                   np.full((n_images, 3, 2, 2), value, np.float32), origin)


def test_collate_pads_and_concatenates_in_sample_order():
    a = ex([1, 5, IMG, 6, 2], [-100, -100, -100, 6, 2], 1, value=1.0, origin="a")
    b = ex([1, IMG, IMG, 7, 8, 9, 2], [-100, -100, -100, -100, 8, 9, 2], 2, value=2.0, origin="b")
    c = ex([1, 3, 2], [-100, 3, 2], 0, origin="c")
    batch = collate([a, Dropped("d", "too_long"), b, c], pad_id=EOS, image_shape=(3, 2, 2))
    assert batch.input_ids.tolist() == [[1, 5, IMG, 6, 2, 2, 2], [1, IMG, IMG, 7, 8, 9, 2], [1, 3, 2, 2, 2, 2, 2]]
    assert batch.attention_mask.tolist() == [[1] * 5 + [0] * 2, [1] * 7, [1] * 3 + [0] * 4]
    assert batch.labels.tolist() == [[-100, -100, -100, 6, 2, -100, -100], [-100] * 4 + [8, 9, 2],
                                     [-100, 3, 2] + [-100] * 4]
    assert batch.images.shape == (3, 3, 2, 2) and batch.images.dtype == np.float32
    assert batch.images[:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]
    assert batch.image_num.tolist() == [1, 2, 0] and batch.dropped == 1 and batch.origins == ("a", "b", "c")
    assert set(batch.arrays()) == {"input_ids", "attention_mask", "labels", "images", "image_num"}
    assert collate([a], EOS, pad_multiple=8).input_ids.shape == (1, 8)
    assert collate([c], EOS, image_shape=(3, 2, 2)).images.shape == (0, 3, 2, 2)
    assert collate([Dropped("x", "too_long")], EOS) is None


def test_plan_splice_accepts_the_batch():
    tok = synthetic_text_tokenizer()
    data = EncodedDataset(SyntheticDataset(12, seed=1), tok, ImageProcessor.clip(32),
                          Budget(max_seq_len=600, image_tokens=17))
    batch = next(iterate_batches(data, 4, seed=0))
    plan = plan_splice(batch.input_ids, batch.attention_mask, batch.image_num, 17, tok.image_id, tok.pad_id,
                       labels=batch.labels)
    assert plan.shape[0] == 4
    assert (plan.modality == 2).sum() == 17 * batch.image_num.sum() == 17 * len(batch.images)
    # every supervised label survives the splice, images and padding stay unsupervised
    assert sorted(plan.labels[plan.labels != -100].tolist()) == sorted(batch.labels[batch.labels != -100].tolist())
    assert (plan.labels[plan.modality != 1] == -100).all()
    assert batch.images.shape[1:] == (3, 32, 32)


def test_a_reader_is_a_source(tmp_path):
    from vchat.data import make_reader

    write_cgd_tree(str(tmp_path))
    reader = make_reader("otter_mimicit_cgd", str(tmp_path))
    data = EncodedDataset(reader, toy_tokenizer(), ImageProcessor.clip(4), Budget(image_tokens=5))
    batch = data.collate([data[0], data[1]])
    assert batch.image_num.tolist() == [2, 2] and batch.images.shape == (4, 3, 4, 4)
    assert (batch.input_ids == IMG).sum() == 4


def test_iterate_batches_refills_past_dropped_samples():
    tok = toy_tokenizer()
    long_q = " ".join(["w"] * 50)
    samples = [Sample((Turn((), long_q if i % 3 == 0 else f"q{i}", "a"),), origin=f"s[{i}]") for i in range(10)]
    data = EncodedDataset(samples, tok, ImageProcessor.clip(4), Budget(max_seq_len=40, image_tokens=4))
    batches = list(iterate_batches(data, 3, shuffle=False))
    assert [len(b) for b in batches] == [3, 3]  # 10 samples, 4 too long (0, 3, 6, 9)
    assert [b.dropped for b in batches] == [2, 1] and batches[0].origins == ("s[1]", "s[2]", "s[4]")
    assert sum(b.dropped for b in iterate_batches(data, 3, shuffle=False, drop_last=True)) == 3
    # seeded order per epoch, and sharding by rank covers each sample once
    e0 = [o for b in iterate_batches(data, 2, seed=3, epoch=0) for o in b.origins]
    assert e0 == [o for b in iterate_batches(data, 2, seed=3, epoch=0) for o in b.origins]
    assert e0 != [o for b in iterate_batches(data, 2, seed=3, epoch=1) for o in b.origins]
    ranks = [[o for b in iterate_batches(data, 1, seed=3, rank=r, world_size=2) for o in b.origins] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(e0) and not set(ranks[0]) & set(ranks[1])


def test_reference_numbering_picks_token_level_for_vqa_datasets():
    tok = toy_tokenizer(prefix_first=True)
    s = Sample((Turn(("a", "b"), "Q?", "A"),), origin="llava[0+1]")
    o = Sample((Turn(("a", "b"), "Q?", "A"),), origin="otter_mimicit_cgd[0]")

    class Proc(ImageProcessor):
        def __call__(self, image, where="?"):
            return np.zeros(self.shape, np.float32)

    data = EncodedDataset([s, o], tok, Proc(size=2, crop_size=2), numbering="reference")
    words = [tok.decode(data[i].input_ids).split() for i in (0, 1)]
    assert words[0].count("_###") == 2 and words[1].count("_###") == 0
    with pytest.raises(ValueError, match="numbering must be one of"):
        EncodedDataset([s], tok, Proc(size=2, crop_size=2), numbering="x")


def test_vchat_data_imports_no_framework():
    code = ("import sys, vchat.data; from vchat.data import *; synthetic_text_tokenizer(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'flax', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dump_samples(tmp_path):
    from vchat.data.pipeline import dump_samples

    files = dump_samples(SyntheticDataset(3, seed=2), str(tmp_path / "debug"), n=2)
    first, second = SyntheticDataset(3, seed=2)[0], SyntheticDataset(3, seed=2)[1]
    assert files[0].endswith("sample0.txt") and len(files) == 2 + first.num_images + second.num_images
    text = (tmp_path / "debug" / "sample0.txt").read_text()
    assert text.startswith("# synthetic[0]\nYou are a helpful") and first.turns[0].question in text
