"""Every training flag's value and every DeepSpeed config entry checked before any work, each problem
naming the flag or the key (`--per_device_train_batch_size 0: must be at least 1`,
`"gradient_clipping" must be a number >= 0, got "one"`).

    problems = flag_problems(args)          # both trainers: the rules of the flags a parser has
    problems = ds_config_problems(config)   # vchat train: a DeepSpeed JSON (the user's, merged)

Each returns a list of one-line messages (empty: all is well); the trainers raise them as their
FlagError / DeepSpeedConfigError. Flags a trainer does not have are skipped, so one table serves both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

Rule = Callable[[object], "str | None"]  # a value -> what is wrong with it, or None


def at_least(lo: int) -> Rule:
    return lambda v: None if v >= lo else f"must be at least {lo}"


def finite_at_least(lo: float) -> Rule:
    return lambda v: None if math.isfinite(v) and v >= lo else f"must be a finite number >= {lo:g}"


def optional(rule: Rule) -> Rule:
    return lambda v: None if v is None else rule(v)


def each(rule: Rule) -> Rule:
    def check(values) -> str | None:
        for v in values:
            if (problem := rule(v)) is not None:
                return f"{v!r} {problem}"
        return None

    return check


def sample_count(v) -> str | None:
    if str(v) == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        return "must be 'all' or a count >= 0"
    return None if n >= 0 else "must be 'all' or a count >= 0"


def existing_file(v) -> str | None:
    return None if os.path.isfile(v) else "no such file"


def writable_dir(v) -> str | None:
    """A directory that is or can be made: no file on its way, its nearest existing folder writable."""
    path = os.path.abspath(v)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return "is a file, not a directory" if path == os.path.abspath(v) else f"{path} is a file, not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


FLAG_RULES: dict[str, Rule] = {
    "per_device_train_batch_size": at_least(1),
    "per_device_eval_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "num_train_epochs": at_least(1),
    "max_steps": at_least(0),
    "max_seq_len": at_least(1),
    "max_num_image_per_sample": at_least(1),
    "synthetic_samples": at_least(1),
    "seed": lambda v: None if 0 <= v < 2**32 else "must be in [0, 2**32)",
    "learning_rate": finite_at_least(0),
    "learning_rate_pretraining_components": finite_at_least(0),
    "vision_learning_rate": finite_at_least(0),
    "weight_decay": finite_at_least(0),
    "num_warmup_steps": finite_at_least(0),
    "data_train_split_ratio": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "dataset_samples": each(sample_count),
    "dataset_concatenate_samples": each(at_least(1)),
    "eval_every": at_least(0),
    "save_every": at_least(0),
    "log_every": at_least(0),
    "stop_after_steps": at_least(0),
    "save_total_limit": at_least(0),
    "max_nonfinite_skips": at_least(0),
    "lang_lora_dim": at_least(0),
    "vis_lora_dim": at_least(0),
    "lora_alpha": optional(lambda v: None if math.isfinite(v) and v > 0 else "must be a finite number > 0"),
    "lora_dropout": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "output_dir": optional(writable_dir),
    "deepspeed_config": optional(existing_file),
}
PER_DATASET = ("dataset_samples", "dataset_concatenate_samples")  # one value, or one per --dataset_names


def flag_problems(args: argparse.Namespace) -> list[str]:
    """`--flag value: what is wrong` for every flag of `args` that FLAG_RULES refuses."""
    problems = []
    for flag, rule in FLAG_RULES.items():
        if hasattr(args, flag) and (problem := rule(getattr(args, flag))) is not None:
            problems.append(f"--{flag} {_shown(getattr(args, flag))}: {problem}")
    names = getattr(args, "dataset_names", None) or []
    for flag in PER_DATASET:
        values = getattr(args, flag, None)
        if values is not None and len(values) not in (1, len(names)):
            problems.append(f"--{flag}: give one value or one per --dataset_names ({len(names)}), got {len(values)}")
    return problems


def _shown(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


# -- DeepSpeed config ------------------------------------------------------------------------------------
def number(lo: float, strict: bool = False) -> Rule:
    def check(v) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if strict else v >= lo)
        return None if ok else f"must be a number {'>' if strict else '>='} {lo:g}"

    return check


def integer(lo: int) -> Rule:
    def check(v) -> str | None:
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= lo else f"must be an integer >= {lo}"

    return check


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def mapping(v) -> str | None:
    return None if isinstance(v, dict) else "must be a JSON object"


def one_of(*choices) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


_OFFLOAD = {"": mapping, "device": one_of("cpu", "nvme", "none"), "pin_memory": boolean, "nvme_path": lambda v: None}
_PRECISION = {"": mapping, "enabled": boolean}
DS_RULES: dict[str, Rule] = {
    "train_batch_size": integer(1),
    "train_micro_batch_size_per_gpu": integer(1),
    "gradient_accumulation_steps": integer(1),
    "gradient_clipping": number(0),
    "gradient_predivide_factor": number(0, strict=True),
    "steps_per_print": integer(1),
    **{k: boolean for k in ("prescale_gradients", "wall_clock_breakdown", "zero_allow_untested_optimizer",
                            "zero_force_ds_cpu_optimizer", "dump_state", "memory_breakdown")},
    "communication_data_type": one_of(None, "fp16", "bf16", "fp32"),
    **{f"fp16.{k}" if k else "fp16": r for k, r in _PRECISION.items()},
    "fp16.auto_cast": boolean,
    "fp16.loss_scale": number(0),
    "fp16.initial_scale_power": integer(0),
    "fp16.loss_scale_window": integer(1),
    "fp16.hysteresis": integer(1),
    "fp16.min_loss_scale": number(0, strict=True),
    **{f"{p}.{k}" if k else p: r for p in ("bf16", "bfloat16") for k, r in _PRECISION.items()},
    "zero_optimization": mapping,
    **{f"zero_optimization.{k}": boolean for k in (
        "overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions", "round_robin_gradients",
        "memory_efficient_linear", "stage3_gather_16bit_weights_on_model_save", "elastic_checkpoint")},
    **{f"zero_optimization.{k}": number(1) for k in (
        "reduce_bucket_size", "allgather_bucket_size", "sub_group_size")},
    **{f"zero_optimization.{k}": number(0) for k in (
        "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
        "stage3_max_reuse_distance")},
    **{f"zero_optimization.{p}.{k}" if k else f"zero_optimization.{p}": r
       for p in ("offload_optimizer", "offload_param") for k, r in _OFFLOAD.items()},
    "activation_checkpointing": mapping,
}


def ds_config_problems(config: dict) -> list[str]:
    """`"key" must be ..., got value` for every entry of a DeepSpeed config that DS_RULES refuses (nested
    keys dotted: "zero_optimization.overlap_comm"); keys it does not list are DeepSpeed's to judge (and
    vchat_torch/train_args.py's: zero_optimization.stage, optimizer, scheduler, the batch product)."""
    problems = []
    for key, rule in DS_RULES.items():
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else ():
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and (problem := rule(node[leaf])) is not None:
            problems.append(f'"{key}" {problem}, got {json.dumps(node[leaf])}')
    return problems

