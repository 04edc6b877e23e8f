"""The process group and ZeRO around the torch trainer: the environment a launcher would give a lone
process, the DeepSpeed engine, the teardown, and full state dicts gathered from ZeRO-3 shards for
the exports.

    rank, world = init_distributed()        # torchrun/deepspeed set RANK etc.; a plain process gets rank 0 of 1
    engine, sched, ds_config = make_engine(model, optimizer, scheduler, args, world)
    sd = export_state_dict(engine.module, zero3=True, rank=rank)   # every rank calls it; rank 0 gets the dict
    shutdown_distributed()
"""

from __future__ import annotations

import argparse
import os
import socket

import torch

from .train_args import DeepSpeedConfigError, ds_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size) after DeepSpeed's process group is up. A single process without a launcher
    gets the environment a launcher would give; without CUDA, DeepSpeed's CPU accelerator and gloo."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def shutdown_distributed() -> None:
    """Every rank leaves together and tears the process group down before the interpreter exits
    (gloo's threads otherwise race the exit: "terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def make_engine(model: torch.nn.Module, opt, sched, args: argparse.Namespace, world: int):
    """(DeepSpeed engine, its LR scheduler, the DeepSpeed config) for `model` under the flags' config
    (vchat_torch/train_args.py:ds_config); DeepSpeed's refusal of the config is a DeepSpeedConfigError."""
    import deepspeed

    cfg = ds_config(args, world)
    try:
        engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        source = f"--deepspeed_config {args.deepspeed_config}" if args.deepspeed_config else "the DeepSpeed config"
        raise DeepSpeedConfigError(f"{source} was refused by DeepSpeed: {type(e).__name__}: {e}") from e
    return engine, sched, cfg


def full_state_dict(model: torch.nn.Module, zero3: bool, rank: int) -> dict | None:
    """`model.state_dict()` with ZeRO-3 parameters gathered one module at a time onto rank 0's CPU
    (None on the other ranks; under ZeRO-3 every rank must call it)."""
    if not zero3:
        return {k: v.detach() for k, v in model.state_dict().items()} if rank == 0 else None
    import deepspeed

    copies = {}
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if rank == 0:
                copies.update((id(p), p.detach().to("cpu", copy=True)) for p in own)
    if rank != 0:
        return None
    return {k: copies[id(v)] if isinstance(v, torch.nn.Parameter) else v.detach().cpu()
            for k, v in model.state_dict(keep_vars=True).items()}


def export_state_dict(model: torch.nn.Module, zero3: bool, rank: int, trainable_only: bool = False) -> dict | None:
    """What the trainer's exports (final/, best/) write: the full (or trainable-only) state dict with
    LoRA merged under the reference's key names (None on ranks other than 0)."""
    from .lora import base_name, merged_state_dict

    sd = full_state_dict(model, zero3, rank)
    if sd is None:
        return None
    sd, folded = merged_state_dict(model, sd)
    if trainable_only:
        keep = {base_name(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} | folded
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd
