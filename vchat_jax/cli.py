"""`vchat train-jax`: train VisualChat with the sharded JAX step (vchat_jax/train.py).

    # one device (or every local device along `data`), the built-in synthetic data
    vchat train-jax --lm_model_name_or_path tiny --dataset_names synthetic --synthetic_samples 400 \\
        --per_device_train_batch_size 8 --learning_rate 1e-3 --num_train_epochs 1 --output_dir runs/jax
    # eight devices as 2 x 2 x 2 (try it on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=8)
    vchat train-jax --mesh data=2,fsdp=2,tensor=2 --lm_model_name_or_path demo --dataset_names synthetic \\
        --enable_mmca_attention --max_steps 50 --output_dir runs/jax8
    # continue from a vchat checkpoint (vchat_jax orbax directory or vchat_torch safetensors directory)
    vchat train-jax --lm_model_name_or_path runs/jax/final --dataset_names synthetic --output_dir runs/jax2
    # several hosts: the same command on every host, with --distributed (jax.distributed.initialize())

The flags shared with `vchat train` (vchat/train_args.py: same names and defaults), plus the JAX
ones below. The global batch is per_device_train_batch_size x (data x fsdp): one per-device batch
per data-parallel shard, as under DeepSpeed. Output directory: `state/` (orbax train states:
parameters, AdamW moments, step; a rerun of the same command resumes from the newest intact one, the
newest --save_total_limit kept), `final/` (a vchat_jax checkpoint: config.json + params/,
tokenizer.json), `train_log.jsonl`, `loss_curve.png`, `.lock` (held while a run writes). The run's
guards (lock, refusal of a changed rerun, NaN/Inf stop) are vchat/run_guard.py's.
"""

from __future__ import annotations

import argparse
import os
import sys

from vchat.train_args import FlagError, parse_train_args, train_parser


def build_parser(prog: str = "vchat train-jax") -> argparse.ArgumentParser:
    from .optim import SCHEDULES

    p = train_parser(prog, "Train VisualChat with JAX (jax.jit over a device mesh).", SCHEDULES)
    j = p.parser.add_argument_group("JAX only")
    j.add_argument("--mesh", default=None,
                   help="mesh axis sizes, e.g. data=2,fsdp=2,tensor=2 (default: every device along data)")
    j.add_argument("--save_every", type=int, default=0, help="save the train state every N steps (0: at the end)")
    j.add_argument("--log_every", type=int, default=0, help="print every N steps (0: about 20 lines a run)")
    j.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host)")
    return p.parser


def check_flags(args: argparse.Namespace) -> None:
    """`vchat train-jax`'s own flags, checked after the shared ones (a FlagError names the flag)."""
    from .sharding import parse_mesh

    try:
        parse_mesh(args.mesh)
    except ValueError as e:
        raise FlagError(f"--mesh: {e}") from None


def parse_args(argv: list[str] | None = None, prog: str = "vchat train-jax") -> argparse.Namespace:
    """The parsed and validated flags (SystemExit with one line naming the flag on a bad value)."""
    return parse_train_args(build_parser(prog), argv, check_flags)


def train_main(argv: list[str] | None = None, prog: str = "vchat train-jax") -> int:
    """`vchat train-jax`: this process's part of the run (every host runs the same command)."""
    args = parse_args(argv, prog)
    import jax

    if args.distributed:
        jax.distributed.initialize()
    from vchat.run_guard import RunGuard

    from .train import TrainRun, resumable_steps

    lead = jax.process_index() == 0  # the writing process: it holds output_dir's lock
    with RunGuard(args, resumable_steps(args.output_dir), lead, print if lead else lambda line: None) as guard:
        os.makedirs(args.output_dir, exist_ok=True)
        TrainRun(args, guard).train()
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
