"""Checks that name a damaged file before a loader trips over it: JSON that does not parse, and a
safetensors file that is truncated or not safetensors at all (its header read with the standard
library: 8 bytes of header length, the JSON header, then the data the header's offsets describe).

Each raises `vchat.errors.UserError` naming the file, so `vchat <command>` reports it in one line.
"""

from __future__ import annotations

import json
import os

from vchat.errors import UserError


def check_json(path: str):
    """The parsed JSON of `path`; a file that does not read or parse is named."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def check_safetensors(path: str) -> None:
    """Refuse a safetensors file whose header does not parse or whose tensors run past its end."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise UserError(f"{path}: not a safetensors file, or truncated (a {size}-byte file whose header "
                            f"length reads {n})")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise UserError(f"{path}: not a safetensors file (its header does not parse: {e})") from None
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated: its tensors need {8 + n + end} bytes, the file has {size}")
