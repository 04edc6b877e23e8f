"""Question pools for the datasets that have answers but no questions.

The reference draws a random caption request for coco_caption and minigpt4 (`QUESTIONS`, 54 lines
in `coco_caption_dataset.py` / `cc_sbu_align_dataset.py`) and appends a random "why" follow-up to
each A-OKVQA question (`REASON_QUESTIONS`, 7 lines in `aokvqa_dataset.py`). These pools are our own
wording of the same intent (we do not copy the reference's text). A reader takes `prompts=` to
use any other pool, e.g. the reference's lists loaded from a file, for a closer match.
"""

from __future__ import annotations

import json

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe this image.",
    "What does this picture show?",
    "Give a short description of the image.",
    "Write a caption for this image.",
    "What can you see in this photo?",
    "Summarise the content of the picture.",
    "Tell me what is happening in this image.",
    "Provide a one-sentence caption for the photo.",
    "Explain what the image depicts.",
    "What is the main subject of this picture?",
    "Describe the scene in the image in your own words.",
    "How would you caption this photograph?",
    "List the key things visible in this image.",
    "Give this picture a descriptive title.",
    "What is going on in this photo?",
    "Describe the image briefly.",
    "Write a sentence that captures this picture.",
    "What would be a good caption for this scene?",
    "Can you describe the contents of this image?",
    "Describe what you observe in the picture.",
)

REASON_PROMPTS: tuple[str, ...] = (
    "Why?",
    "Explain why.",
    "What is the reason?",
    "Why do you think so?",
    "Can you explain your answer?",
    "What makes you say that?",
    "Please give the reason.",
)


def load_prompts(path: str) -> tuple[str, ...]:
    """A prompt pool from a JSON list of strings or a text file with one prompt per line."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        pool = json.loads(text)
    else:
        pool = [line.strip() for line in text.splitlines() if line.strip()]
    if not pool or not all(isinstance(p, str) for p in pool):
        raise ValueError(f"{path}: expected a non-empty list of prompt strings")
    return tuple(pool)
