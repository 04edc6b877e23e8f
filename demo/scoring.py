"""The demo's held-out questions and their scoring: every round of a synthetic sample asked with
its earlier rounds as context, answered greedily in batches, scored by exact match per kind."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from vchat.data import Budget, ImageProcessor, Sample, TextTokenizer, encode_sample


@dataclasses.dataclass
class Question:
    ids: np.ndarray  # (T,) prompt ids, ending in "### Answer:"
    pixels: np.ndarray  # (N, 3, H, W)
    answer: str
    kind: str  # "colour" | "count" | "which"


def questions(samples: list[Sample], tok: TextTokenizer, proc: ImageProcessor, image_tokens: int) -> list[Question]:
    """Every round of every sample, asked with the earlier rounds (and their answers) as context."""
    out = []
    for s in samples:
        for r, turn in enumerate(s.turns):
            sub = Sample(s.turns[:r] + (dataclasses.replace(turn, answer=None),), s.origin)
            enc = encode_sample(sub, tok, Budget(4096, image_tokens, 8))
            kind = {"What": "colour", "How": "count", "Which": "which"}[turn.question.split()[0]]
            out.append(Question(np.asarray(enc.input_ids), proc.batch(enc.images), turn.answer, kind))
    return out


def left_pad(qs: list[Question], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) ids and attention mask, each prompt aligned to the right."""
    T = max(len(q.ids) for q in qs)
    ids = np.full((len(qs), T), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for j, q in enumerate(qs):
        ids[j, T - len(q.ids):] = q.ids
        mask[j, T - len(q.ids):] = 1
    return ids, mask


def right_pad(qs: list[Question], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) ids and attention mask, each prompt aligned to the left (a teacher-forced forward)."""
    ids, mask = left_pad(qs, pad_id)
    for j, q in enumerate(qs):
        n = len(q.ids)
        ids[j], mask[j] = np.roll(ids[j], n), np.roll(mask[j], n)
    return ids, mask


GenerateFn = Callable[[np.ndarray, np.ndarray, np.ndarray, list[int]], np.ndarray]


def answer_all(generate_fn: GenerateFn, qs: list[Question], tok: TextTokenizer, batch: int = 32) -> list[str]:
    """Greedy answers (up to EOS) of every question; generate_fn(images, ids, mask, image_num) -> (B, n) ids."""
    answers = []
    for b in range(0, len(qs), batch):
        chunk = qs[b:b + batch]
        ids, mask = left_pad(chunk, tok.pad_id)
        images = np.concatenate([q.pixels for q in chunk])
        out = np.asarray(generate_fn(images, ids, mask, [q.pixels.shape[0] for q in chunk]))
        for row in out.tolist():
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            answers.append(tok.decode(row).strip())
    return answers


def accuracy(answers: list[str], qs: list[Question]) -> dict:
    """Exact-match accuracy overall and per question kind."""
    per = {}
    for a, q in zip(answers, qs):
        hit, n = per.get(q.kind, (0, 0))
        per[q.kind] = (hit + (a == q.answer), n + 1)
    total = sum(h for h, _ in per.values()) / max(1, len(qs))
    return {"accuracy": total, "by_kind": {k: round(h / n, 4) for k, (h, n) in sorted(per.items())},
            "questions": len(qs)}
