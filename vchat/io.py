"""Atomic directory writes, shared by every checkpoint writer (torch, JAX, converters).

Files go to a hidden temporary sibling of the target; `commit_dir` renames it into place at the
end (replacing an older directory only then), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager


def atomic_dir(final: str) -> str:
    """A new temporary sibling of `final` to write into."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(final))}.tmp", dir=parent)


def commit_dir(tmp: str, final: str) -> None:
    """Rename `tmp` to `final`, replacing an existing `final`."""
    if os.path.exists(final):
        old = f"{final}.old{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def list_names(keys, limit: int = 20) -> str:
    """Sorted names for an error message, at most `limit` of them."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@contextmanager
def writing_dir(final: str):
    """`with writing_dir(path) as tmp:` write into tmp; committed on success, removed on error."""
    tmp = atomic_dir(final)
    try:
        yield tmp
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
