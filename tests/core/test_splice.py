import numpy as np
import pytest

from vchat.golden import load_case
from vchat.splice import plan_splice, positions_from_modality

IMG, PAD = 95, 2


def test_docstring_example_reverse_and_natural():
    ids = np.array([[1, 10, IMG, 11, IMG]])
    kw = dict(image_tokens=2, image_token_id=IMG, pad_token_id=PAD)
    rev = plan_splice(ids, np.ones_like(ids), [2], order="reverse", **kw)
    # source: BOS a Y0 Y1 b X0 X1 pad   (image 0 = X goes to the LAST slot)
    assert rev.modality.tolist() == [[1, 1, 2, 2, 1, 2, 2, 0]]
    assert rev.image_index.tolist() == [[-1, -1, 2, 3, -1, 0, 1, -1]]
    assert rev.ids.tolist() == [[1, 10, PAD, PAD, 11, PAD, PAD, PAD]]
    nat = plan_splice(ids, np.ones_like(ids), [2], order="natural", **kw)
    assert nat.image_index.tolist() == [[-1, -1, 0, 1, -1, 2, 3, -1]]
    assert nat.position_ids.tolist() == [list(range(8))]
    assert nat.lengths.tolist() == [7]


def test_batch_offsets_labels_and_text_only():
    ids = np.array([[1, IMG, 5, 6], [1, 7, 8, 9], [1, IMG, IMG, 3]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    labels = np.array([[-100, -100, 5, -100], [-100, 7, 8, 9], [-100, -100, -100, 3]])
    p = plan_splice(ids, mask, [1, 0, 2], image_tokens=3, image_token_id=IMG, pad_token_id=PAD, labels=labels,
                    order="natural", pad_multiple=1)
    assert p.shape == (3, 8)
    # sample 0: BOS, img0 x3, 5, 6(pad in input), then batch padding
    assert p.modality[0].tolist() == [1, 2, 2, 2, 1, 0, 0, 0]
    assert p.labels[0].tolist() == [-100, -100, -100, -100, 5, -100, -100, -100]
    # sample 1 is text only: kept as is
    assert p.modality[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and p.labels[1, :4].tolist() == [-100, 7, 8, 9]
    # sample 2 holds images 1 and 2 of the batch (features rows 3..8)
    assert p.image_index[2, 1:7].tolist() == [3, 4, 5, 6, 7, 8]
    assert p.lengths.tolist() == [6, 4, 8]


def test_left_padding_and_generation_positions():
    ids = np.array([[2, 2, 1, IMG, 4], [1, IMG, 5, IMG, 7]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    p = plan_splice(ids, mask, [1, 2], image_tokens=2, image_token_id=IMG, pad_token_id=PAD, pad_multiple=1,
                    positions="cumsum", pad_side="left")
    assert p.modality.tolist() == [[0, 0, 0, 1, 2, 2, 1], [1, 2, 2, 1, 2, 2, 1]]
    assert p.position_ids.tolist() == [[1, 1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]
    assert positions_from_modality(np.array([[0, 1, 2, 0, 1]])).tolist() == [[1, 0, 1, 1, 2]]


def test_errors_name_the_sample():
    ids = np.array([[1, IMG], [1, 4]])
    with pytest.raises(ValueError, match=r"sample 1: 0 <image> tokens but image_num\[1\] = 1"):
        plan_splice(ids, np.ones_like(ids), [1, 1], 2, IMG, PAD)
    with pytest.raises(ValueError, match="sample 0: an <image> token sits at a padding position"):
        plan_splice(ids, np.array([[1, 0], [1, 1]]), [1, 0], 2, IMG, PAD)
    with pytest.raises(ValueError, match="image_num has 1 entries for a batch of 2"):
        plan_splice(ids, np.ones_like(ids), [1], 2, IMG, PAD)


def test_golden_layouts_match_the_reference(golden_dir):
    """The plan's modality layout equals the mask the reference's decoder received."""
    for case_name, tokens in [("baseline-mmca", 17), ("perceiver-mmca", 256), ("qwen-mmca", 16)]:
        _, case = load_case(f"{golden_dir}/{case_name}")
        p = plan_splice(case["input_ids"], case["attention_mask"], case["image_num"], tokens, 95, 2,
                        labels=case["labels"], order="reverse", pad_multiple=8)
        np.testing.assert_array_equal(p.modality, case["spliced_mask"].astype(np.int64))
        assert (p.labels != -100).sum() == (case["labels"] != -100).sum()
