"""The flags both trainers share (`vchat train` on DeepSpeed, `vchat train-jax`), declared once; their
one validation; and what they mean for the run (its model source, length and warmup).

    p = train_parser("vchat train", "Train ...", schedules=("linear", "cosine"))  # the shared flags
    p.reference.add_argument("--zero_stage", ...)          # a trainer's own flags, in the same groups
    args = parse_train_args(p.parser, argv, check=check_flags)  # every check, before any work

The names and defaults are the reference's (`training/main.py:parse_args`), so its recipes run with
paths changed; vchat's additions come after them in `--help`. A bad value ends the command with one
line naming the flag (`prog: --flag ...`), exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable

from vchat.checkpoint_files import CONFIG_NAME
from vchat.config import ModelConfig, ProjectionConfig, preset
from vchat.data import REFERENCE_DATASETS
from vchat.errors import UserError
from vchat.flag_checks import flag_problems
from vchat.param_groups import TRAINABLE_PARTS, check_parts
from vchat.run_guard import add_run_flags

DATASET_CHOICES = tuple(REFERENCE_DATASETS) + ("synthetic",)


class FlagError(UserError):
    """A flag value a trainer refuses; the message starts with the flag."""


@dataclasses.dataclass
class TrainParser:
    """An argparse parser holding the shared flags, and its two groups for a trainer's own flags."""

    parser: argparse.ArgumentParser
    reference: argparse._ArgumentGroup  # the reference's flags
    additions: argparse._ArgumentGroup  # vchat's


