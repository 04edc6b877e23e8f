"""Atomic writes of files and directories, shared by every writer (checkpoints, reports, datasets).

    with writing_file("out/report.json") as f:        # a file: renamed into place when the block ends
        json.dump(report, f)
    with writing_dir("out/final") as tmp:              # a directory: the same, for a whole checkpoint
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME))

Everything goes to a hidden temporary sibling of the target first and is renamed into place at
the end (replacing an older file or directory only then), so a crash never leaves a half-written
file; on an error the temporary is removed.
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


@contextmanager
def writing_file(final: str, mode: str = "w", **open_kwargs):
    """`with writing_file(path) as f:` write f (opened with `mode`, "w" or "wb", and `open_kwargs`);
    renamed to `path` on success (replacing an older file), removed on error."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.tmp", dir=parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
