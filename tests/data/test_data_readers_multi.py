"""The multi-image readers (MIMIC-IT/Otter, SparklesDialogue, the LLaVA-Otter blend) on fixture trees."""

from __future__ import annotations

import numpy as np
import pytest

from data_helpers import (SYS, png_base64, supervised, write_blend_tree, write_cgd_tree, write_image,
                          write_json)
from vchat.data import DataError, make_reader, open_image, render_turns
from vchat.data.readers.otter import merge_related
from vchat.data.readers.sparkles import capitalize_sentences, replace_tags

ANS = "\n\n### Answer:\n"
IMG2 = "### Image 1:\n<image>\n### Image 2:\n<image>\n\n### Question:\n"


def test_merge_related_hand_worked():
    data = {"a": {"instruction": "qa", "answer": "aa", "image_ids": [1], "rel_ins_ids": ["b"]},
            "b": {"instruction": "qb", "answer": "ab", "image_ids": [1], "rel_ins_ids": ["a", "c"]},
            "c": {"instruction": "qc", "answer": "ac", "image_ids": [2], "rel_ins_ids": []},
            "d": {"instruction": "qd", "answer": "ad", "image_ids": [3], "rel_ins_ids": ["a"]}}
    assert merge_related(data) == [
        {"image_ids": [1], "instruction": ["qa", "qb"], "answer": ["aa", "ab"]},
        {"image_ids": [2], "instruction": ["qc"], "answer": ["ac"]},  # b's relation to c is not followed
        {"image_ids": [3], "instruction": ["qd"], "answer": ["ad"]},
    ]


def test_otter_cgd(tmp_path):
    root = str(tmp_path)
    write_cgd_tree(root)
    reader = make_reader("otter_mimicit_cgd", root)
    assert len(reader) == 2
    s = reader.get(0)
    assert s.turns[0].images == (f"{root}/coco/train2017/000000000001.jpg", f"{root}/coco/train2017/000000000002.jpg")
    first = (SYS + IMG2 + "What is the differencebetween the two images?" + ANS, "The left has a cat.")
    second = (SYS + IMG2 + "Which one is brighter?" + ANS, "The right one.")
    orders = {tuple(render_turns(reader.get(0, seed=k))) for k in range(30)}
    assert orders == {
        (first, ("### Question:\nWhich one is brighter?" + ANS, "The right one.")),
        (second, ("### Question:\nWhat is the differencebetween the two images?" + ANS, "The left has a cat.")),
    }  # rounds shuffled per draw; the first carries system prompt and both images
    assert render_turns(reader.get(0, seed=3)) == render_turns(reader.get(0, seed=3))
    assert {supervised(reader.get(0, seed=k)) for k in range(30)} == {"The left has a cat. </s> The right one. </s>",
                                                                     "The right one. </s> The left has a cat. </s>"}


def _otter_b64(root, split, entries):
    store = {"IMG_A": png_base64(color=(255, 0, 0)), "IMG_B": png_base64(color=(0, 255, 0)),
             "IMG_C": png_base64(color=(0, 0, 255))}
    write_json(f"{root}/MIMIC-IT/{split}.json", store)
    write_json(f"{root}/MIMIC-IT/{split}_instructions.json", {"meta": {}, "data": entries})


def test_otter_sd_decodes_base64_and_filters(tmp_path):
    root = str(tmp_path)
    _otter_b64(root, "SD", {
        "SD_INS_0": {"instruction": "Spot the change.", "answer": "A hat.", "image_ids": ["IMG_B", "IMG_GONE", "IMG_A"],
                     "rel_ins_ids": []},
        "SD_INS_1": {"instruction": "Q?", "answer": "A.", "image_ids": ["IMG_GONE"], "rel_ins_ids": []}})
    reader = make_reader("otter_mimicit_sd", root)
    assert len(reader) == 1 and reader.skipped == {"no image in the store": 1}
    s = reader.get(0)
    assert [open_image(im).getpixel((0, 0)) for im in s.turns[0].images] == [(0, 255, 0), (255, 0, 0)]
    assert render_turns(s) == [(SYS + IMG2 + "Spot the change." + ANS, "A hat.")]
    assert supervised(s) == "A hat. </s>"


