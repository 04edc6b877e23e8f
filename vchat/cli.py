"""The `vchat` command: a dispatcher over subcommands that live beside the code they drive.

Each subcommand is named by module path (`module` runs `module.main`, `module:function` that
function) and imported only when it runs, so `vchat --help` starts fast and `vchat/` stays
framework-free.

    vchat check-logits tests/golden/baseline-mmca            # a reference checkpoint vs its goldens
    vchat check-logits tests/golden --framework torch        # every case listed in index.json
    vchat demo                                               # the main job on built-in defaults
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "check-logits": ("vchat.check_logits", "compare a checkpoint's logits, loss and greedy tokens with golden outputs"),
    "train": ("vchat_torch.train", "train with DeepSpeed (the reference's flags)"),
    "train-jax": ("vchat_jax.cli", "train with JAX: jax.jit over a device mesh, optax AdamW, orbax checkpoints"),
    "convert": ("convert.cli", "convert checkpoints: reference pytorch_model.bin, vchat torch and JAX directories"),
    "chat": ("vchat_torch.cli:chat_main", "chat with a checkpoint: image paths and a question per round"),
    "eval": ("vchat_torch.cli:eval_main", "answer the reference's eval JSON with a checkpoint, write a CSV"),
    "demo": ("vchat.demo", "the main job on built-in defaults"),
    "bench": ("vchat_torch.bench", "speed ratios measured in one run: MMCA vs causal, KV cache vs re-encoding, torch vs JAX"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vchat <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vchat <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vchat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    return int(entry(rest, prog=f"vchat {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
