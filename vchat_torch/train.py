"""`vchat train`: VisualChat on DeepSpeed (the reference's `training/main.py`, made resumable).

    # one process (CPU or one GPU)
    vchat train --lm_model_name_or_path tiny --dataset_names synthetic --precision fp32 \\
        --per_device_train_batch_size 8 --num_train_epochs 1 --output_dir runs/tiny
    # two processes, ZeRO-3
    torchrun --nproc_per_node 2 -m vchat_torch.train --zero_stage 3 ... (same flags)
    deepspeed --num_gpus 8 --module vchat_torch.train ... (on a GPU machine; see configs/run_7b.sh)

What it keeps from the reference: the flags and defaults, AdamW with betas (0.9, 0.95) and eps 1e-6
over four parameter groups, transformers' schedulers with warmup as a ratio or a count, gradient
clipping 1.0, ZeRO 0-3. What it fixes: the sampler order changes per epoch (B8), images are cast to
the model's dtype (B6), offload and a user DeepSpeed config are available (B9), checkpoints are
vchat's `config.json` + safetensors (B10) beside DeepSpeed's resumable checkpoint, and a resume
restarts at the exact step with the data order and every RNG restored.

Output directory: `final/` and `best/` (vchat checkpoints), `ds/` (DeepSpeed checkpoints, `latest`),
`train_log.jsonl`, `loss_curve.png`, `tb/` (TensorBoard, with --enable_tensorboard).
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
import time

import numpy as np
import torch

from vchat.config import ModelConfig, ProjectionConfig, preset
from vchat.data import EncodedDataset, iterate_batches
from vchat.data.pipeline import build_training_data

from .checkpoint import CONFIG_NAME, from_pretrained, save_pretrained
from .model import VisualChat
from .train_args import DeepSpeedConfigError, ds_config, parse_args


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


# -- setup ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Single process without a launcher gets the environment a launcher would give."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def build_model(args) -> VisualChat:
    src = args.lm_model_name_or_path
    if os.path.isdir(src) and os.path.exists(os.path.join(src, CONFIG_NAME)):
        model = from_pretrained(src, compat=args.compat)
    else:
        cfg: ModelConfig = preset(src)
        cfg = cfg.replace(mmca=args.enable_mmca_attention, compat=args.compat,
                          projection=ProjectionConfig(kind=args.vis_proj))
        torch.manual_seed(args.seed)
        model = VisualChat(cfg)
    model.train()
    for name, module in model.named_children():
        module.requires_grad_(name in args.trainable)
    for name, p in model.named_parameters():
        if name.endswith("pos_embed"):  # sin-cos tables stay fixed (B15)
            p.requires_grad_(False)
    if args.gradient_checkpointing:
        model.lang_decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.vis_encoder.gradient_checkpointing_enable()
    if args.lang_lora_dim > 0 or args.vis_lora_dim > 0:
        from .lora import add_lora

        add_lora(model, args)
    elif args.only_optimize_lora:
        raise SystemExit("--only_optimize_lora needs --lang_lora_dim or --vis_lora_dim > 0")
    return model


def param_groups(model: torch.nn.Module, lr: float, lr_small: float, weight_decay: float,
                 lr_vision: float = 0.0) -> list[dict]:
    """The reference's four groups: {decay, no decay} x {other, name contains "embed" (lr_small)};
    with `lr_vision`, the vision tower's parameters get that rate in groups of their own."""
    lr_small = lr_small or lr
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = "bias" in name or "LayerNorm.weight" in name
        rate = lr_small if "embed" in name else lr
        if lr_vision and name.startswith("vis_encoder."):
            rate = lr_vision
        groups.setdefault((0.0 if no_decay else weight_decay, rate, no_decay), []).append(p)
    return [{"params": g, "weight_decay": wd, "lr": rate} for (wd, rate, _), g in groups.items()]


def fixed_batches(data: EncodedDataset, n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  shuffle: bool = True, skip: int = 0):
    """Exactly n batches on every rank (ZeRO collectives need the same count), the epoch's order
    repeated if samples dropped by the budget leave a rank short; the first `skip` are not built."""
    done, rounds = 0, 0
    while done < n:
        for i, batch in enumerate(iterate_batches(data, batch_size, shuffle=shuffle, seed=seed + rounds, epoch=epoch,
                                                  drop_last=True, rank=rank, world_size=world)):
            if done >= n:
                return
            done += 1
            if done > skip:
                yield batch
        rounds += 1
        if rounds > 100:
            raise RuntimeError("the data budget drops almost every sample; raise --max_seq_len")


