"""Tokenisation, label masking, image numbering and the length budget, on hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from data_helpers import BOS, EOS, IMG, PRE, ToyTokenizer, toy_tokenizer
from vchat.data import Budget, DataError, Dropped, Sample, TextTokenizer, Turn, encode_sample
from vchat.data.encode import tokenize_turn

X = -100


@pytest.fixture
def tok() -> TextTokenizer:
    return toy_tokenizer()


def two_turns() -> Sample:
    return Sample((Turn(("a.jpg",), "What is it?", "A cat."), Turn((), "Sure?", "Yes.")), origin="hand[0]")


def ids_of(raw: ToyTokenizer, words: list) -> list[int]:
    return [w if isinstance(w, int) else raw.vocab[w] for w in words]


def test_label_masking_hand_worked():
    raw = ToyTokenizer()
    tok = TextTokenizer.wrap(raw, bos_id=BOS, eos_id=EOS, pad_id=EOS, image_id=IMG, image_pretoken_id=PRE)
    enc = encode_sample(two_turns(), tok, Budget(max_seq_len=100, image_tokens=4), system=False)
    turn1 = [BOS, "###", "Image", "1:", IMG, "###", "Question:", "What", "is", "it?", "###", "Answer:",
             "A", "cat.", EOS]
    turn2 = [BOS, "###", "Question:", "Sure?", "###", "Answer:", "Yes.", EOS]
    assert enc.input_ids.tolist() == ids_of(raw, turn1 + turn2)
    assert enc.labels.tolist() == [X] * 12 + ids_of(raw, ["A", "cat.", EOS]) + [X] * 6 + ids_of(raw, ["Yes.", EOS])
    assert enc.input_ids.dtype == np.int64 and enc.images == ("a.jpg",)
    assert enc.spliced_length == 15 + 8 + 3


def test_unanswered_turn_is_not_supervised(tok):
    ids, labels = tokenize_turn(tok, "### Question:\nHi?\n\n### Answer:\n", None)
    assert ids[0] == BOS and EOS not in ids and labels == [X] * len(ids)


def test_reference_turn_truncation(tok):
    ids, labels = tokenize_turn(tok, "### Question:\nA B C D\n\n### Answer:\n", "E F G", max_tokens=5)
    assert len(ids) == 6 and ids[-1] == EOS  # truncated to 5, then EOS appended (vqa_dataset.tokenize)
    assert labels == [X] * 5 + [EOS]


def test_budget_drops_trailing_turns_and_long_samples(tok):
    # turn 1: 15 ids + 1 image of 10 tokens = 24 positions; turn 2: 8
    full = encode_sample(two_turns(), tok, Budget(max_seq_len=32, image_tokens=10), system=False)
    assert full.num_turns == 2 and full.dropped_turns == 0 and full.spliced_length == 32
    cut = encode_sample(two_turns(), tok, Budget(max_seq_len=31, image_tokens=10), system=False)
    assert cut.num_turns == 1 and cut.dropped_turns == 1 and len(cut.input_ids) == 15 and cut.spliced_length == 24
    assert encode_sample(two_turns(), tok, Budget(max_seq_len=23, image_tokens=10), system=False) == \
        Dropped("hand[0]", "too_long")


def test_budget_caps_images(tok):
    s = Sample((Turn(("a", "b"), "Q1?", "A1"), Turn(("c",), "Q2?", "A2")), origin="s[1]")
    enc = encode_sample(s, tok, Budget(max_num_image_per_sample=2))
    assert enc.num_turns == 1 and enc.images == ("a", "b")
    nine = Sample((Turn(tuple("abcdefghi"), "Q?", "A"),), origin="s[2]")
    assert encode_sample(nine, tok) == Dropped("s[2]", "too_many_images")
    with pytest.raises(ValueError, match="max_num_image_per_sample must be in 1..8"):
        Budget(max_num_image_per_sample=9)


def test_text_only_sample_is_kept(tok):
    enc = encode_sample(Sample((Turn((), "Hello?", "Hi."),)), tok)
    assert not isinstance(enc, Dropped) and enc.images == () and IMG not in enc.input_ids.tolist()


def test_image_count_mismatch_names_sample(tok):
    s = Sample((Turn(("a.jpg",), "Look <image> here", "ok"),), origin="llava[3]")
    with pytest.raises(DataError, match=r"llava\[3\] turn 0: 2 <image> tokens in the text but 1 images"):
        encode_sample(s, tok)


def test_token_level_numbering_uses_standalone_ids():
    """A SentencePiece-like tokenizer marks the first word of a text: the VQA readers' token-level
    numbering inserts "### Image k:" as tokenised alone ("_###"), text-level keeps "###"."""
    raw = ToyTokenizer(prefix_first=True)
    tok = TextTokenizer.wrap(raw, bos_id=BOS, eos_id=EOS, pad_id=EOS, image_id=IMG, image_pretoken_id=PRE)
    s = Sample((Turn(("a", "b"), "Q1?", "A1"), Turn((), "Q2?", "A2")), origin="x[0]")
    text = encode_sample(s, tok, numbering="text", system=False)
    token = encode_sample(s, tok, numbering="token", system=False)
    words = lambda e: raw.decode(e.input_ids).split()  # noqa: E731
    t2 = words(text).index("2:")
    assert words(text)[t2 - 2:t2 + 2] == ["###", "Image", "2:", "<image>"]
    k2 = words(token).index("2:")
    assert words(token)[k2 - 2:k2 + 2] == ["_###", "Image", "2:", "<image>"]
    # "_###": turn starts (2) plus, at the token level, the second image's label
    assert words(text).count("_###") == 2 and words(token).count("_###") == 3
    assert PRE not in token.input_ids.tolist()
    # labels: the inserted label ids are masked and the supervised text is the same
    assert raw.decode(token.input_ids[token.labels != X]) == raw.decode(text.input_ids[text.labels != X]) == \
        "A1 </s> A2 </s>"
    assert len(token.input_ids) == len(token.labels)


def test_tokenizer_must_have_single_special_ids():
    class Splits:
        def encode(self, text):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match=r"must encode '<image>' as the single id 4"):
        TextTokenizer.wrap(Splits(), bos_id=1, eos_id=2, image_id=4, image_pretoken_id=3)


def test_numbering_mode_is_checked(tok):
    with pytest.raises(ValueError, match="numbering must be one of"):
        encode_sample(two_turns(), tok, numbering="words")


def test_system_prompt_only_on_first_turn():
    tok = toy_tokenizer()
    enc = encode_sample(two_turns(), tok, Budget(max_seq_len=1000, image_tokens=1))
    text = tok.decode(enc.input_ids)
    assert text.count("You are a helpful") == 1 and text.startswith("<s> You are a helpful")


def test_tokenizer_pickles_for_loader_workers():
    import pickle

    from vchat.data import synthetic_text_tokenizer

    tok = synthetic_text_tokenizer()
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode("### Image 1:\n<image>") == tok.encode("### Image 1:\n<image>") == [16, 22, 18, 17, 95]
