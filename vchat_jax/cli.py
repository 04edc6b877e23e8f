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

A subset of `vchat train`'s flags, with the same names and defaults. The global batch is
per_device_train_batch_size x (data x fsdp): one per-device batch per data-parallel shard, as under
DeepSpeed. Output directory: `state/` (orbax train states: parameters, AdamW moments, step; a rerun of
the same command resumes from the latest), `final/` (a vchat_jax checkpoint: config.json + params/,
tokenizer.json), `train_log.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vchat.data.pipeline import build_training_data

DATASET_HELP = "reference dataset names, or `synthetic` (the built-in multi-image shapes data)"


def build_parser(prog: str = "vchat train-jax") -> argparse.ArgumentParser:
    from .train import SCHEDULES, TRAINABLE_PARTS

    ap = argparse.ArgumentParser(prog=prog, description="Train VisualChat with JAX (jax.jit over a device mesh).")
    r = ap.add_argument_group("flags shared with `vchat train` (the reference's names and defaults)")
    r.add_argument("--lm_model_name_or_path", required=True,
                   help="a model preset (tiny, demo, ...), a config JSON, or a vchat checkpoint directory")
    r.add_argument("--data_path", default="./data/")
    r.add_argument("--dataset_names", nargs="*", default=["minigpt4"], help=DATASET_HELP)
    r.add_argument("--dataset_samples", nargs="*", default=["all"])
    r.add_argument("--dataset_concatenate_samples", nargs="*", type=int, default=[1])
    r.add_argument("--data_train_split_ratio", type=float, default=0.9)
    r.add_argument("--max_num_image_per_sample", type=int, default=8)
    r.add_argument("--max_seq_len", type=int, default=4096)
    r.add_argument("--per_device_train_batch_size", type=int, default=2)
    r.add_argument("--learning_rate", type=float, default=1e-3)
    r.add_argument("--learning_rate_pretraining_components", type=float, default=0)
    r.add_argument("--weight_decay", type=float, default=0.0)
    r.add_argument("--num_train_epochs", type=int, default=6)
    r.add_argument("--lr_scheduler_type", choices=SCHEDULES, default="cosine")
    r.add_argument("--num_warmup_steps", type=float, default=0)
    r.add_argument("--output_dir", required=True)
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--enable_mmca_attention", action="store_true")
    r.add_argument("--vis_proj", choices=("baseline", "vit", "perceiver"), default="baseline")
    r.add_argument("--compat", choices=("dsvc", "fixed"), default="fixed")
    r.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    r.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the synthetic one for synthetic data)")
    r.add_argument("--trainable", default="lang_embed,projection",
                   help=f"comma list of parts to train, from {','.join(TRAINABLE_PARTS)}")
    r.add_argument("--synthetic_samples", type=int, default=2000, help="size of the built-in synthetic dataset")
    j = ap.add_argument_group("JAX only")
    j.add_argument("--mesh", default=None,
                   help="mesh axis sizes, e.g. data=2,fsdp=2,tensor=2 (default: every device along data)")
    j.add_argument("--save_every", type=int, default=0, help="save the train state every N steps (0: at the end)")
    j.add_argument("--log_every", type=int, default=0, help="print every N steps (0: about 20 lines a run)")
    j.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host)")
    j.add_argument("--quiet", action="store_true", help="print only the summary")
    return ap


def parse_mesh(text: str | None, n_devices: int) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; None -> every device along data."""
    if not text:
        return {"data": n_devices}
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size.isdigit() or int(size) < 1:
            raise SystemExit(f"--mesh: expected name=size pairs like data=2,fsdp=2,tensor=2, got {text!r}")
        out[name.strip()] = int(size)
    return out


def build_model(args, mesh):
    from flax import nnx

    from vchat.config import ProjectionConfig, preset

    from .checkpoint import CONFIG_NAME, from_pretrained
    from .model import VisualChat

    src = args.lm_model_name_or_path
    if os.path.isdir(src) and os.path.exists(os.path.join(src, CONFIG_NAME)):
        return from_pretrained(src, compat=args.compat, mesh=mesh)
    cfg = preset(src).replace(mmca=args.enable_mmca_attention, compat=args.compat,
                              projection=ProjectionConfig(kind=args.vis_proj))
    return VisualChat(cfg, nnx.Rngs(args.seed))


def epoch_batches(data, batch_size: int, seed: int, epoch: int, skip: int = 0):
    """This process's batches of one epoch (drop_last), the first `skip` not built."""
    import jax

    from vchat.data import iterate_batches

    for i, batch in enumerate(iterate_batches(data, batch_size, seed=seed, epoch=epoch, drop_last=True,
                                              rank=jax.process_index(), world_size=jax.process_count())):
        if i >= skip:
            yield batch


def main(argv=None, prog: str = "vchat train-jax") -> int:
    args = build_parser(prog).parse_args(argv)
    from .train import TRAINABLE_PARTS

    parts = [p for p in args.trainable.split(",") if p]
    if not parts or any(p not in TRAINABLE_PARTS for p in parts):
        raise SystemExit(f"{prog}: --trainable takes parts from {TRAINABLE_PARTS}, got {args.trainable!r}")
    import jax

    if args.distributed:
        jax.distributed.initialize()
    import numpy as np

    from .sharding import make_mesh
    from .train import OptimizerConfig, Trainer, latest_step

    lead = jax.process_index() == 0

    def say(msg: str) -> None:
        if lead:
            print(msg, flush=True)

    shape = parse_mesh(args.mesh, len(jax.devices()))
    try:
        mesh = make_mesh(shape)
    except ValueError as e:
        raise SystemExit(f"{prog}: --mesh: {e}")
    dp = shape.get("data", 1) * shape.get("fsdp", 1)
    global_batch = args.per_device_train_batch_size * dp
    if global_batch % jax.process_count():
        raise SystemExit(f"{prog}: the global batch {global_batch} does not split over {jax.process_count()} processes")
    local_batch = global_batch // jax.process_count()

    model = build_model(args, mesh)
    cfg = model.config
    train_data, eval_data, tok_json = build_training_data(args, cfg, verbose=not args.quiet)
    steps_per_epoch = len(train_data) // global_batch
    if steps_per_epoch < 1:
        raise SystemExit(f"{prog}: {len(train_data)} training samples make no batch of {global_batch} "
                         f"({args.per_device_train_batch_size} per device x {dp} data-parallel shards)")
    total = args.num_train_epochs * steps_per_epoch
    total = min(total, args.max_steps) if args.max_steps else total
    opt = OptimizerConfig(learning_rate=args.learning_rate,
                          learning_rate_pretraining_components=args.learning_rate_pretraining_components,
                          weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type,
                          num_warmup_steps=args.num_warmup_steps, total_steps=total)
    fixed = {}
    if jax.process_count() > 1:  # every process must pad to the same shapes
        fixed = dict(seq_len=-(-args.max_seq_len // 64) * 64, images_per_sample=args.max_num_image_per_sample)
    trainer = Trainer(model, opt, global_batch, trainable=parts, mesh=mesh, **fixed)
    del model

    state_dir = os.path.join(args.output_dir, "state")
    os.makedirs(args.output_dir, exist_ok=True)
    if latest_step(state_dir) is not None:
        state = trainer.restore(state_dir)
        say(f"[train-jax] resumed from {state_dir} at step {int(state.step)}")
    else:
        state = trainer.init_state()
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    say(f"[train-jax] mesh {dict(mesh.shape)} on {len(jax.devices())} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); {n_train:,} trainable parameters ({', '.join(parts)}); "
        f"{len(train_data)} train / {len(eval_data)} eval samples; global batch {global_batch}; "
        f"{steps_per_epoch} steps per epoch, {total} in all")

    log_every = args.log_every or max(1, total // 20)
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    started, step = time.perf_counter(), int(state.step)
    t0, tokens = time.perf_counter(), 0
    with open(log_path, "a") as log:
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            ran = 0
            for batch in epoch_batches(train_data, local_batch, args.seed, epoch, skip):
                state, m = trainer.step(state, batch)
                step, ran = step + 1, ran + 1
                tokens += int(np.asarray(batch.attention_mask).sum())
                if step % log_every == 0 or step == total:
                    row = {"step": step, "epoch": epoch, **{k: float(v) for k, v in m.items()}}
                    row["tokens_per_s"] = tokens * jax.process_count() / max(time.perf_counter() - t0, 1e-9)
                    if lead:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    if not args.quiet:
                        say(f"[train-jax] step {step}/{total} epoch {epoch} loss {row['loss']:.4f} "
                            f"lr {row['lr']:.3g} grad_norm {row['grad_norm']:.3f} "
                            f"{row['tokens_per_s']:.0f} text tokens/s")
                    t0, tokens = time.perf_counter(), 0
                if args.save_every and step % args.save_every == 0 and step < total:
                    trainer.save(state, state_dir, keep=2)
                if step >= total:
                    break
            if ran == 0:
                raise SystemExit(f"{prog}: epoch {epoch} yielded no batch (the length budget drops the samples?)")

    eval_loss = evaluate(trainer, state, eval_data, local_batch, args.seed)
    path = trainer.save(state, state_dir, keep=2)
    final = os.path.join(args.output_dir, "final")
    trainer.model(state).save_pretrained(final)
    if lead:
        with open(os.path.join(final, "tokenizer.json"), "w") as f:
            f.write(tok_json)
    shown = "n/a (no eval batch)" if eval_loss is None else f"{eval_loss:.4f}"
    say(f"[train-jax] {step} steps ({time.perf_counter() - started:.1f}s this run); eval loss {shown}; "
        f"train state {path}; model {final}")
    return 0


def evaluate(trainer, state, data, batch_size: int, seed: int) -> float | None:
    """Mean loss over the full evaluation batches (None if the eval split makes none)."""
    losses = [float(trainer.eval_loss(state, b)) for b in epoch_batches(data, batch_size, seed, 0)]
    return float(sum(losses) / len(losses)) if losses else None


if __name__ == "__main__":
    sys.exit(main())
