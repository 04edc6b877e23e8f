"""Multi-round, multi-image chat sessions: the bookkeeping both frameworks share.

The reference's chat (`chat/chat.py`) re-encodes every image and the whole token history each round
(B23). A session keeps the KV cache instead: a round's prompt (its images spliced in) is a prefill
chunk on top of the cache, then tokens are generated one at a time; the history is
`prompt + answer + EOS` per round, as the reference's. Under compat "dsvc" the reference embeds
earlier answers with `lang_embed` when it re-encodes them, which a kept cache cannot reproduce, so
"dsvc" sessions re-encode the history each round (`reuse_cache=False`), exactly as the reference.

`ChatBase` holds the history, the prompts and the transcript; vchat_torch.chat.ChatSession and
vchat_jax.chat.ChatSession add the model calls (`_ask_cached`, `_ask_full`, `reset_cache`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .splice import SplicePlan, plan_splice
from .template import MAX_IMAGES, Round, round_parts


class ContextFull(UserError):
    """A round's prompt does not fit what is left of the model's context."""


@dataclass
class Turn:
    question: str
    num_images: int
    answer: str
    cut: bool = False  # the answer stopped at the end of the model's context, not at EOS or max_new_tokens


@dataclass
class ChatBase:
    model: object  # a VisualChat of either framework
    tokenizer: object  # vchat.data.TextTokenizer: encode / decode and the special ids
    max_new_tokens: int = 64
    system: bool = True
    reuse_cache: bool | None = None  # default: True under "fixed", False under "dsvc"
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self):
        if self.reuse_cache is None:
            self.reuse_cache = self.model.config.compat == "fixed"
        self.clear()

    def clear(self) -> None:
        """Forget the history, the images and their numbering."""
        self.turns = []
        self.ids: list[int] = []  # the token history (re-encoding sessions)
        self.pixels: list = []  # every image so far, (3, H, W) each
        self.next_pos = 0  # the position of the next cached token
        self.reset_cache()

    def reset_cache(self) -> None:
        raise NotImplementedError

    @property
    def num_images(self) -> int:
        return len(self.pixels)

    def prompt_ids(self, question: str, n_images: int) -> list[int]:
        first = self.system and not self.turns
        parts, _ = round_parts(Round(question, n_images), first=first, image_start=self.num_images + 1)
        return [self.tokenizer.bos_id] + self.tokenizer.encode_parts(parts)  # the question encoded as text

    def round_plan(self, prompt: list[int], n_images: int) -> SplicePlan:
        """The splice plan of one round's prompt, its positions continuing the cached history."""
        cfg = self.model.config
        ids = np.array([prompt])
        p = plan_splice(ids, np.ones_like(ids), [n_images], cfg.image_tokens, cfg.image_token_id, cfg.pad_token_id,
                        order="natural", pad_multiple=1)
        return SplicePlan(ids=p.ids, image_index=p.image_index, modality=p.modality, labels=p.labels,
                          position_ids=p.position_ids + self.next_pos, lengths=p.lengths)

    def ask(self, question: str, images=None) -> str:
        """One round: `images` (n, 3, H, W) preprocessed pixels shown with the question. Returns the answer.
        The history, this round's prompt and its answer share the model's context (max_position_embeddings):
        a prompt that does not fit is refused, and an answer that reaches the end is cut there, with a
        warning on stderr."""
        images = None if images is None or len(images) == 0 else self.as_images(images)
        n = 0 if images is None else images.shape[0]
        if self.num_images + n > MAX_IMAGES:
            raise ValueError(f"a chat holds at most {MAX_IMAGES} images; this round would make {self.num_images + n}")
        prompt = self.prompt_ids(question, n)
        budget = self.answer_budget(len(prompt) + n * (self.model.config.image_tokens - 1))
        self.pixels += [] if images is None else list(images)
        answer_ids = self._ask_cached(prompt, images, budget) if self.reuse_cache else self._ask_full(prompt, budget)
        eos = self.tokenizer.eos_id
        answer_ids = [t for t in answer_ids if t != eos]
        cut = budget < self.max_new_tokens and len(answer_ids) >= budget
        if cut:
            print(f"[chat] warning: the answer was cut after {len(answer_ids)} tokens at the end of the model's "
                  f"context (max_position_embeddings = {self.model.config.llm.max_position_embeddings}); "
                  "clear the chat to go on", file=sys.stderr, flush=True)
        if not self.reuse_cache:
            self.ids += prompt + answer_ids + [eos]
        answer = self.tokenizer.decode(answer_ids).strip()
        self.turns.append(Turn(question, n, answer, cut))
        return answer

    def used_positions(self) -> int:
        """Positions the history takes in the model's context (images spliced in)."""
        if self.reuse_cache:
            return self.next_pos
        return len(self.ids) + self.num_images * (self.model.config.image_tokens - 1)

    def answer_budget(self, prompt_len: int) -> int:
        """Tokens this round may generate: max_new_tokens, or fewer where the context ends first (one
        position stays for the EOS that closes the round). A prompt that leaves no room is refused."""
        context, used = self.model.config.llm.max_position_embeddings, self.used_positions()
        room = context - used - prompt_len - 1
        if room < 1:
            raise ContextFull(f"this round's prompt ({prompt_len} positions, images spliced in) does not fit the "
                             f"model's context: the chat so far holds {used} of {context} positions "
                             "(max_position_embeddings); clear the chat to go on")
        return min(self.max_new_tokens, room)

    def as_images(self, images):
        """Pixels (n, 3, H, W) as the framework's array."""
        raise NotImplementedError

    def _ask_cached(self, prompt: list[int], images, max_new: int) -> list[int]:
        """The answer's ids (ending with the EOS that closes the round), at most `max_new` before it."""
        raise NotImplementedError

    def _ask_full(self, prompt: list[int], max_new: int) -> list[int]:
        raise NotImplementedError

    def transcript(self) -> str:
        lines, k = [], 1
        for i, t in enumerate(self.turns):
            shown = ", ".join(f"image {j}" for j in range(k, k + t.num_images))
            k += t.num_images
            lines.append(f"=========== Round {i + 1} ===========")
            lines.append(f"User{' [' + shown + ']' if shown else ''}: {t.question}")
            lines.append(f"VisualChat: {t.answer}")
        return "\n".join(lines)
