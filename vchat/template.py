"""The reference's special tokens and conversation template, and the one prompt builder.

Strings are exactly those of DeepSpeed-VisualChat's `utils/data/DST.py` (see
reference/DSVC_INVENTORY.md section 2). Training, chat and evaluation all build their text through
`build_round` / `build_conversation`, so a round reads the same wherever it is made (the reference
has three different builders, bugs B4/B5).

A round with two images, first in the conversation, reads::

    <s>You are a helpful ...natural language.\\n\\n### Image 1:\\n<image>\\n### Image 2:\\n<image>\\n\\n
    ### Question:\\n{q}\\n\\n### Answer:\\n{a}</s>

(`<s>`/`</s>` are the tokenizer's BOS/EOS, added at tokenisation, not in the text.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SYSTEM_TOKEN = "### System instuction:"  # sic: the reference's spelling; never used by it
DEFAULT_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.\n\n"
)
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_HUMAN_QUESTION_PRETOKEN = "### Question:"
DEFAULT_QUESTION_TOKEN = "<question>"
DEFAULT_HUMAN_IMAGE_PRETOKEN = "### Image:"
DEFAULT_ASSISTANT_TOKEN = "### Answer:"
DEFAULT_LABEL_PADDING_NUM = -100
MAX_IMAGES = 8

IMAGE_LABELS = {str(i): f"### Image {i}:" for i in range(1, MAX_IMAGES + 1)}
image_mapping_dict = {"default": DEFAULT_HUMAN_IMAGE_PRETOKEN, **IMAGE_LABELS}
# Added to the tokenizer, in this order (Llama-2: ids 32000, 32001; then "<PAD>" = 32002, unused).
SPECIAL_TOKENS = [DEFAULT_HUMAN_IMAGE_PRETOKEN, DEFAULT_IMAGE_TOKEN]
PAD_TOKEN = "<PAD>"

TEMPLATE = {
    "prompt_qa_with_image": "### Image:\n<image>\n\n### Question:\n<question>\n\n### Answer:\n",
    "prompt_qa_without_image": "### Question:\n<question>\n\n### Answer:\n",
}


def image_label(i: int) -> str:
    """The numbered label of image i (1-based): '### Image i:'."""
    if not 1 <= i <= MAX_IMAGES:
        raise ValueError(f"image number {i} is outside 1..{MAX_IMAGES} (the reference numbers at most 8 images)")
    return IMAGE_LABELS[str(i)]


def clean_question(question: str) -> str:
    """LLaVA, Otter and Sparkles questions lose their `<image>` marks and every newline."""
    return question.replace(DEFAULT_IMAGE_TOKEN, "").replace("\n", "")


def prompt_template(num_images: int = 0, first_message: bool = False) -> str:
    """The instruction text of one round with the question still the placeholder `<question>`."""
    if num_images < 0 or num_images > MAX_IMAGES:
        raise ValueError(f"a round holds 0..{MAX_IMAGES} images, got {num_images}")
    if num_images == 0:
        text = TEMPLATE["prompt_qa_without_image"]
    else:
        head = f"{DEFAULT_HUMAN_IMAGE_PRETOKEN}\n{DEFAULT_IMAGE_TOKEN}\n\n"
        text = TEMPLATE["prompt_qa_with_image"].replace(
            head, f"{DEFAULT_HUMAN_IMAGE_PRETOKEN}\n{DEFAULT_IMAGE_TOKEN}\n" * num_images + "\n", 1)
    return DEFAULT_PROMPT + text if first_message else text


def prompt(question: str, num_images: int = 0, first_message: bool = False) -> str:
    """The reference's `Prompter`: the instruction text of one round, before image numbering.

    `num_images` image blocks ("### Image:\\n<image>\\n" each, then one blank line) precede the
    question; `first_message` prepends the system prompt.
    """
    return prompt_template(num_images, first_message).replace(DEFAULT_QUESTION_TOKEN, question, 1)


def number_images(text: str, start: int = 1) -> tuple[str, int]:
    """Text-level numbering: each '### Image:' becomes '### Image k:' for k = start, start+1, ...

    Returns the new text and the next free number. This is the chat's and Otter's numbering; the
    VQA readers' token-level numbering is reproduced by `vchat.data` under compat "dsvc".
    """
    k = start

    def sub(_: re.Match) -> str:
        nonlocal k
        label = image_label(k)
        k += 1
        return label

    out = re.sub(re.escape(DEFAULT_HUMAN_IMAGE_PRETOKEN), sub, text)
    return out, k


@dataclass(frozen=True)
class Round:
    """One round of a conversation: its images (a count), the user's question and the answer (None
    when it is to be generated)."""

    question: str
    num_images: int = 0
    answer: str | None = None


def round_parts(rnd: Round, first: bool, image_start: int) -> tuple[list[tuple[str, bool]], int]:
    """The instruction of one round as `(text, is_user)` parts, template and question apart, and the
    next image number. Only the template is numbered; the question is the user's text, which the
    tokenizer encodes as text (`TextTokenizer.encode_parts`), so a `<image>` or `### Image:` typed
    by the user is never an image slot or label."""
    text, nxt = number_images(prompt_template(rnd.num_images, first_message=first), image_start)
    before, after = text.split(DEFAULT_QUESTION_TOKEN)
    return [(before, False), (rnd.question, True), (after, False)], nxt


def build_round(rnd: Round, first: bool, image_start: int) -> tuple[str, str | None, int]:
    """Instruction text (numbered), answer text and the next image number for one round."""
    parts, nxt = round_parts(rnd, first, image_start)
    return "".join(text for text, _ in parts), rnd.answer, nxt


def build_conversation(rounds: list[Round], image_start: int = 1, system: bool = True) -> list[tuple[str, str | None]]:
    """(instruction, answer) per round, images numbered across the whole conversation.

    Each round is tokenised on its own with BOS, and a supervised answer is followed by EOS; the
    instruction part is masked with -100 in the labels.
    """
    total = sum(r.num_images for r in rounds) + image_start - 1
    if total > MAX_IMAGES:
        raise ValueError(f"a conversation holds at most {MAX_IMAGES} images, got {total}")
    out, k = [], image_start
    for i, rnd in enumerate(rounds):
        text, ans, k = build_round(rnd, first=(i == 0 and system), image_start=k)
        out.append((text, ans))
    return out
