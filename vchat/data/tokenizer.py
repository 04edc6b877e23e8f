"""The tokenizer interface the data pipeline needs: `encode(text) -> ids` plus five special ids.

The reference uses a Hugging Face `LlamaTokenizer` with "### Image:" and "<image>" added as special
tokens (ids 32000 and 32001), BOS added by the tokenizer and pad = eos (`DST.add_special_token`,
`modeling_dsvl.py`). Here BOS and EOS are added by `vchat.data.encode`, so `encode` must add no
special tokens of its own; a `tokenizers.Tokenizer` (e.g. a Llama-2 `tokenizer.json`) is wrapped
with `add_special_tokens=False`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from vchat.errors import UserError
from vchat.template import DEFAULT_HUMAN_IMAGE_PRETOKEN, DEFAULT_IMAGE_TOKEN, SPECIAL_TOKENS


def _is_tokenizers(obj) -> bool:
    try:
        from tokenizers import Tokenizer  # the `tokenizers` library: no torch, no jax
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Tokenizer)


@dataclass(frozen=True)
class TextTokenizer:
    """`encode(text)` without special tokens, plus the ids the pipeline inserts or checks.

    `backend` is a `tokenizers.Tokenizer` (encoded with `add_special_tokens=False`) or any object
    whose `encode(text)` returns ids or an object with `.ids`. It holds no closures, so it pickles
    (for data-loader workers) whenever the backend does.
    """

    backend: Any
    bos_id: int
    eos_id: int
    pad_id: int
    image_id: int  # "<image>"
    image_pretoken_id: int  # "### Image:"

    def __post_init__(self):
        for label, text, want in (("<image>", DEFAULT_IMAGE_TOKEN, self.image_id),
                                  ("### Image:", DEFAULT_HUMAN_IMAGE_PRETOKEN, self.image_pretoken_id)):
            got = self.encode(text)
            if got != [want]:
                raise ValueError(f"the tokenizer must encode {label!r} as the single id {want}, got {got}; "
                                 f"add it as a special token")

    def encode(self, text: str) -> list[int]:
        if _is_tokenizers(self.backend):
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        out = self.backend.encode(text)
        return [int(i) for i in getattr(out, "ids", out)]

    def special_strings(self) -> dict[str, int]:
        """The strings the tokenizer turns into special ids when they occur in text, with their ids:
        every special token of a `tokenizers` backend (BOS, EOS, `<image>`, `### Image:`, ...), the
        template's two otherwise."""
        if _is_tokenizers(self.backend):
            return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return {DEFAULT_HUMAN_IMAGE_PRETOKEN: self.image_pretoken_id, DEFAULT_IMAGE_TOKEN: self.image_id}

    def encode_parts(self, parts: list[tuple[str, bool]]) -> list[int]:
        """Ids of `(text, is_user)` parts (`vchat.template.round_parts`): the template's special
        strings become special ids, the user's text is text. Without a special string in the user's
        parts this is `encode` of the joined text (as in training); with one, the text between the
        template's specials is encoded with special-token matching off, so the user's `<image>`,
        `### Image:` or `</s>` are characters, never special ids."""
        specials = self.special_strings()
        if not any(sp in text for text, user in parts if user for sp in specials):
            return self.encode("".join(text for text, _ in parts))
        pattern = re.compile("|".join(re.escape(sp) for sp in sorted(specials, key=len, reverse=True)))
        pieces: list[str | int] = [""]  # text runs between the template's specials, and the specials' ids
        for text, user in parts:
            pos = 0
            for m in [] if user else pattern.finditer(text):
                pieces[-1] += text[pos:m.start()]
                pieces += [specials[m.group()], ""]
                pos = m.end()
            pieces[-1] += text[pos:]
        ids = []
        for piece in pieces:
            ids += [piece] if isinstance(piece, int) else self._encode_as_text(piece) if piece else []
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        """`encode(text)` with special strings as characters; refuses a backend that cannot."""
        if _is_tokenizers(self.backend):
            before = self.backend.encode_special_tokens
            self.backend.encode_special_tokens = True
            try:
                return self.encode(text)
            finally:
                self.backend.encode_special_tokens = before
        ids = self.encode(text)
        if (set(self.special_strings().values()) | {self.bos_id, self.eos_id}) & set(ids):
            raise UserError(f"{text!r} holds a special string ({', '.join(SPECIAL_TOKENS)}) that this tokenizer "
                            f"cannot encode as text")
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if _is_tokenizers(self.backend):
            return self.backend.decode(ids, skip_special_tokens=False)
        if not hasattr(self.backend, "decode"):
            raise ValueError("this tokenizer has no decode method")
        return self.backend.decode(ids)

    @classmethod
    def wrap(cls, tok, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
             image_id: int | None = None, image_pretoken_id: int | None = None) -> "TextTokenizer":
        """Wrap a `tokenizers.Tokenizer` (or a transformers fast tokenizer, through its backend), or
        any object whose `encode(text)` returns ids without special tokens. Ids not given are looked
        up with `token_to_id` ("<s>", "</s>", "<image>", "### Image:"); pad defaults to eos (the
        reference's choice)."""
        if _is_tokenizers(getattr(tok, "backend_tokenizer", None)):
            tok = tok.backend_tokenizer

        def lookup(given, token):
            if given is not None:
                return int(given)
            tid = tok.token_to_id(token) if hasattr(tok, "token_to_id") else None
            if tid is None:
                raise ValueError(f"give the id of {token!r}: the tokenizer does not know it")
            return int(tid)

        eos = lookup(eos_id, "</s>")
        return cls(backend=tok, bos_id=lookup(bos_id, "<s>"), eos_id=eos, pad_id=eos if pad_id is None else int(pad_id),
                   image_id=lookup(image_id, DEFAULT_IMAGE_TOKEN),
                   image_pretoken_id=lookup(image_pretoken_id, DEFAULT_HUMAN_IMAGE_PRETOKEN))

    @classmethod
    def from_file(cls, path: str, **ids) -> "TextTokenizer":
        """A `tokenizer.json` (the `tokenizers` format), ids looked up by name unless given; a file that
        is missing or not a tokenizer is named."""
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise UserError(f"{path}: no such tokenizer file")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise UserError(f"{path}: not a tokenizer.json ({e})") from None
        return cls.wrap(tok, **ids)