def to_device(batch, device) -> dict:
    a = batch.arrays()
    return {"images": torch.from_numpy(a["images"]).to(device) if a["images"].shape[0] else None,
            "input_ids": torch.from_numpy(a["input_ids"]).to(device),
            "attention_mask": torch.from_numpy(a["attention_mask"]).to(device),
            "labels": torch.from_numpy(a["labels"]).to(device),
            "image_num": a["image_num"]}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """What `Trainer.export` writes: the full (or trainable-only) state dict with LoRA merged."""
    from .lora import base_name, merged_state_dict

    sd = full_state_dict(model, zero3, rank)
    if sd is None:
        return None
    sd, folded = merged_state_dict(model, sd)
    if trainable_only:
        keep = {base_name(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} | folded
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd


# -- the run ----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, args, rank: int, world: int):
        import deepspeed
        from transformers import get_scheduler

        self.args, self.rank, self.world = args, rank, world
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        if args.precision == "fp16" and not torch.cuda.is_available():
            raise SystemExit("--precision fp16 needs a GPU (DeepSpeed's CPU backend has no fp16); use bf16 or fp32")
        model = build_model(args)
        self.config = model.config
        self.train_data, self.eval_data, self.tokenizer_json = build_training_data(args, self.config, rank == 0)
        micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
        self.micro_per_epoch = len(self.train_data) // (world * micro)
        if self.micro_per_epoch < gas:
            raise SystemExit(f"{len(self.train_data)} training samples make fewer than one optimizer step "
                             f"(micro batch {micro} x {world} processes x accumulation {gas})")
        self.micro_per_epoch -= self.micro_per_epoch % gas
        self.steps_per_epoch = self.micro_per_epoch // gas
        total = args.num_train_epochs * self.steps_per_epoch
        self.total_steps = min(total, args.max_steps) if args.max_steps else total
        warmup = args.num_warmup_steps
        warmup = int(warmup * self.total_steps) if warmup <= 1 else int(warmup)
        groups = param_groups(model, args.learning_rate, args.learning_rate_pretraining_components, args.weight_decay,
                              args.vision_learning_rate)
        if args.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-6, adamw_mode=True)
        else:
            opt = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-6)
        sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        try:
            cfg = ds_config(args, world)
            self.engine, self.opt, _, self.sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                                         config=cfg)
        except DeepSpeedConfigError:
            raise
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            source = f"--deepspeed_config {args.deepspeed_config}" if args.deepspeed_config else "the DeepSpeed config"
            raise DeepSpeedConfigError(f"{source} was refused by DeepSpeed: {type(e).__name__}: {e}") from e
        self.ds_config = cfg
        self.device = self.engine.device
        self.step, self.epoch, self.micro_done, self.best = 0, 0, 0, math.inf
        self.last_eval = self.last_save = -1
        self.history: list[dict] = []
        self.writer = None
        if args.enable_tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"[train] {world} process(es), ZeRO-{cfg['zero_optimization']['stage']}, {args.precision}, "
            f"{n_train:,} trainable parameters ({', '.join(args.trainable)}); {len(self.train_data)} train / "
            f"{len(self.eval_data)} eval samples; {self.steps_per_epoch} steps per epoch, {self.total_steps} in all",
            rank)

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def ds_dir(self) -> str:
        return os.path.join(self.args.output_dir, "ds")

    def save_resumable(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "micro_done": self.micro_done, "best": self.best,
                 "history": self.history, "rng": rng_state()}
        self.engine.save_checkpoint(self.ds_dir, tag=f"step{self.step}", client_state=state)
        if self.rank == 0 and not os.path.exists(os.path.join(self.ds_dir, "tokenizer.json")):
            # once per run, so that ds/ loads on its own (vchat_torch.checkpoint.from_zero, vchat convert)
            self.config.save(os.path.join(self.ds_dir, CONFIG_NAME))
            tmp = os.path.join(self.ds_dir, f"tokenizer.json.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(self.tokenizer_json)
            os.replace(tmp, os.path.join(self.ds_dir, "tokenizer.json"))
        self.last_save = self.step
        log(f"[ckpt] resumable checkpoint at step {self.step} -> {self.ds_dir}/step{self.step}", self.rank)

    def maybe_resume(self) -> None:
        if not os.path.exists(os.path.join(self.ds_dir, "latest")):
            return
        path, state = self.engine.load_checkpoint(self.ds_dir)
        if path is None:
            raise SystemExit(f"{self.ds_dir}/latest exists but its checkpoint could not be loaded")
        self.step, self.epoch, self.micro_done = state["step"], state["epoch"], state["micro_done"]
        self.best, self.history = state["best"], state["history"]
        set_rng_state(state["rng"])
        log(f"[train] resumed from {path}: step {self.step}, epoch {self.epoch}, {self.micro_done} micro-batches "
            "into the epoch", self.rank)

    def export(self, name: str) -> None:
        """vchat checkpoint `output_dir/<name>`: LoRA adapters folded into the base weights under the
        reference's key names (it loads into a plain VisualChat); the live model is left as it is."""
        zero3 = self.ds_config["zero_optimization"]["stage"] == 3  # the flag's or the --deepspeed_config's
        sd = export_state_dict(self.engine.module, zero3, self.rank, self.args.save_trainable_only)
        if self.rank == 0:
            save_pretrained(self.engine.module, os.path.join(self.args.output_dir, name),
                            trainable_only=self.args.save_trainable_only, state_dict=sd,
                            extra_files={"tokenizer.json": self.tokenizer_json})
            log(f"[ckpt] {name}/ written", self.rank)

    # -- loops ---------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        args = self.args
        n = len(self.eval_data) // (self.world * args.per_device_eval_batch_size)
        if n == 0:
            return float("nan")
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in fixed_batches(self.eval_data, n, args.per_device_eval_batch_size, args.seed, 0, self.rank,
                                       self.world, shuffle=False):
                out = self.engine(**to_device(batch, self.device))
                total += torch.tensor([float(out.loss), 1.0], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        self.engine.train()
        return float(total[0] / total[1])

    def record(self, **row) -> None:
        row = {"step": self.step, "epoch": self.epoch, **row}
        self.history.append(row)
        if self.writer:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, float):
                    self.writer.add_scalar(k, v, self.step)

    def run_eval(self) -> None:
        loss = self.evaluate()
        self.last_eval = self.step
        self.record(eval_loss=loss)
        log(f"[eval] step {self.step}: eval loss {loss:.4f}", self.rank)
        if loss < self.best:
            self.best = loss
            self.export("best")

    def train(self, stop_after: int = 0) -> None:
        from tqdm import tqdm

        args, gas = self.args, self.args.gradient_accumulation_steps
        self.maybe_resume()
        if self.step == 0 and self.micro_done == 0:
            self.run_eval()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or args.quiet,
                   desc="train", dynamic_ncols=True, file=sys.stdout,
                   mininterval=0.1 if sys.stdout.isatty() else 10.0)  # a log file gets a line per 10 s
        started, steps_this_run, window, stopped = time.perf_counter(), 0, [], False
        while self.step < self.total_steps:
            batches = fixed_batches(self.train_data, self.micro_per_epoch, args.per_device_train_batch_size,
                                    args.seed, self.epoch, self.rank, self.world, skip=self.micro_done)
            t0, tokens = time.perf_counter(), 0
            for batch in batches:
                out = self.engine(**to_device(batch, self.device))
                self.engine.backward(out.loss)
                self.engine.step()
                self.micro_done += 1
                tokens += int((out.modality > 0).sum())
                window.append(out.loss.item())
                if self.micro_done % gas:
                    continue
                self.step += 1
                steps_this_run += 1
                loss, window = float(np.mean(window)), []
                rate = tokens * self.world / max(time.perf_counter() - t0, 1e-9)
                self.record(loss=loss, lr=float(self.sched.get_last_lr()[0]), tokens_per_s=rate)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                t0, tokens = time.perf_counter(), 0
                if args.eval_every and self.step % args.eval_every == 0:
                    self.run_eval()
                if args.save_every and self.step % args.save_every == 0:
                    self.save_resumable()
                stopped = bool(stop_after) and steps_this_run >= stop_after and self.step < self.total_steps
                if self.step >= self.total_steps or stopped:
                    break
            else:  # the epoch ran to its end
                self.epoch += 1
                self.micro_done = 0
                if not args.eval_every:
                    self.run_eval()
                if not args.save_every:
                    self.save_resumable()
                continue
            break
        bar.close()
        if self.last_save != self.step:
            self.save_resumable()
        if not stopped:
            if self.last_eval != self.step:
                self.run_eval()
            self.export("final")
        self.finish(time.perf_counter() - started)

    def finish(self, seconds: float) -> None:
        if self.rank != 0:
            return
        path = os.path.join(self.args.output_dir, "train_log.jsonl")
        with open(path, "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        plot_losses(self.history, os.path.join(self.args.output_dir, "loss_curve.png"))
        if self.writer:
            self.writer.close()
        log(f"[train] {self.step} steps in all ({seconds:.1f}s this run); log {path}")


def plot_losses(history: list[dict], path: str) -> None:
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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None, prog: str = "vchat train") -> int:
    args = parse_args(argv, prog)
    os.makedirs(args.output_dir, exist_ok=True)
    rank, world = init_distributed()
    try:
        trainer = Trainer(args, rank, world)
        trainer.train(stop_after=args.stop_after_steps)
    except DeepSpeedConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    # Every rank leaves together and tears the process group down before the interpreter exits
    # (gloo's threads otherwise race the exit: "terminate called without an active exception").
    del trainer
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
