"""The training log both trainers leave in their output directory: `train_log.jsonl` (one JSON row per
record: step and epoch, then loss, lr, tokens_per_s, grad_norm or eval_loss) and `loss_curve.png`.

    write_log(output_dir, history)              # the whole history at once (vchat train keeps it in
                                                #   its resumable state)
    with appending_log(output_dir) as append:   # rows as they come (vchat train-jax)
        append({"step": 1, "epoch": 0, "loss": 2.5})
    plot_losses(read_log(output_dir), output_dir)

matplotlib is imported inside `plot_losses` only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vchat.io import writing_file

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss_curve.png"


def write_log(output_dir: str, rows: list[dict]) -> str:
    """`output_dir/train_log.jsonl` holding `rows`, written atomically. Returns its path."""
    path = os.path.join(output_dir, LOG_NAME)
    with writing_file(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@contextmanager
def appending_log(output_dir: str, enabled: bool = True) -> Iterator[Callable[[dict], None]]:
    """`with appending_log(d) as append:` each `append(row)` adds a line to `d/train_log.jsonl` and
    flushes it; with `enabled=False` (not the writing process) nothing is opened or written."""
    if not enabled:
        yield lambda row: None
        return
    with open(os.path.join(output_dir, LOG_NAME), "a") as f:

        def append(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        yield append


def read_log(output_dir: str) -> list[dict]:
    """The rows of `output_dir/train_log.jsonl` ([] if there is none)."""
    path = os.path.join(output_dir, LOG_NAME)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(history: list[dict], output_dir: str) -> str:
    """`output_dir/loss_curve.png`: train loss per optimizer step, and eval loss where measured. Returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r and not math.isnan(r["eval_loss"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("VisualChat training")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, PLOT_NAME)
    with writing_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
