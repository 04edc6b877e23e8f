"""Tokenisation and label masking of one sample, with a length budget that counts image tokens.

Mirrors `VQADataset.tokenize` and `merge_all_images` of the reference (`utils/data/vqa_dataset.py`):
each turn is tokenised on its own as `BOS + instruction + answer`, EOS is appended to a supervised
answer, and the first `1 + len(encode(instruction))` positions (BOS, system prompt, image labels,
question and "### Answer:\\n") are labelled -100 while the answer and its EOS are supervised.

Image numbering, inventory section 2:
- "text" (default, the chat's and Otter's way): "### Image k:" is written into the text before
  tokenisation (`vchat.template.build_conversation`);
- "token" (the VQA readers' way, for compat): the text keeps the special token "### Image:" and
  its id is replaced by the ids of "### Image k:" tokenised on its own; those ids are labelled -100.

Budget (fixes B13, which only truncated each turn to 512 tokens): each `<image>` counts
`image_tokens` positions; whole trailing turns are dropped until the spliced length fits
`max_seq_len` and the sample has at most `max_num_image_per_sample` images. A sample whose first
turn alone does not fit is dropped and reported (`Dropped`). Text-only samples are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vchat.data.sample import DataError, Sample
from vchat.data.tokenizer import TextTokenizer
from vchat.template import DEFAULT_LABEL_PADDING_NUM, MAX_IMAGES, build_conversation, image_label, prompt

NUMBERINGS = ("text", "token")
IGNORE = DEFAULT_LABEL_PADDING_NUM


@dataclass(frozen=True)
class Budget:
    """Length limits. `image_tokens` is `ModelConfig.image_tokens` (257 for CLIP-L/14 at 224 px)."""

    max_seq_len: int = 4096
    image_tokens: int = 257
    max_num_image_per_sample: int = MAX_IMAGES
    turn_max_tokens: int | None = None  # the reference's per-turn truncation (512); None: off

    def __post_init__(self):
        if self.image_tokens < 1 or self.max_seq_len < 1:
            raise ValueError("max_seq_len and image_tokens must be positive")
        if not 1 <= self.max_num_image_per_sample <= MAX_IMAGES:
            raise ValueError(f"max_num_image_per_sample must be in 1..{MAX_IMAGES}, "
                             f"got {self.max_num_image_per_sample}")


@dataclass(frozen=True)
class EncodedSample:
    input_ids: np.ndarray  # (T,) int64, T text tokens; each <image> is one id here
    labels: np.ndarray  # (T,) int64, -100 where not supervised
    images: tuple  # the images of the kept turns, in order (one per <image> id)
    origin: str
    num_turns: int  # turns kept
    dropped_turns: int  # trailing turns cut by the budget
    image_tokens: int  # positions each <image> takes once spliced

    @property
    def spliced_length(self) -> int:
        """Length once every `<image>` id is replaced by `image_tokens` embeddings."""
        return len(self.input_ids) + len(self.images) * (self.image_tokens - 1)


@dataclass(frozen=True)
class Dropped:
    """A sample left out by the budget: `reason` is "too_long" or "too_many_images"."""

    origin: str
    reason: str


def render_turns(sample: Sample, numbering: str = "text", system: bool = True) -> list[tuple[str, str | None]]:
    """(instruction, answer) text of each turn through `vchat.template`; with numbering "token" the
    image labels stay "### Image:" (numbered later, on the ids)."""
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be one of {NUMBERINGS}, got {numbering!r}")
    rounds = sample.rounds()
    if numbering == "text":
        return build_conversation(rounds, system=system)
    return [(prompt(r.question, r.num_images, first_message=(i == 0 and system)), r.answer)
            for i, r in enumerate(rounds)]


def tokenize_turn(tok: TextTokenizer, instruction: str, answer: str | None,
                  max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """ids = BOS + encode(instruction + answer) [+ EOS]; labels mask BOS and the instruction."""
    ids = [tok.bos_id] + tok.encode(instruction + (answer or ""))
    n_masked = 1 + len(tok.encode(instruction))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_masked = min(n_masked, len(ids))
    labels = [IGNORE] * n_masked + ids[n_masked:]
    if answer is not None:
        ids.append(tok.eos_id)
        labels.append(tok.eos_id)
    else:
        labels = [IGNORE] * len(ids)
    return ids, labels


def _number_tokens(tok: TextTokenizer, ids: list[int], labels: list[int], start: int) -> tuple[list, list, int]:
    out_ids, out_lab, k = [], [], start
    for i, lab in zip(ids, labels):
        if i == tok.image_pretoken_id:
            label_ids = tok.encode(image_label(k))
            out_ids += label_ids
            out_lab += [IGNORE] * len(label_ids)
            k += 1
        else:
            out_ids.append(i)
            out_lab.append(lab)
    return out_ids, out_lab, k


def encode_sample(sample: Sample, tok: TextTokenizer, budget: Budget = Budget(), numbering: str = "text",
                  system: bool = True) -> EncodedSample | Dropped:
    """Token ids and labels of a sample within the budget, or `Dropped` when its first turn does not fit.

    Raises DataError (naming the sample) when a turn's `<image>` ids do not match its images.
    """
    turns = sample.turns
    n_img = [len(t.images) for t in turns]
    keep = 0
    while keep < len(turns) and sum(n_img[:keep + 1]) <= budget.max_num_image_per_sample:
        keep += 1
    if keep == 0:
        return Dropped(sample.origin, "too_many_images")
    kept = Sample(turns[:keep], sample.origin)
    texts = render_turns(kept, numbering, system)

    ids_all, labels_all, used, k = [], [], 0, 1
    for t, ((instruction, answer), turn) in enumerate(zip(texts, kept.turns)):
        ids, labels = tokenize_turn(tok, instruction, answer, budget.turn_max_tokens)
        n = ids.count(tok.image_id)
        if n != len(turn.images):
            raise DataError(f"{sample.origin} turn {t}: {n} <image> tokens in the text but {len(turn.images)} images")
        if numbering == "token":
            ids, labels, k = _number_tokens(tok, ids, labels, k)
        cost = len(ids) + n * (budget.image_tokens - 1)
        if used + cost > budget.max_seq_len:
            break
        ids_all.append(ids)
        labels_all.append(labels)
        used += cost
    if not ids_all:
        return Dropped(sample.origin, "too_long")
    n_kept = len(ids_all)
    return EncodedSample(
        input_ids=np.asarray([i for x in ids_all for i in x], dtype=np.int64),
        labels=np.asarray([i for x in labels_all for i in x], dtype=np.int64),
        images=tuple(im for t in kept.turns[:n_kept] for im in t.images),
        origin=sample.origin, num_turns=n_kept, dropped_turns=len(turns) - n_kept,
        image_tokens=budget.image_tokens)
