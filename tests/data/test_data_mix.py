"""Concatenation, per-dataset subsampling, the mixture, shuffle and split: determinism by seed."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_helpers import SYS, write_blend_tree, write_cgd_tree
from vchat.data import (DataError, GroupedDataset, Mixture, Sample, Turn, build_mixture, make_reader,
                        random_grouping, render_turns, split_train_eval)
from vchat.data.mix import broadcast_flag
from vchat.data.readers.base import Reader


class Counting(Reader):
    """Sample i has one image "img{i}", question "q{i}" and an answer drawn from the rng."""

    name = "counting"

    def __init__(self, n: int):
        super().__init__("")
        self.items = list(range(n))

    def sample(self, index: int, rng: random.Random) -> Sample:
        return Sample((Turn((f"img{index}",), f"q{index}", f"a{rng.randrange(10**6)}"),), origin=self.origin(index))


def test_random_grouping_partitions_by_seed():
    a = random_grouping(50, 3, np.random.default_rng(7))
    b = random_grouping(50, 3, np.random.default_rng(7))
    c = random_grouping(50, 3, np.random.default_rng(8))
    assert a == b and a != c
    assert sorted(i for g in a for i in g) == list(range(50))
    assert all(1 <= len(g) <= 3 for g in a) and {len(g) for g in a[:-1]} == {1, 2, 3}
    assert [len(g) for g in random_grouping(5, 1, np.random.default_rng(0))] == [1] * 5
    with pytest.raises(ValueError, match=">= 1"):
        random_grouping(5, 0, np.random.default_rng(0))


def test_concatenated_sample_joins_turns():
    reader = Counting(10)
    ds = GroupedDataset(reader, [[3, 7, 1]], seed=5)
    s = ds[0]
    assert [t.question for t in s.turns] == ["q3", "q7", "q1"] and s.images == ["img3", "img7", "img1"]
    assert s.origin == "counting[3+7+1]"
    texts = render_turns(s)
    assert texts[0][0] == SYS + "### Image 1:\n<image>\n\n### Question:\nq3\n\n### Answer:\n"
    assert texts[1][0] == "### Image 2:\n<image>\n\n### Question:\nq7\n\n### Answer:\n"
    assert texts[2][0] == "### Image 3:\n<image>\n\n### Question:\nq1\n\n### Answer:\n"
    # the same draw for the same (seed, epoch); a new draw for a new epoch
    assert ds.get(0) == ds.get(0) and ds.get(0, epoch=1) != ds.get(0)
    assert GroupedDataset(reader, [[3, 7, 1]], seed=6).get(0) != s


def test_concatenation_works_for_multi_turn_datasets(tmp_path):
    """The reference keeps only the first member of a group for otter/sparkles/blend (B12); here both
    CGD samples are joined: 2 + 2 images numbered 1..4, one system prompt."""
    root = str(tmp_path)
    write_cgd_tree(root)
    reader = make_reader("otter_mimicit_cgd", root)
    s = GroupedDataset(reader, [[0, 1]])[0]
    texts = render_turns(s)
    assert len(s.images) == 4 and len(texts) == 3
    assert sum(t.count("You are a helpful") for t, _ in texts) == 1
    assert texts[2][0] == ("### Image 3:\n<image>\n### Image 4:\n<image>\n\n### Question:\nSame place?"
                           "\n\n### Answer:\n")


def test_build_mixture_samples_and_concatenation(tmp_path, capsys):
    root = str(tmp_path)
    write_cgd_tree(root)
    write_blend_tree(root)  # shares coco/train2017; adds llava files and its own CGD file (overwrites the first)
    mix = build_mixture(root, ["llava_dial", "otter_mimicit_cgd", "llava_otter_blend"], ["all", 1, "all"], [1], seed=3)
    assert [len(p) for p in mix.parts] == [1, 1, 1] and len(mix) == 3
    assert "[data] otter_mimicit_cgd: 1 samples from 2 annotations" in capsys.readouterr().out
    assert mix.locate(2) == (2, 0) and mix[0].origin == "llava_dial[0]"
    again = build_mixture(root, ["llava_dial", "otter_mimicit_cgd", "llava_otter_blend"], ["all", 1, "all"], [1],
                          seed=3, verbose=False)
    assert [again[i] for i in range(3)] == [mix[i] for i in range(3)]
    k3 = build_mixture(root, ["otter_mimicit_cgd"], dataset_concatenate_samples=[3], seed=0, verbose=False)
    assert len(k3) in (1, 2) and sum(s.num_images for s in (k3[i] for i in range(len(k3)))) == 4


def test_flag_broadcasting_and_errors(tmp_path):
    assert broadcast_flag(["all"], 3, "f") == ["all"] * 3
    with pytest.raises(ValueError, match="dataset_samples: give one value or one per dataset \\(3\\), got 2"):
        build_mixture(str(tmp_path), ["a", "b", "c"], [1, 2])
    with pytest.raises(ValueError, match="unknown dataset 'nope'; known datasets:"):
        build_mixture(str(tmp_path), ["nope"])
    with pytest.raises(DataError, match="no dataset named"):
        build_mixture(str(tmp_path), [])
    with pytest.raises(DataError, match="mixture is empty"):
        Mixture([])


def test_split_matches_reference_shuffle():
    data = list(range(23))
    train, evaluate = split_train_eval(data, 0.9, seed=1234)
    perm = np.random.RandomState(1234).permutation(23)  # the reference: RandomState(seed).shuffle(arange)
    assert [train[i] for i in range(len(train))] == perm[:20].tolist()
    assert [evaluate[i] for i in range(len(evaluate))] == perm[20:].tolist()
    other, _ = split_train_eval(data, 0.9, seed=1)
    assert [other[i] for i in range(20)] != [train[i] for i in range(20)]


def test_blend_is_deterministic_by_seed(tmp_path):
    root = str(tmp_path)
    write_blend_tree(root, extra_llava_for_last=True)
    reader = make_reader("llava_otter_blend", root)
    draws = [render_turns(reader.get(0, seed=s)) for s in range(12)]
    assert draws == [render_turns(reader.get(0, seed=s)) for s in range(12)]
    assert len({tuple(d) for d in draws}) > 1
