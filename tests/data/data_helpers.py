"""Shared helpers for the data tests (a plain module, not a conftest: other test folders have their
own conftest.py): a toy word tokenizer and fixture-file writers."""

from __future__ import annotations

import base64
import io
import json
import os
import re

from PIL import Image

from vchat.data.tokenizer import TextTokenizer

BOS, EOS, PRE, IMG = 1, 2, 3, 4
SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
       "the user provides, and assist the user with a variety of tasks using natural language.\n\n")


class ToyTokenizer:
    """One id per whitespace-separated word; "### Image:" and "<image>" are single ids.

    With `prefix_first=True` the first word of each `encode` call gets a "_" prefix, as a
    SentencePiece tokenizer marks the start of a text ("▁###" standalone vs "###" in context).
    """

    def __init__(self, prefix_first: bool = False):
        self.vocab = {"<s>": BOS, "</s>": EOS, "### Image:": PRE, "<image>": IMG}
        self.prefix_first = prefix_first

    def _id(self, word: str) -> int:
        return self.vocab.setdefault(word, 10 + len(self.vocab))

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in re.split(r"(### Image:|<image>)", text):
            if part in ("### Image:", "<image>"):
                ids.append(self.vocab[part])
            else:
                for w in part.split():
                    if self.prefix_first and not ids:
                        w = "_" + w
                    ids.append(self._id(w))
        return ids

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv[int(i)] for i in ids)


def toy_tokenizer(prefix_first: bool = False) -> TextTokenizer:
    return TextTokenizer.wrap(ToyTokenizer(prefix_first), bos_id=BOS, eos_id=EOS, pad_id=EOS, image_id=IMG,
                              image_pretoken_id=PRE)


def write_image(path: str, size=(6, 4), color=(200, 10, 10)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_base64(size=(5, 5), color=(0, 0, 255)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_json(path: str, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def supervised(sample, numbering: str = "text") -> str:
    """The supervised tokens of a sample (labels != -100), decoded by the toy tokenizer, after
    checking that each turn's masked prefix is exactly BOS + its instruction."""
    from vchat.data import Budget, encode_sample, render_turns

    raw = ToyTokenizer()
    tok = TextTokenizer.wrap(raw, bos_id=BOS, eos_id=EOS, pad_id=EOS, image_id=IMG, image_pretoken_id=PRE)
    enc = encode_sample(sample, tok, Budget(max_seq_len=100000, image_tokens=3), numbering=numbering)
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    starts = [i for i, t in enumerate(ids) if t == BOS] + [len(ids)]
    for (instruction, _), a, b in zip(render_turns(sample), starts, starts[1:]):
        n_instr = 1 + len(raw.encode(instruction))
        assert labels[a:a + n_instr] == [-100] * n_instr and -100 not in labels[a + n_instr:b]
    return raw.decode([i for i, lab in zip(ids, labels) if lab != -100])


def write_cgd_tree(root: str) -> None:
    """MIMIC-IT CGD over COCO files: two related instructions on images (1, 2), one on (3, 4)."""
    for i in (1, 2, 3, 4):
        write_image(f"{root}/coco/train2017/{i:012d}.jpg")
    ids12 = ["CGD_IMG_000000000001", "CGD_IMG_000000000002"]
    write_json(f"{root}/MIMIC-IT/CGD_instructions.json", {"meta": {"version": "0.0.1"}, "data": {
        "CGD_INS_0": {"instruction": "What is the difference\nbetween the two images?", "answer": "The left has a cat.",
                      "image_ids": ids12, "rel_ins_ids": ["CGD_INS_1"]},
        "CGD_INS_1": {"instruction": "<image>Which one is brighter?", "answer": "The right one.",
                      "image_ids": ids12, "rel_ins_ids": ["CGD_INS_0"]},
        "CGD_INS_2": {"instruction": "Same place?", "answer": "No.",
                      "image_ids": ["CGD_IMG_000000000003", "CGD_IMG_000000000004"], "rel_ins_ids": []}}})


def write_blend_tree(root: str, extra_llava_for_last: bool = False) -> None:
    """LLaVA conversations for image 1 (and image 2 if asked) and CGD instructions on (1, 2) and (3, 1)."""
    for i in (1, 2, 3):
        write_image(f"{root}/coco/train2017/{i:012d}.jpg")
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    write_json(f"{root}/llava/detail_23k.json", [{"id": "d1", "image": "000000000001.jpg",
                                                  "conversations": conv("<image>\nDescribe it.", "A bowl.")}])
    write_json(f"{root}/llava/complex_reasoning_77k.json", [])
    dial = [{"id": "c1", "image": "000000000001.jpg",
             "conversations": conv("What is in it?\n<image>", "Soup.") + conv("Is it hot?", "Yes.")}]
    if extra_llava_for_last:
        dial.append({"id": "c2", "image": "000000000002.jpg", "conversations": conv("<image>Colour?", "Blue.")})
    write_json(f"{root}/llava/conversation_58k.json", dial)
    write_json(f"{root}/MIMIC-IT/CGD_instructions.json", {"data": {
        "CGD_INS_0": {"instruction": "How do they differ?", "answer": "One is full.",
                      "image_ids": ["CGD_IMG_000000000001", "CGD_IMG_000000000002"], "rel_ins_ids": ["CGD_INS_1"]},
        "CGD_INS_1": {"instruction": "Which is bigger?", "answer": "The first.",
                      "image_ids": ["CGD_IMG_000000000001", "CGD_IMG_000000000002"], "rel_ins_ids": []},
        "CGD_INS_2": {"instruction": "Q?", "answer": "A.",  # image 3 has no LLaVA data and is not last
                      "image_ids": ["CGD_IMG_000000000003", "CGD_IMG_000000000001"], "rel_ins_ids": []}}})
