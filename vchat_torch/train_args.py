"""`vchat train`'s own flags (beside the shared ones of vchat/train_args.py) and the DeepSpeed config
they make.

The flags are the reference's (`training/main.py:parse_args`, DSVC_INVENTORY.md section 3) with the
same names and defaults, so its `run_7b.sh` recipe runs with paths changed; vchat adds `--offload`,
`--deepspeed_config`, `--compat`, `--max_steps`, `--eval_every`, `--save_every` and a few of its
own (model source, tokenizer, trainable parts), all after the reference's in `--help`.
"""

from __future__ import annotations

import argparse
import json
import os

from vchat.errors import UserError
from vchat.flag_checks import ds_config_problems
from vchat.train_args import FlagError, parse_train_args, train_parser

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_parser(prog: str = "vchat train") -> argparse.ArgumentParser:
    p = train_parser(prog, "Train VisualChat with DeepSpeed (the reference's flags).", SCHEDULES)
    r = p.reference
    r.add_argument("--data_debug_path", default=None)
    r.add_argument("--per_device_eval_batch_size", type=int, default=2)
    r.add_argument("--gradient_accumulation_steps", type=int, default=1)
    r.add_argument("--local_rank", type=int, default=-1)
    r.add_argument("--gradient_checkpointing", action="store_true")
    r.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=0)
    r.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    r.add_argument("--enable_tensorboard", action="store_true")
    r.add_argument("--lang_lora_dim", type=int, default=0)
    r.add_argument("--lang_lora_module_name", default="model.layers.")
    r.add_argument("--vis_lora_dim", type=int, default=0)
    r.add_argument("--vis_lora_module_name", default="encoder.layers.")
    r.add_argument("--only_optimize_lora", action="store_true")
    r.add_argument("--deepspeed", action="store_true",
                   help="accepted for the reference's scripts (DeepSpeed's own flag); vchat always trains with DeepSpeed")

    v = p.additions
    v.add_argument("--offload", action="store_true", help="ZeRO offload of the optimizer (and parameters at stage 3)")
    v.add_argument("--deepspeed_config", default=None, help="a DeepSpeed JSON; its entries win over the flags")
    v.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: once per epoch)")
    v.add_argument("--save_every", type=int, default=0, help="resumable checkpoint every N steps (0: per epoch)")
    v.add_argument("--vision_learning_rate", type=float, default=0.0,
                   help="learning rate of the vision tower when it is trainable (0: --learning_rate)")
    v.add_argument("--save_trainable_only", action="store_true", help="final/best checkpoints hold trainable tensors")
    v.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha (default 1: scaling 1/r, as the reference)")
    v.add_argument("--lora_dropout", type=float, default=0.0)
    v.add_argument("--stop_after_steps", type=int, default=0,
                   help="end this run after N steps, schedule unchanged (resume later with the same command)")
    return p.parser


def check_flags(args: argparse.Namespace) -> None:
    """`vchat train`'s own flags, checked after the shared ones (a FlagError names the flag)."""
    if args.only_optimize_lora and args.lang_lora_dim <= 0 and args.vis_lora_dim <= 0:
        raise FlagError("--only_optimize_lora needs --lang_lora_dim or --vis_lora_dim > 0")
    if args.max_nonfinite_skips and args.zero_stage == 3:
        raise FlagError("--max_nonfinite_skips needs --zero_stage 0-2 (a skipped micro-batch backpropagates a "
                        "zero loss through every trainable parameter; ZeRO-3 holds them partitioned)")
    if args.deepspeed_config:  # every entry before any work (DeepSpeedConfigError), the world size as launched
        ds_config(args, int(os.environ.get("WORLD_SIZE", "1")))


def parse_args(argv=None, prog: str = "vchat train") -> argparse.Namespace:
    """The parsed and validated flags (SystemExit with one line naming the flag on a bad value)."""
    return parse_train_args(build_parser(prog), argv, check_flags)


class DeepSpeedConfigError(UserError):
    pass


def ds_config(args: argparse.Namespace, world_size: int) -> dict:
    """The reference's training config (`utils/ds_utils.py:get_train_ds_config`), then the user's file."""
    zero = {"stage": args.zero_stage, "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 0, "memory_efficient_linear": False}
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps,
        "steps_per_print": 10**9,  # vchat prints its own progress
        "zero_optimization": zero,
        "fp16": {"enabled": args.precision == "fp16", "loss_scale_window": 100},
        "bf16": {"enabled": args.precision == "bf16"},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if args.deepspeed_config:
        cfg = merge_user_config(cfg, read_user_config(args.deepspeed_config), args.deepspeed_config, world_size)
    return cfg


def read_user_config(path: str) -> dict:
    if not os.path.exists(path):
        raise DeepSpeedConfigError(f"--deepspeed_config {path}: no such file")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"--deepspeed_config {path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(cfg, dict):
        raise DeepSpeedConfigError(f"--deepspeed_config {path}: expected a JSON object, got {type(cfg).__name__}")
    problems = ds_config_problems(cfg)
    if problems:
        raise DeepSpeedConfigError(f"--deepspeed_config {path}: {'; '.join(problems)}")
    return cfg


def merge_user_config(base: dict, user: dict, path: str, world_size: int) -> dict:
    cfg = {**base, **{k: v for k, v in user.items() if k != "zero_optimization"}}
    cfg["zero_optimization"] = {**base["zero_optimization"], **user.get("zero_optimization", {})}
    stage = cfg["zero_optimization"].get("stage")
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"--deepspeed_config {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise DeepSpeedConfigError(f"--deepspeed_config {path}: '{key}' is set by vchat (the reference's AdamW "
                                       "groups and --lr_scheduler_type); remove it from the file")
    micro, gas = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    if "train_batch_size" in user and user["train_batch_size"] != micro * gas * world_size:
        raise DeepSpeedConfigError(
            f"--deepspeed_config {path}: train_batch_size {user['train_batch_size']} != micro batch {micro} x "
            f"gradient accumulation {gas} x {world_size} processes")
    cfg["train_batch_size"] = micro * gas * world_size
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise DeepSpeedConfigError(f"--deepspeed_config {path}: fp16 and bf16 are both enabled")
    return cfg