@pytest.mark.parametrize("name,split", [("otter_mimicit_sn", "SN"), ("otter_mimicit_tvc", "TVC"),
                                        ("otter_mimicit_vst", "VST")])
def test_otter_max_images_filter(tmp_path, name, split):
    root = str(tmp_path)
    _otter_b64(root, split, {
        "I0": {"instruction": "Three?", "answer": "Yes.", "image_ids": ["IMG_A", "IMG_B", "IMG_C"], "rel_ins_ids": []},
        "I1": {"instruction": "Two?", "answer": "Yes.", "image_ids": ["IMG_C", "IMG_A"], "rel_ins_ids": ["I2"]},
        "I2": {"instruction": "Still two?", "answer": "Yes.", "image_ids": ["IMG_C", "IMG_A"], "rel_ins_ids": []}})
    reader = make_reader(name, root, max_num_image_per_sample=2)
    assert len(reader) == 1 and reader.skipped == {"more than 2 images": 1}
    s = reader.get(0)
    assert len(s.turns) == 2 and [len(t.images) for t in s.turns] == [2, 0]
    assert supervised(s) == "Yes. </s> Yes. </s>"
    assert {t.question for t in s.turns} == {"Two?", "Still two?"}
    assert len(make_reader(name, root)) == 2  # default 8


def test_capitalize_and_tags_hand_worked():
    assert capitalize_sentences("USA is big. it IS. what? yes!  no") == "Usa is big. It IS. What? Yes!  no"
    tags = [("IMAGE#1", "image a"), ("IMAGE#12", "image b")]
    assert replace_tags("IMAGE#12 and IMAGE#1", tags) == "image b and image a"


def _sparkles(root):
    for sub, ids in (("CC", (101, 102, 103)), ("VG", (201,))):
        for i in ids:
            write_image(f"{root}/SparklesDialogue{sub}/images/{i}.jpg")
    mark = "<Img><ImageHere></Img>"
    good = {"dialogue": [
        {"role": "user", "content": f"{mark}{mark}can you compare IMAGE#101 with IMAGE#102?\n tell me more.",
         "images": [{"image_id": 101}, {"image_id": 102}]},
        {"role": "assistant", "content": "IMAGE#101 shows a dog. the other is IMAGE#102."},
        {"role": "user", "content": f"and what about IMAGE#103?{mark}", "images": [{"image_id": 103}]},
        {"role": "assistant", "content": "it is a cat."}]}
    write_json(f"{root}/SparklesDialogueCC/annotations/SparklesDialogueCC.json", [good])
    user = {"role": "user", "content": "hi", "images": [{"image_id": 201}]}
    write_json(f"{root}/SparklesDialogueVG/annotations/SparklesDialogueVG.json", [
        {"dialogue": [user]},  # odd
        {"dialogue": [user, user]},  # roles
        {"dialogue": [{"role": "user", "content": "x", "images": [{"image_id": 999}]},
                      {"role": "assistant", "content": "y"}]},  # missing file
        {"dialogue": [{"role": "user", "content": "x", "images": [{"image_id": 201}] * 9},
                      {"role": "assistant", "content": "y"}]},  # 9 images
    ])


def test_sparkles(tmp_path):
    root = str(tmp_path)
    _sparkles(root)
    reader = make_reader("sparkles_dialogue", root)
    assert len(reader) == 1
    assert reader.skipped == {"odd number of turns": 1, "roles do not alternate user/assistant": 1,
                              "missing image file": 1, "more than 8 images": 1}

    def expected(a, b, c, cap_a):
        return [(SYS + IMG2 + f"Can you compare {a} with {b}? Tell me more." + ANS,
                 f"{cap_a} shows a dog. The other is {b}."),
                (f"### Image 3:\n<image>\n\n### Question:\nAnd what about {c}?" + ANS, "It is a cat.")]

    styles = [expected("image a", "image b", "image c", "Image a"),
              expected("image A", "image B", "image C", "Image A"),
              expected("the first image", "the second image", "the third image", "The first image")]
    seen = [render_turns(reader.get(0, seed=k)) for k in range(30)]
    assert all(s in styles for s in seen)
    assert {styles.index(s) for s in seen} == {0, 1, 2}
    s = reader.get(0)
    assert [len(t.images) for t in s.turns] == [2, 1]
    assert supervised(reader.get(0, seed=0)) in [f"{a} shows a dog. The other is {b}. </s> It is a cat. </s>"
                                                 for a, b in (("Image a", "image b"), ("Image A", "image B"),
                                                              ("The first image", "the second image"))]
    assert s.images == [f"{root}/SparklesDialogueCC/images/{i}.jpg" for i in (101, 102, 103)]