def train_parser(prog: str, description: str, schedules: tuple[str, ...]) -> TrainParser:
    """The shared flags; `schedules` are the trainer's --lr_scheduler_type choices."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    r = ap.add_argument_group("the reference's flags")
    r.add_argument("--data_path", default="./data/")
    r.add_argument("--data_train_split_ratio", type=float, default=0.9)
    r.add_argument("--dataset_names", nargs="*", default=["minigpt4"],
                   help="reference dataset names, or `synthetic` (the built-in multi-image shapes data)")
    r.add_argument("--dataset_samples", nargs="*", default=["all"])
    r.add_argument("--dataset_concatenate_samples", nargs="*", type=int, default=[1])
    r.add_argument("--max_num_image_per_sample", type=int, default=8)
    r.add_argument("--per_device_train_batch_size", type=int, default=2)
    r.add_argument("--max_seq_len", type=int, default=4096)
    r.add_argument("--learning_rate", type=float, default=1e-3)
    r.add_argument("--learning_rate_pretraining_components", type=float, default=0)
    r.add_argument("--weight_decay", type=float, default=0.0)
    r.add_argument("--num_train_epochs", type=int, default=6)
    r.add_argument("--lr_scheduler_type", choices=schedules, default="cosine")
    r.add_argument("--num_warmup_steps", type=float, default=0,
                   help="warmup optimizer steps: <= 1 a ratio of the run's steps, > 1 a count")
    r.add_argument("--output_dir", default=None)
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--lm_model_name_or_path", default=None,
                   help="a Hugging Face LLaMA directory (with --vision_model_name_or_path), a vchat checkpoint "
                        "directory, a model preset name, or a model config JSON")
    r.add_argument("--vision_model_name_or_path", default="openai/clip-vit-large-patch14",
                   help="with a Hugging Face LLaMA directory: the vision tower's directory (a CLIPModel or "
                        "CLIPVisionModel checkpoint, a Qwen-VL checkpoint or its extracted tower)")
    r.add_argument("--enable_mmca_attention", action="store_true")
    r.add_argument("--vis_proj", choices=("baseline", "vit", "perceiver"), default="baseline")
    v = ap.add_argument_group("vchat's additions")
    v.add_argument("--vision_model_type", choices=("clip", "qwen"), default=None,
                   help="the vision directory's kind (default: detected from its config and tensors)")
    v.add_argument("--compat", choices=("dsvc", "fixed"), default="fixed")
    v.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    v.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the data, or the synthetic one)")
    v.add_argument("--trainable", default="lang_embed,projection",
                   help=f"comma list of parts to train, from {','.join(TRAINABLE_PARTS)}")
    v.add_argument("--synthetic_samples", type=int, default=2000, help="size of the built-in synthetic dataset")
    v.add_argument("--skip_missing_images", action="store_true",
                   help="drop (and count) the samples that name a missing image file, instead of refusing the data")
    v.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
    add_run_flags(v)
    return TrainParser(ap, r, v)


def parse_train_args(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                     check: Callable[[argparse.Namespace], None] | None = None) -> argparse.Namespace:
    """Parse, then validate every flag (`validate`, then the trainer's own `check`); a FlagError ends
    the command with `prog: message`."""
    args = parser.parse_args(argv)
    try:
        validate(args)
        if check is not None:
            check(args)
    except FlagError as e:
        raise SystemExit(f"{parser.prog}: {e}") from None
    return args


def validate(args: argparse.Namespace) -> None:
    """The shared flags' checks; `--trainable` becomes a list of parts."""
    if args.output_dir is None:
        raise FlagError("--output_dir is required")
    if args.lm_model_name_or_path is None:
        raise FlagError("--lm_model_name_or_path is required (a vchat checkpoint, a preset or a config JSON)")
    problems = flag_problems(args)  # every value (vchat/flag_checks.py), each naming its flag
    if problems:
        raise FlagError("; ".join(problems))
    unknown = [n for n in args.dataset_names if n not in DATASET_CHOICES]
    if unknown:
        raise FlagError(f"--dataset_names: unknown dataset(s) {unknown}; known: {', '.join(DATASET_CHOICES)}")
    try:
        args.trainable = list(check_parts([p for p in args.trainable.split(",") if p]))
    except ValueError:
        raise FlagError(f"--trainable takes parts from {TRAINABLE_PARTS}, got {args.trainable!r}") from None


@dataclasses.dataclass(frozen=True)
class HFSource:
    """Hugging Face directories to build the model from (each framework's `from_hf` takes these)."""

    lm_dir: str
    vision_dir: str | None
    kwargs: dict  # vision_type, max_seq_len, mmca, compat, projection, seed


def model_source(args: argparse.Namespace) -> str | ModelConfig | HFSource:
    """What --lm_model_name_or_path names: a Hugging Face LLaMA directory (an HFSource, with
    --vision_model_name_or_path and --vision_model_type; a `vchat convert --to hf` output alone), a
    vchat checkpoint directory (returned as its path; it loads as saved, with --compat), or else a preset
    or config JSON (returned as its ModelConfig with --enable_mmca_attention, --compat and --vis_proj
    applied: a new model)."""
    from vchat.hf import is_hf_lm_dir

    src = args.lm_model_name_or_path
    if is_hf_lm_dir(src):
        vision = args.vision_model_name_or_path
        exported = os.path.exists(os.path.join(src, "visualchat.json"))
        return HFSource(src, None if exported and not os.path.isdir(vision) else vision,
                        dict(vision_type=args.vision_model_type, max_seq_len=args.max_seq_len,
                             mmca=args.enable_mmca_attention, compat=args.compat, projection=args.vis_proj,
                             seed=args.seed))
    if os.path.isdir(src) and os.path.exists(os.path.join(src, CONFIG_NAME)):
        return src
    return preset(src).replace(mmca=args.enable_mmca_attention, compat=args.compat,
                               projection=ProjectionConfig(kind=args.vis_proj))


def total_steps(num_train_epochs: int, steps_per_epoch: int, max_steps: int) -> int:
    """The run's optimizer steps: the epochs', at most --max_steps (0: no limit)."""
    total = num_train_epochs * steps_per_epoch
    return min(total, max_steps) if max_steps else total


def warmup_steps(num_warmup_steps: float, total: int) -> int:
    """--num_warmup_steps: <= 1 is a ratio of the run's `total` steps, > 1 a count."""
    return int(num_warmup_steps * total) if num_warmup_steps <= 1 else int(num_warmup_steps)
