"""The `vchat` command: a dispatcher over subcommands that live beside the code they drive.

Each subcommand is named by module path (`module` runs `module.main`, `module:function` that
function) and imported only when it runs, so `vchat --help` starts fast and `vchat/` stays
framework-free: the commands live in the layers above it (docs/ARCHITECTURE.md).

    vchat check-logits tests/golden/baseline-mmca            # a reference checkpoint vs its goldens
    vchat check-logits tests/golden --framework torch        # every case listed in index.json
    vchat demo                                               # the main job on built-in defaults

A user error (`vchat.errors.UserError`, or a file that is missing, unreadable or of the wrong kind)
ends the command with one line, `vchat <command>: message`, on stderr and exit status 1; `--debug`
anywhere on the command line (or VCHAT_DEBUG=1) lets the traceback through instead.
"""

from __future__ import annotations

import importlib
import os
import sys

from vchat.errors import UserError, debugging

COMMANDS: dict[str, tuple[str, str]] = {
    "check-logits": ("crosscheck.check_logits", "compare a checkpoint's logits, loss and greedy tokens with golden outputs"),
    "train": ("vchat_torch.cli:train_main", "train with DeepSpeed (the reference's flags)"),
    "train-jax": ("vchat_jax.cli:train_main", "train with JAX: jax.jit over a device mesh, optax AdamW, orbax checkpoints"),
    "convert": ("convert.cli", "convert checkpoints: reference pytorch_model.bin, vchat torch and JAX directories"),
    "chat": ("vchat_torch.cli:chat_main", "chat with a checkpoint: image paths and a question per round"),
    "eval": ("vchat_torch.cli:eval_main", "answer the reference's eval JSON with a checkpoint, write a CSV"),
    "demo": ("demo.run", "the main job on built-in defaults"),
    "bench": ("crosscheck.bench", "MMCA train step vs transformers' SDPA causal step: time, RSS, decode"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vchat <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vchat <command> --help` describes a command's options; `--debug` shows tracebacks."]
    return "\n".join(lines)


# OSErrors that are the user's: a path that is missing, not permitted, or a file where a folder is due.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def user_message(e: BaseException) -> str | None:
    """The one-line message of a user error, None for anything else (a bug: its traceback is shown)."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, USER_OS_ERRORS) and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        os.environ["VCHAT_DEBUG"] = "1"
        argv = [a for a in argv if a != "--debug"]
    debug = debugging()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vchat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    try:
        entry = getattr(importlib.import_module(module_name), function or "main")
        return int(entry(rest, prog=f"vchat {name}") or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vchat {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_message(e)
        if debug or message is None:
            raise
        print(f"vchat {name}: {message}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
