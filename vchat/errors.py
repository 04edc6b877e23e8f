"""`UserError`: the base of every error that is the user's input, not a bug of vchat.

`vchat <command>` (vchat/cli.py) prints such an error as one line, `vchat <command>: message`, and
exits 1 without a traceback (`--debug` shows it). Subclasses name what was wrong: the flag, the key,
the file, the dataset and sample, the test and round. Existing error classes derive from it:
`vchat.data.DataError`, the checkpoint, DeepSpeed-config and conversion errors.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """Bad input from the user (a flag value, a file, a dataset); the message says which and why."""


def debugging() -> bool:
    """Whether tracebacks are wanted (`vchat --debug ...` sets VCHAT_DEBUG=1): a command that reports
    its own errors re-raises them then."""
    return os.environ.get("VCHAT_DEBUG", "") not in ("", "0")

