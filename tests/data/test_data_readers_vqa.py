"""The single-image readers on fixture trees in the reference's on-disk layout."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_helpers import SYS, ToyTokenizer, supervised, toy_tokenizer, write_image, write_json
from vchat.data import Budget, DataError, TextTokenizer, concat_samples, encode_sample, make_reader, render_turns

Q1 = "### Image 1:\n<image>\n\n### Question:\n"
ANS = "\n\n### Answer:\n"


def supervised_text(enc, tok_raw: ToyTokenizer) -> str:
    return tok_raw.decode(enc.input_ids[enc.labels != -100])


def encode(sample, raw: ToyTokenizer | None = None, **kw):
    raw = raw or ToyTokenizer()
    tok = TextTokenizer.wrap(raw, bos_id=1, eos_id=2, pad_id=2, image_id=4, image_pretoken_id=3)
    return encode_sample(sample, tok, Budget(max_seq_len=4096, image_tokens=5), **kw), raw


def test_aokvqa(tmp_path):
    root = str(tmp_path)
    img = write_image(f"{root}/coco/train2017/000000000042.jpg")
    write_json(f"{root}/aokvqa/annotations/aokvqa_v1p0_train.json", [{
        "question_id": "q1", "image_id": 42, "question": "What is the man holding?",
        "choices": ["a cat", "an umbrella", "a phone", "a cup"], "correct_choice_idx": 1,
        "direct_answers": ["umbrella"] * 10, "rationales": ["It is raining.", "He stays dry."]}])
    reader = make_reader("aokvqa", root, prompts=("Why?",))
    s = reader.get(0)
    assert s.turns[0].images == (img,)
    assert render_turns(s) == [(SYS + Q1 + "What is the man holding? Why?" + ANS,
                                "The answer is an umbrella. Because It is raining. He stays dry.")]
    enc, raw = encode(s)
    assert supervised_text(enc, raw) == "The answer is an umbrella. Because It is raining. He stays dry. </s>"
    # BOS + every instruction word + the <image> id are masked
    n_instr = 1 + len((SYS + Q1 + "What is the man holding? Why?" + ANS).replace("<image>", " <image> ").split())
    assert (enc.labels[:n_instr] == -100).all() and (enc.labels[n_instr:] != -100).all()


def test_coco_caption_and_split_filter(tmp_path):
    root = str(tmp_path)
    write_image(f"{root}/coco/2014/COCO_val2014_000000000001.jpg")
    write_image(f"{root}/coco/2014/COCO_train2014_000000000002.jpg")
    write_json(f"{root}/coco_caption/dataset.json", {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "split": "test",
         "sentences": [{"raw": "A dog on a sofa."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000002.jpg", "split": "train",
         "sentences": [{"raw": "Two birds."}, {"raw": "Birds on a wire."}]}]})
    reader = make_reader("coco_caption", root, prompts=("Describe it.",))
    assert len(reader) == 2  # every split, as the reference (B26)
    s = reader.get(0)
    assert s.turns[0].images == (f"{root}/coco/2014/COCO_val2014_000000000001.jpg",)
    assert render_turns(s) == [(SYS + Q1 + "Describe it." + ANS, "A dog on a sofa.")]
    assert supervised(s) == "A dog on a sofa. </s>"
    answers = {reader.get(1, seed=seed).turns[0].answer for seed in range(20)}
    assert answers == {"Two birds.", "Birds on a wire."}
    assert len(make_reader("coco_caption", root, splits=("train",))) == 1


def test_minigpt4(tmp_path):
    root = str(tmp_path)
    write_image(f"{root}/cc_sbu_align/image/7.jpg")
    write_json(f"{root}/cc_sbu_align/filter_cap.json", {"annotations": [{"image_id": "7", "caption": "A red car."}]})
    s = make_reader("minigpt4", root, prompts=("What is this?",)).get(0)
    assert s.turns[0].images == (f"{root}/cc_sbu_align/image/7.jpg",)
    assert render_turns(s) == [(SYS + Q1 + "What is this?" + ANS, "A red car.")]
    assert supervised(s) == "A red car. </s>"


def _llava_files(root):
    write_image(f"{root}/coco/train2017/000000000001.jpg")
    write_image(f"{root}/coco/train2017/000000000002.jpg")
    write_json(f"{root}/llava/detail_23k.json", [{"id": "1", "image": "000000000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the\nscene."}, {"from": "gpt", "value": "A kitchen."}]}])
    write_json(f"{root}/llava/complex_reasoning_77k.json", [{"id": "2", "image": "000000000002.jpg", "conversations": [
        {"from": "human", "value": "Why is it wet?\n<image>"}, {"from": "gpt", "value": "Rain."}]}])
    write_json(f"{root}/llava/conversation_58k.json", [{"id": "3", "image": "000000000001.jpg", "conversations": [
        {"from": "human", "value": "What room is it?"}, {"from": "gpt", "value": "A kitchen."},
        {"from": "human", "value": "<image>\nWhat colour is the fridge?"}, {"from": "gpt", "value": "White."},
        {"from": "human", "value": "Is it <image> clean?"}, {"from": "gpt", "value": "Yes."}]}])


def test_llava(tmp_path):
    root = str(tmp_path)
    _llava_files(root)
    reader = make_reader("llava", root)
    assert len(reader) == 2  # detail + complex reasoning
    s = reader.get(0)
    assert s.turns[0].images == (f"{root}/coco/train2017/000000000001.jpg",)
    # <image> and every newline leave the question
    assert render_turns(s) == [(SYS + Q1 + "Describe thescene." + ANS, "A kitchen.")]
    assert supervised(s) == supervised(s, numbering="token") == "A kitchen. </s>"
    assert render_turns(reader.get(1))[0][0].endswith("### Question:\nWhy is it wet?" + ANS)


def test_llava_dial(tmp_path):
    root = str(tmp_path)
    _llava_files(root)
    s = make_reader("llava_dial", root).get(0)
    assert [len(t.images) for t in s.turns] == [0, 1, 0]  # only the first turn with <image> shows it
    assert render_turns(s) == [
        (SYS + "### Question:\nWhat room is it?" + ANS, "A kitchen."),
        (Q1 + "What colour is the fridge?" + ANS, "White."),
        ("### Question:\nIs it  clean?" + ANS, "Yes."),
    ]
    enc, raw = encode(s)
    assert supervised_text(enc, raw) == supervised(s) == "A kitchen. </s> White. </s> Yes. </s>"
    assert list(enc.input_ids).count(1) == 3  # each turn starts with BOS


def test_ocr_vqa_drops_degenerate_images(tmp_path):
    root = str(tmp_path)
    write_image(f"{root}/OCR_VQA/images/111.jpg", size=(30, 40))
    write_image(f"{root}/OCR_VQA/images/222.gif", size=(1, 40))
    write_json(f"{root}/OCR_VQA/dataset.json", {
        "111": {"imageURL": "http://x/abc.jpg", "questions": ["Who wrote this book?", "Is this a novel?"],
                "answers": ["Ann Lee", "Yes"], "title": "T", "genre": "G", "split": 1},
        "222": {"imageURL": "http://x/def.gif", "questions": ["Q?"], "answers": ["A"], "title": "T", "genre": "G",
                "split": 1}})
    reader = make_reader("ocr_vqa", root)
    assert len(reader) == 1 and reader.skipped == {"image side <= 1": 1}
    pairs = {render_turns(reader.get(0, seed=s))[0] for s in range(20)}
    assert pairs == {(SYS + Q1 + "Who wrote this book?" + ANS, "Ann Lee"), (SYS + Q1 + "Is this a novel?" + ANS, "Yes")}
    assert reader.get(0).turns[0].images == (f"{root}/OCR_VQA/images/111.jpg",)
    assert supervised(reader.get(0, seed=0)) in ("Ann Lee </s>", "Yes </s>")


def test_missing_files_are_named(tmp_path):
    root = str(tmp_path)
    with pytest.raises(DataError, match=r"dataset llava: image directory .*coco/train2017 not found"):
        make_reader("llava", root)
    os.makedirs(f"{root}/coco/train2017")
    with pytest.raises(DataError, match=r"annotation file .*llava/detail_23k.json not found"):
        make_reader("llava", root)


def test_empty_dataset_is_an_error(tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/cc_sbu_align/image")
    write_json(f"{root}/cc_sbu_align/filter_cap.json", {"annotations": []})
    with pytest.raises(DataError, match=r"dataset minigpt4: no usable samples in .*filter_cap.json"):
        make_reader("minigpt4", root)


def test_unknown_dataset_lists_known(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'laion'; known datasets: aokvqa, coco_caption, .*sparkles"):
        make_reader("laion", str(tmp_path))


def test_malformed_annotation_names_sample(tmp_path):
    root = str(tmp_path)
    write_image(f"{root}/cc_sbu_align/image/7.jpg")
    write_json(f"{root}/cc_sbu_align/filter_cap.json", {"annotations": [{"image_id": "7"}]})
    with pytest.raises(DataError, match=r"minigpt4\[0\]: malformed annotation .*caption"):
        make_reader("minigpt4", root).get(0)


def test_token_numbering_matches_text_for_context_free_tokenizer(tmp_path):
    """With a tokenizer that splits "### Image 1:" the same alone and in context, the VQA readers'
    token-level numbering and text-level numbering give the same ids and labels."""
    root = str(tmp_path)
    _llava_files(root)
    reader = make_reader("llava", root)
    s = concat_samples([reader.get(0), reader.get(1)])
    raw = ToyTokenizer()
    a, _ = encode(s, raw, numbering="text")
    b, _ = encode(s, raw, numbering="token")
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_toy_tokenizer_wraps():
    tok = toy_tokenizer()
    assert tok.encode("### Image: <image>") == [3, 4]