def test_blend_exact_sample(tmp_path):
    root = str(tmp_path)
    write_blend_tree(root)
    reader = make_reader("llava_otter_blend", root)
    assert len(reader) == 1 and reader.skipped == {"an image before the last has no LLaVA conversation": 1}
    i1, i2 = (f"{root}/coco/train2017/{i:012d}.jpg" for i in (1, 2))
    seen = set()
    for k in range(40):
        s = reader.get(0, seed=k)
        assert s.images == [i1, i2]
        t = render_turns(s)
        seen.add(tuple(t))
        llava_part = t[:len(t) - sum(1 for x in t if x[1] in ("One is full.", "The first."))]
        # image 1's first LLaVA turn shows it (with the system prompt); CGD's first turn shows image 2
        assert llava_part[0][0].startswith(SYS + "### Image 1:\n<image>\n\n### Question:\n")
        cgd = t[len(llava_part):]
        assert cgd[0][0].startswith("### Image 2:\n<image>\n\n### Question:\n")
        assert all(x[0].startswith("### Question:\n") for x in t[1:] if x not in cgd[:1])
    # one full draw written out: detail conv then dial conv (or the reverse), then 1 or 2 CGD rounds
    detail = (SYS + "### Image 1:\n<image>\n\n### Question:\nDescribe it." + ANS, "A bowl.")
    dial = [("### Question:\nWhat is in it?" + ANS, "Soup."), ("### Question:\nIs it hot?" + ANS, "Yes.")]
    cgd_diff = ("### Image 2:\n<image>\n\n### Question:\nHow do they differ?" + ANS, "One is full.")
    cgd_big = ("### Question:\nWhich is bigger?" + ANS, "The first.")
    assert (detail, *dial, cgd_diff, cgd_big) in seen
    assert (detail, cgd_diff) in seen  # one LLaVA conversation, one CGD round
    assert supervised(reader.get(0, seed=0)).endswith(("One is full. </s>", "The first. </s>"))


def test_blend_last_image_may_show_in_llava(tmp_path):
    root = str(tmp_path)
    write_blend_tree(root, extra_llava_for_last=True)
    reader = make_reader("llava_otter_blend", root)
    shown_at = set()
    for k in range(40):
        s = reader.get(0, seed=k)
        counts = [len(t.images) for t in s.turns]
        assert sum(counts) == 2 and counts[0] == 1
        shown_at.add(tuple(counts))
        assert np.all(np.diff([i for i, c in enumerate(counts) if c]) > 0)
    assert any(c.count(1) == 2 and c[-1] == 0 for c in shown_at)  # image 2 shown by its LLaVA turn


def test_otter_bad_base64_names_image(tmp_path):
    root = str(tmp_path)
    write_json(f"{root}/MIMIC-IT/SD.json", {"GOOD": png_base64(), "BAD": "!!not base64!!", "JUNK": "anVuaw=="})
    write_json(f"{root}/MIMIC-IT/SD_instructions.json", {"data": {
        "I0": {"instruction": "Q?", "answer": "A.", "image_ids": ["GOOD", "BAD"], "rel_ins_ids": []},
        "I1": {"instruction": "Q?", "answer": "A.", "image_ids": ["JUNK"], "rel_ins_ids": []}}})
    reader = make_reader("otter_mimicit_sd", root)
    with pytest.raises(DataError, match=r"otter_mimicit_sd\[0\]: image 'BAD' in .*SD.json is not valid base64"):
        reader.get(0)
    with pytest.raises(DataError, match=r"otter_mimicit_sd\[1\]: cannot read image 'JUNK' in .*SD.json"):
        reader.get(1)
