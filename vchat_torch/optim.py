"""The torch trainer's optimizer and schedule, as the reference's `training/main.py` makes them: AdamW
with betas (0.9, 0.95) and eps 1e-6 over the parameter groups of vchat/param_groups.py
(DeepSpeedCPUAdam in AdamW mode with --offload), and transformers' scheduler with warmup as a ratio
or a count. vchat_jax/optim.py is the optax twin."""

from __future__ import annotations

import argparse

import torch

from vchat.param_groups import group_hparams, group_of
from vchat.train_args import warmup_steps

BETAS, EPS = (0.9, 0.95), 1e-6


def param_groups(model: torch.nn.Module, lr: float, lr_small: float, weight_decay: float,
                 lr_vision: float = 0.0) -> list[dict]:
    """The reference's four groups: {decay, no decay} x {other, name contains "embed" (lr_small)};
    with `lr_vision`, the vision tower's parameters get that rate in groups of their own."""
    groups: dict[tuple[float, float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = group_of(name)
        wd, rate = group_hparams(group, lr, lr_small, weight_decay)
        if lr_vision and name.startswith("vis_encoder."):
            rate = lr_vision
        groups.setdefault((wd, rate, group.endswith("no_decay")), []).append(p)
    return [{"params": g, "weight_decay": wd, "lr": rate} for (wd, rate, _), g in groups.items()]


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, total_steps: int):
    """(optimizer, LR scheduler) over `model`'s trainable parameters for a run of `total_steps`."""
    from transformers import get_scheduler

    groups = param_groups(model, args.learning_rate, args.learning_rate_pretraining_components, args.weight_decay,
                          args.vision_learning_rate)
    if args.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=BETAS, eps=EPS, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=args.learning_rate, betas=BETAS, eps=EPS)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup_steps(args.num_warmup_steps,
                                                                                      total_steps),
                          num_training_steps=total_steps)
    return opt, sched
