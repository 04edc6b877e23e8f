"""Multi-round, multi-image chat sessions in JAX: a preallocated `KVCache` kept between rounds.

The twin of vchat_torch/chat.py; vchat/chat.py holds the history, prompts and transcript (and says why
compat "dsvc" re-encodes). Each round's prompt is one jit-compiled prefill chunk written at the cache's
index (its images spliced in); each answer token, and the EOS that closes the round, goes through the
jit-compiled decode step. The cache grows by whole `capacity_step`s, so a session compiles the decode
step once per capacity, not per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.chat import ChatBase, Turn  # noqa: F401  (Turn re-exported beside the session)

from .generate import decode_token, generate, prefill
from .model import KVCache, VisualChat


@dataclass
class ChatSession(ChatBase):
    model: VisualChat
    capacity_step: int = 256

    def reset_cache(self) -> None:
        self.cache: KVCache | None = None

    @property
    def modality(self) -> np.ndarray | None:
        """(1, cached length) modality of every cached position (None before the first cached round)."""
        return None if self.cache is None else np.asarray(self.cache.modality[:, :self.next_pos])

    def as_images(self, images) -> np.ndarray:
        return np.asarray(images, np.float32)

    def _ask_full(self, prompt: list[int], max_new: int) -> list[int]:
        ids = np.array([self.ids + prompt])
        images = np.stack(self.pixels) if self.pixels else None
        out = generate(self.model, images, ids, max_new_tokens=max_new, eos_token_id=self.tokenizer.eos_id)
        return out.ids[0].tolist()

    def _ask_cached(self, prompt: list[int], images: np.ndarray | None, max_new: int) -> list[int]:
        model, eos = self.model, self.tokenizer.eos_id
        plan = self.round_plan(prompt, 0 if images is None else images.shape[0])
        need = self.next_pos + plan.shape[1] + max_new + 1  # prompt, answer, closing EOS
        capacity = -(-need // self.capacity_step) * self.capacity_step
        if self.cache is None:
            self.cache = KVCache.empty(model.config, 1, capacity, model.dtype)
        elif self.cache.capacity < need:
            self.cache = self.cache.grow(capacity)
        graphdef, state = nnx.split(model)
        pixels = None if images is None else jnp.asarray(images, model.dtype)
        logits, self.cache = prefill(graphdef, state, plan, pixels, self.cache)
        self.next_pos += plan.shape[1]
        answer = []
        while not answer or answer[-1] != eos:  # the EOS that closes the round goes into the cache too
            tok = eos if len(answer) == max_new else int(np.argmax(np.asarray(logits, np.float32)[0]))
            answer.append(tok)
            logits, self.cache = decode_token(graphdef, state, self.cache, jnp.asarray([tok], jnp.int32),
                                              jnp.asarray([self.next_pos], jnp.int32), True)
            self.next_pos += 1
        return answer
