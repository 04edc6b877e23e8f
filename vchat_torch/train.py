"""The DeepSpeed trainer behind `vchat train`: its loop, evaluation, exports and resume (the reference's
`training/main.py`, made resumable). The flags are vchat/train_args.py's shared ones and
vchat_torch/train_args.py's; the optimizer is optim.py's, the batches batches.py's, the process group
and ZeRO-3 gathering distributed.py's, the log and loss curve vchat/train_log.py's; the command's
main is vchat_torch/cli.py:train_main.

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

Output directory: `final/` and `best/` (vchat checkpoints), `ds/` (DeepSpeed checkpoints `step<N>/`,
each with its `vchat_step.json`, and `latest`; the newest --save_total_limit kept), `train_log.jsonl`,
`loss_curve.png`, `tb/` (TensorBoard, with --enable_tensorboard), `.lock` (held while a run writes).
The run's guards (lock, refusal of a changed rerun, fallback to an intact step, NaN/Inf stop) are
vchat/run_guard.py's.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import numpy as np
import torch

from vchat.checkpoint_files import CONFIG_NAME, TOKENIZER_NAME
from vchat.hf_export import checkpoint_extras
from vchat.data.pipeline import build_training_data
from vchat.io import writing_file
from vchat.param_groups import is_trainable
from vchat.run_guard import RunGuard, model_facts, run_identity
from vchat.run_steps import StepDirs
from vchat.train_args import HFSource, model_source, total_steps
from vchat.train_log import plot_losses, write_log

from .batches import fixed_batches, to_device
from .checkpoint import from_pretrained, save_pretrained
from .distributed import export_state_dict, make_engine
from .model import VisualChat
from .optim import make_optimizer
from .train_args import ds_config


def resumable_steps(output_dir: str) -> StepDirs:
    """The DeepSpeed checkpoints of a run: output_dir/ds/step<N>, and `latest` naming the newest."""
    return StepDirs(os.path.join(output_dir, "ds"), r"step(\d+)", latest="latest")


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


def build_model(args: argparse.Namespace) -> VisualChat:
    """The model to train (vchat/train_args.py:model_source: a checkpoint, or a new model seeded with
    --seed), in train mode with only the --trainable parts trainable, gradient checkpointing and LoRA
    adapters as the flags say."""
    src = model_source(args)
    if isinstance(src, HFSource):
        from .hf import from_hf

        # ZeRO-3: built inside zero.Init in the training dtype, so no rank holds the whole model (LoRA's
        # adapters are injected into whole modules: with LoRA the model is built whole, then partitioned)
        zero3 = args.zero_stage == 3 and args.lang_lora_dim == 0 and args.vis_lora_dim == 0
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
        model = from_hf(src.lm_dir, src.vision_dir, zero3=zero3, dtype=dtype if zero3 else None, **src.kwargs)
    elif isinstance(src, str):
        model = from_pretrained(src, compat=args.compat).float()  # fp32 weights: DeepSpeed casts for --precision
    else:
        torch.manual_seed(args.seed)
        model = VisualChat(src)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name.split("."), args.trainable))
    if args.gradient_checkpointing:
        model.lang_decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.vis_encoder.gradient_checkpointing_enable()
    if args.lang_lora_dim > 0 or args.vis_lora_dim > 0:
        from .lora import add_lora

        add_lora(model, args)
    return model


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the run ----------------------------------------------------------------------------------------
class Trainer:
    """One training run of `vchat train` on this process (rank `rank` of `world`):

        trainer = Trainer(args, rank, world, guard)   # model, data, the step to resume from, DeepSpeed engine
        trainer.train(stop_after=0)            # resumes from output_dir/ds if it can, then runs to the end

    `guard` (vchat/run_guard.py) holds the output directory: the resume refuses a changed run and falls
    back to the newest intact step, saves are marked intact and pruned, a NaN or Inf stops the run.
    """

    def __init__(self, args: argparse.Namespace, rank: int, world: int, guard: RunGuard):
        self.args, self.rank, self.world, self.guard = args, rank, world, guard
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        if args.precision == "fp16" and not torch.cuda.is_available():
            raise SystemExit("--precision fp16 needs a GPU (DeepSpeed's CPU backend has no fp16); use bf16 or fp32")
        model = build_model(args)
        self.config = model.config
        self.train_data, self.eval_data, self.tokenizer_json = build_training_data(
            args, self.config, rank == 0, model_tokenizer=getattr(model, "tokenizer", None),
            processor=getattr(model, "image_processor", None))
        self.extras = checkpoint_extras(self.tokenizer_json, getattr(model, "image_processor", None))
        micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
        self.micro_per_epoch = len(self.train_data) // (world * micro)
        if self.micro_per_epoch < gas:
            raise SystemExit(f"{len(self.train_data)} training samples make fewer than one optimizer step "
                             f"(micro batch {micro} x {world} processes x accumulation {gas})")
        self.micro_per_epoch -= self.micro_per_epoch % gas
        self.steps_per_epoch = self.micro_per_epoch // gas
        self.total_steps = total_steps(args.num_train_epochs, self.steps_per_epoch, args.max_steps)
        self.resume_from = guard.resume_point(run_identity(  # refuses a changed run before the engine is built
            args, model=model_facts(model_source(args), self.config, self.tokenizer_json),
            data={"train_samples": len(self.train_data), "eval_samples": len(self.eval_data)},
            world={"processes": world}, deepspeed=ds_config(args, world)))
        opt, sched = make_optimizer(model, args, self.total_steps)
        self.engine, self.sched, self.ds_config = make_engine(model, opt, sched, args, world)
        cfg = self.ds_config
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
        self.guard.begin_save(self.step)
        self.engine.save_checkpoint(self.ds_dir, tag=f"step{self.step}", client_state=state, save_latest=False)
        if self.rank == 0 and not os.path.exists(os.path.join(self.ds_dir, TOKENIZER_NAME)):
            # once per run, so that ds/ loads on its own (vchat_torch.checkpoint.from_zero, vchat convert)
            self.config.save(os.path.join(self.ds_dir, CONFIG_NAME))
            for name, text in self.extras.items():
                with writing_file(os.path.join(self.ds_dir, name)) as f:
                    f.write(text)
        self.guard.end_save(self.step)  # step<N>/vchat_step.json, then `latest` names it
        self.last_save = self.step
        log(f"[ckpt] resumable checkpoint at step {self.step} -> {self.ds_dir}/step{self.step}", self.rank)

    def maybe_resume(self) -> None:
        if self.resume_from is None:
            return
        path, state = self.engine.load_checkpoint(self.ds_dir, tag=self.resume_from.name)
        if path is None:
            raise SystemExit(f"{self.resume_from.path}: DeepSpeed could not load it")
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
                            extra_files=self.extras)
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
        if len(self.eval_data) >= self.world * self.args.per_device_eval_batch_size:  # NaN: no eval batch
            self.guard.nonfinite.require(self.step, eval_loss=loss)  # a diverged model is never exported
        if loss < self.best:
            self.best = loss
            self.export("best")

    def checked(self, loss: torch.Tensor, window: list[float]) -> torch.Tensor:
        """The micro-batch's loss to backpropagate (its value appended to `window`) when it is finite on
        every rank; otherwise (within --max_nonfinite_skips, else DivergedError naming the step) a zero
        loss over the trainable parameters: the micro-batch adds no gradient."""
        value = loss.item()
        bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(bad)
        if not bad.item():
            window.append(value)
            return loss
        self.guard.nonfinite.check(self.step + 1, loss=value if not math.isfinite(value) else math.nan)
        log(f"[train] step {self.step + 1}: a micro-batch's loss is {value}; skipped "
            f"({len(self.guard.nonfinite.skipped)} of --max_nonfinite_skips {self.args.max_nonfinite_skips})",
            self.rank)
        return sum((p * 0).sum() for p in self.engine.module.parameters() if p.requires_grad)

    def check_grad_norm(self) -> None:
        """Stop on a non-finite gradient norm where DeepSpeed reports one (ZeRO 1-3; fp16 has its own loss
        scaling). ZeRO 1-2 skipped such a step themselves: counted against --max_nonfinite_skips."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None and self.args.precision != "fp16":
            if not self.guard.nonfinite.check(self.step, grad_norm=float(norm)):
                log(f"[train] step {self.step}: gradient norm {float(norm)}; skipped", self.rank)

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
                self.engine.backward(self.checked(out.loss, window))
                self.engine.step()
                self.micro_done += 1
                tokens += int((out.modality > 0).sum())
                if self.micro_done % gas:
                    continue
                self.step += 1
                steps_this_run += 1
                self.check_grad_norm()
                loss, window = float(np.mean(window)) if window else math.nan, []
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
        path = write_log(self.args.output_dir, self.history)
        plot_losses(self.history, self.args.output_dir)
        if self.writer:
            self.writer.close()
        log(f"[train] {self.step} steps in all ({seconds:.1f}s this run); log {path}")


if __name__ == "__main__":  # torchrun -m vchat_torch.train / deepspeed --module vchat_torch.train
    from vchat_torch.cli import train_main

    sys.exit(train_main())
