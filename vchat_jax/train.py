"""The JAX trainer behind `vchat train-jax`: the sharded training step (`Trainer`: one jax.jit over a
device mesh, orbax train states) and the run around it (`TrainRun`: model, data, resume, loop, eval,
export), the twin of vchat_torch/train.py. The optimizer is optim.py's (the reference's AdamW groups
and schedules), the batches batches.py's, the flags vchat/train_args.py's shared ones and cli.py's,
the log vchat/train_log.py's; the command's main is vchat_jax/cli.py:train_main. Only the trainable
top-level parts are updated (`lang_embed` and `projection` by default, as the reference); the rest,
and the fixed sin-cos `pos_embed` tables, pass through untouched.

    trainer = Trainer(model, OptimizerConfig(learning_rate=1e-3, total_steps=100), batch_size=8,
                      mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))   # or mesh=None: 1 device
    state = trainer.init_state()
    for batch in iterate_batches(data, 8, seed=1234, drop_last=True):       # vchat.data Batches
        state, metrics = trainer.step(state, batch)                          # one jax.jit, sharded
    trainer.save(state, "runs/x/state")                                      # orbax, atomic
    state = trainer.restore("runs/x/state")                                  # into its shardings
    model = trainer.model(state)                                             # a VisualChat again

The step is one `jax.jit` with NamedSharding in/out shardings (vchat_jax/sharding.py), the same code
on 1 device or any (data, fsdp, tensor) mesh: parameters and Adam moments are laid out by their
logical axes, the batch axis of every batch array over ('data', 'fsdp'). Batches are padded to bucketed
shapes (the spliced length to a multiple of `seq_multiple`, the image count to a power-of-two multiple
of the batch size) so a run compiles a handful of times, not once per batch.

Multi-host (cannot run on this machine; the code path is the same): start one process per host with
the same command, and call `jax.distributed.initialize()` first (coordinator address, process count
and id from the environment or as arguments; on TPU pods and SLURM it finds them itself). `jax.devices()`
then lists every host's devices and `make_mesh` spans them. Each process reads its own share of the
global batch (`iterate_batches(..., rank=jax.process_index(), world_size=jax.process_count())`) and
`shard_batch` assembles the global arrays with `jax.make_array_from_process_local_data`; every process
must pad to the same shapes, so pass fixed sizes (`seq_len=`, `images_per_sample=`) to the Trainer.
Orbax saves and restores collectively: every process calls `save`/`restore` with the same directory
(a shared file system). `vchat train-jax` does all of this when JAX reports more than one process.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from vchat.hf_export import checkpoint_extras
from vchat.config import ModelConfig
from vchat.data.pipeline import build_training_data
from vchat.param_groups import check_parts, is_trainable
from vchat.run_guard import RunGuard, model_facts, run_identity
from vchat.run_steps import StepDirs
from vchat.splice import SplicePlan
from vchat.train_args import HFSource, model_source, total_steps
from vchat.train_log import appending_log, plot_losses, read_log

from .batches import BATCH_KEYS, epoch_batches, plan_batch
from .model import VisualChat, forward_planned
from .optim import OptimizerConfig, lr_lambda, make_optimizer
from .sharding import logical_to_spec, make_mesh, param_shardings, parse_mesh
from .xla import jit


def trainable_filter(parts: Sequence[str]):
    """An NNX filter: the Params under the named top-level parts, except the fixed sin-cos `pos_embed`."""
    parts = check_parts(parts)
    return nnx.All(nnx.Param, lambda path, _: is_trainable(path, parts))


def _trailing_dict_path(keypath) -> tuple:
    out = []
    for k in reversed(keypath):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        out.append(k.key)
    return tuple(reversed(out))


# -- the train state -------------------------------------------------------------------------------------
@struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer steps taken
    params: dict  # the trainable parameters (a pure dict by NNX path)
    opt_state: optax.OptState
    frozen: dict  # every other model variable: passed through, never updated

    def as_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "frozen": self.frozen}


class Trainer:
    """Holds the model's structure, the optimizer, the mesh and the compiled step; states are values.

    model: a VisualChat (its parameters become the initial state); batch_size: the global batch (a
    multiple of data x fsdp to shard it; otherwise the batch is replicated); mesh: a (data, fsdp,
    tensor) mesh, or None for one device."""

    def __init__(self, model: VisualChat, opt: OptimizerConfig, batch_size: int,
                 trainable: Sequence[str] = ("lang_embed", "projection"), mesh: jax.sharding.Mesh | None = None,
                 seq_multiple: int = 64, seq_len: int | None = None, images_per_sample: int | None = None,
                 donate: bool = True):
        self.config: ModelConfig = model.config
        self.opt, self.batch_size, self.trainable = opt, int(batch_size), tuple(trainable)
        self.mesh = make_mesh({}) if mesh is None else mesh
        self.seq_multiple, self.seq_len, self.images_per_sample = seq_multiple, seq_len, images_per_sample
        self.graphdef, params, frozen = nnx.split(model, trainable_filter(self.trainable), ...)
        self._init = (nnx.to_pure_dict(params), nnx.to_pure_dict(frozen))
        self.tx = make_optimizer(self._init[0], self.config, opt)

        by_path = param_shardings(model, self.mesh)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

        def for_leaf(keypath, x):
            s = by_path.get(_trailing_dict_path(keypath))
            return s if s is not None and len(s.spec) <= len(x.shape) else self.replicated

        abstract_opt = jax.eval_shape(self.tx.init, self._init[0])
        self.shardings = TrainState(step=self.replicated,
                                    params=jax.tree_util.tree_map_with_path(for_leaf, self._init[0]),
                                    opt_state=jax.tree_util.tree_map_with_path(for_leaf, abstract_opt),
                                    frozen=jax.tree_util.tree_map_with_path(for_leaf, self._init[1]))
        B, mesh_shape = self.batch_size, dict(self.mesh.shape)
        row = NamedSharding(self.mesh, logical_to_spec(("act_batch", None), (B, 1), mesh_shape))
        img = NamedSharding(self.mesh, logical_to_spec(("act_batch", None, None, None), (B, 1, 1, 1), mesh_shape))
        self.batch_shardings = {k: img if k == "images" else row for k in BATCH_KEYS}
        s = self.shardings
        metrics = {k: self.replicated for k in ("loss", "grad_norm", "lr")}
        self._step = jit(self._train_step,
                         in_shardings=(s.params, s.opt_state, s.step, s.frozen, self.batch_shardings),
                         out_shardings=(s.params, s.opt_state, s.step, metrics),
                         donate_argnums=(0, 1) if donate else ())
        self._eval = jit(self.loss_fn, in_shardings=(s.params, s.frozen, self.batch_shardings),
                         out_shardings=self.replicated)
        self._lam = lr_lambda(opt.lr_scheduler_type, opt.warmup_steps, opt.total_steps)

    # -- the step --------------------------------------------------------------------------------------
    def loss_fn(self, params: dict, frozen: dict, batch: dict) -> jax.Array:
        """The model's loss on a planned batch (plan_batch), as a function of the trainable params."""
        model = nnx.merge(self.graphdef, params, frozen)
        plan = SplicePlan(ids=batch["ids"], image_index=batch["image_index"], modality=batch["modality"],
                          labels=batch["labels"], position_ids=batch["position_ids"], lengths=None)
        return forward_planned(model, plan, batch["images"]).loss

    def _train_step(self, params, opt_state, step, frozen, batch):
        loss, grads = jax.value_and_grad(self.loss_fn)(params, frozen, batch)
        updates, new_opt_state = self.tx.update(grads, opt_state, params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN or Inf step leaves the state as it was
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (optax.apply_updates(params, updates), new_opt_state), (params, opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.opt.learning_rate * self._lam(step)}
        return params, opt_state, step + 1, metrics

    def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        """One optimizer step on a `vchat.data.Batch` (or a planned dict). Returns the new state and
        {"loss", "grad_norm" (before clipping), "lr" (of the non-embed groups)} as device scalars; a step
        whose loss or gradient norm is NaN or Inf counts, but leaves the parameters and moments as they were. With
        `donate` (the default) the old state's params and opt_state buffers are reused: do not read them."""
        arrays = batch if isinstance(batch, dict) and "image_index" in batch else self.plan(batch)
        with jax.set_mesh(self.mesh):
            params, opt_state, step, metrics = self._step(state.params, state.opt_state, state.step, state.frozen,
                                                          self.shard_batch(arrays))
        return state.replace(params=params, opt_state=opt_state, step=step), metrics

    def eval_loss(self, state: TrainState, batch) -> jax.Array:
        """The loss on a batch, without a step."""
        arrays = batch if isinstance(batch, dict) and "image_index" in batch else self.plan(batch)
        with jax.set_mesh(self.mesh):
            return self._eval(state.params, state.frozen, self.shard_batch(arrays))

    def plan(self, batch) -> dict[str, np.ndarray]:
        return plan_batch(self.config, batch, self.seq_multiple, seq_len=self.seq_len,
                          images_per_sample=self.images_per_sample)

    def shard_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Planned numpy arrays (this process's rows) -> global jax arrays in the batch shardings."""
        if arrays["ids"].shape[0] * jax.process_count() != self.batch_size:
            raise ValueError(f"a batch of {arrays['ids'].shape[0]} rows x {jax.process_count()} processes; "
                             f"the trainer was built for {self.batch_size}")
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], arrays[k]) for k in BATCH_KEYS}

    # -- states ----------------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """The model's parameters (as given to the constructor) and a fresh optimizer, placed on the mesh."""
        s = self.shardings

        @jit
        def fresh(params, frozen):  # copies: a donated step must not free the model's own buffers
            params = jax.lax.with_sharding_constraint(jax.tree.map(jnp.copy, params), s.params)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                              frozen=frozen)

        state = fresh(*self._init)
        return jax.device_put(state, self.shardings)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with their shardings: the restore target."""
        shapes = jax.eval_shape(lambda: TrainState(jnp.zeros((), jnp.int32), self._init[0],
                                                   self.tx.init(self._init[0]), self._init[1]))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.shardings)

    def model(self, state: TrainState) -> VisualChat:
        """A VisualChat holding the state's parameters (shared, not copied)."""
        return nnx.merge(self.graphdef, state.params, state.frozen)

    def save(self, state: TrainState, directory: str, keep: int | None = None) -> str:
        """Orbax checkpoint of the whole (sharded) train state at `directory/<step>`; orbax writes into a
        temporary directory and renames it on commit, so a crash leaves no partial step. Returns its path."""
        import os

        import orbax.checkpoint as ocp

        step = int(state.step)
        with ocp.CheckpointManager(os.path.abspath(directory),
                                   options=ocp.CheckpointManagerOptions(max_to_keep=keep)) as mgr:
            mgr.save(step, args=ocp.args.StandardSave(state.as_dict()), force=True)
            mgr.wait_until_finished()
        return os.path.join(directory, str(step))

    def restore(self, directory: str, step: int | None = None) -> TrainState:
        """The train state saved under `directory` (the latest step unless given), restored straight
        into this trainer's shardings (any mesh: orbax reshards)."""
        import os

        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(os.path.abspath(directory)) as mgr:
            step = mgr.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"{directory}: no train state checkpoint")
            d = mgr.restore(step, args=ocp.args.StandardRestore(self.abstract_state().as_dict()))
        return TrainState(**d)


def latest_step(directory: str) -> int | None:
    """The newest intact step `vchat train-jax` saved under a train-state directory (None if there is
    none); orbax's own latest_step would also count a step directory whose save did not finish."""
    return StepDirs(directory, r"(\d+)").resumable().step


def build_model(args: argparse.Namespace, mesh: jax.sharding.Mesh) -> VisualChat:
    """The model to train (vchat/train_args.py:model_source): a checkpoint loaded onto `mesh`, or a new
    model seeded with --seed."""
    src = model_source(args)
    if isinstance(src, HFSource):
        from .hf import from_hf

        return from_hf(src.lm_dir, src.vision_dir, mesh=mesh, dtype="float32", **src.kwargs)  # trains in fp32
    if isinstance(src, str):
        from .checkpoint import from_pretrained

        return from_pretrained(src, compat=args.compat, mesh=mesh)
    return VisualChat(src, nnx.Rngs(args.seed))


def resumable_steps(output_dir: str) -> StepDirs:
    """The orbax train states of a run: output_dir/state/<N>."""
    return StepDirs(os.path.join(output_dir, "state"), r"(\d+)")


class TrainRun:
    """One run of `vchat train-jax` on this process (the twin of vchat_torch/train.py's Trainer):

        run = TrainRun(args, guard)   # mesh, model, data, the step to resume from, Trainer
        run.train()                   # resumes from output_dir/state if it holds a step, then runs to the end

    `guard` (vchat/run_guard.py) holds the output directory: the resume refuses a changed run and falls
    back to the newest intact step, saves are marked intact and pruned, a NaN or Inf stops the run.
    """

    def __init__(self, args: argparse.Namespace, guard: RunGuard):
        self.args, self.lead, self.guard = args, jax.process_index() == 0, guard
        self.rank, self.world = jax.process_index(), jax.process_count()
        shape = parse_mesh(args.mesh) or {"data": len(jax.devices())}
        try:
            mesh = make_mesh(shape)
        except ValueError as e:
            raise SystemExit(f"--mesh: {e}") from None
        dp = shape.get("data", 1) * shape.get("fsdp", 1)
        self.global_batch = args.per_device_train_batch_size * dp
        if self.global_batch % self.world:
            raise SystemExit(f"the global batch {self.global_batch} does not split over {self.world} processes")
        self.local_batch = self.global_batch // self.world
        model = build_model(args, mesh)
        self.train_data, self.eval_data, self.tokenizer_json = build_training_data(
            args, model.config, verbose=not args.quiet, model_tokenizer=getattr(model, "tokenizer", None),
            processor=getattr(model, "image_processor", None))
        self.image_processor = getattr(model, "image_processor", None)
        self.steps_per_epoch = len(self.train_data) // self.global_batch
        if self.steps_per_epoch < 1:
            raise SystemExit(f"{len(self.train_data)} training samples make no batch of {self.global_batch} "
                             f"({args.per_device_train_batch_size} per device x {dp} data-parallel shards)")
        self.total_steps = total_steps(args.num_train_epochs, self.steps_per_epoch, args.max_steps)
        self.resume_from = guard.resume_point(run_identity(
            args, model=model_facts(model_source(args), model.config, self.tokenizer_json),
            data={"train_samples": len(self.train_data), "eval_samples": len(self.eval_data)},
            world={"processes": self.world, "global_batch": self.global_batch}))
        opt = OptimizerConfig(learning_rate=args.learning_rate,
                              learning_rate_pretraining_components=args.learning_rate_pretraining_components,
                              weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type,
                              num_warmup_steps=args.num_warmup_steps, total_steps=self.total_steps)
        fixed = {}
        if self.world > 1:  # every process must pad to the same shapes
            fixed = dict(seq_len=-(-args.max_seq_len // 64) * 64, images_per_sample=args.max_num_image_per_sample)
        self.trainer = Trainer(model, opt, self.global_batch, trainable=args.trainable, mesh=mesh, **fixed)
        self.state_dir = os.path.join(args.output_dir, "state")

    def say(self, msg: str) -> None:
        if self.lead:
            print(msg, flush=True)

    def maybe_resume(self) -> TrainState:
        """The newest intact train state under output_dir/state (the guard's choice), or a fresh one."""
        if self.resume_from is None:
            return self.trainer.init_state()
        state = self.trainer.restore(self.state_dir, step=self.resume_from.step)
        self.say(f"[train-jax] resumed from {self.state_dir} at step {int(state.step)}")
        return state

    def save(self, state: TrainState) -> str:
        """The train state at output_dir/state/<step>, marked intact; --save_total_limit prunes older ones."""
        step = int(state.step)
        self.guard.begin_save(step)
        path = self.trainer.save(state, self.state_dir)
        self.guard.end_save(step)
        return path

    def settle(self, pending: list[tuple[int, dict]]) -> None:
        """Check the losses and gradient norms of the steps since the last check (the device runs ahead
        meanwhile): a non-finite step left the state as it was; past --max_nonfinite_skips, DivergedError."""
        for step, m in pending:
            loss, norm = float(m["loss"]), float(m["grad_norm"])
            if not self.guard.nonfinite.check(step, loss=loss, grad_norm=norm):
                self.say(f"[train-jax] step {step}: loss {loss}, grad_norm {norm}; skipped (the state is unchanged)")
        pending.clear()

    def evaluate(self, state: TrainState) -> float | None:
        """Mean loss over the full evaluation batches (None if the eval split makes none)."""
        losses = [float(self.trainer.eval_loss(state, b))
                  for b in epoch_batches(self.eval_data, self.local_batch, self.args.seed, 0, self.rank, self.world)]
        return float(sum(losses) / len(losses)) if losses else None

    def export(self, state: TrainState) -> str:
        """The vchat_jax checkpoint output_dir/final (config.json, params/, tokenizer.json)."""
        final = os.path.join(self.args.output_dir, "final")
        extras = checkpoint_extras(self.tokenizer_json, self.image_processor)
        self.trainer.model(state).save_pretrained(final, extra_files=extras)
        return final

    def train(self) -> None:
        args, trainer, total = self.args, self.trainer, self.total_steps
        state = self.maybe_resume()
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        self.say(f"[train-jax] mesh {dict(trainer.mesh.shape)} on {len(jax.devices())} {jax.devices()[0].platform} "
                 f"device(s), {self.world} process(es); {n_train:,} trainable parameters ({', '.join(args.trainable)}); "
                 f"{len(self.train_data)} train / {len(self.eval_data)} eval samples; global batch "
                 f"{self.global_batch}; {self.steps_per_epoch} steps per epoch, {total} in all")
        log_every = args.log_every or max(1, total // 20)
        started, step = time.perf_counter(), int(state.step)
        t0, tokens, pending = time.perf_counter(), 0, []
        with appending_log(args.output_dir, enabled=self.lead) as append:
            while step < total:
                epoch, skip = divmod(step, self.steps_per_epoch)
                ran = 0
                for batch in epoch_batches(self.train_data, self.local_batch, args.seed, epoch, self.rank, self.world,
                                           skip):
                    state, m = trainer.step(state, batch)
                    step, ran = step + 1, ran + 1
                    pending.append((step, m))
                    tokens += int(np.asarray(batch.attention_mask).sum())
                    if step % log_every == 0 or step == total:
                        self.settle(pending)
                        row = {"step": step, "epoch": epoch, **{k: float(v) for k, v in m.items()}}
                        row["tokens_per_s"] = tokens * self.world / max(time.perf_counter() - t0, 1e-9)
                        append(row)
                        if not args.quiet:
                            self.say(f"[train-jax] step {step}/{total} epoch {epoch} loss {row['loss']:.4f} "
                                     f"lr {row['lr']:.3g} grad_norm {row['grad_norm']:.3f} "
                                     f"{row['tokens_per_s']:.0f} text tokens/s")
                        t0, tokens = time.perf_counter(), 0
                    if args.save_every and step % args.save_every == 0 and step < total:
                        self.settle(pending)
                        self.save(state)
                    if step >= total:
                        break
                if ran == 0:
                    raise SystemExit(f"epoch {epoch} yielded no batch (the length budget drops the samples?)")
        self.settle(pending)
        eval_loss = self.evaluate(state)
        self.guard.nonfinite.require(step, eval_loss=eval_loss)  # a diverged model is never exported
        path = self.save(state)
        final = self.export(state)
        if self.lead:
            plot_losses(read_log(args.output_dir), args.output_dir)
        shown = "n/a (no eval batch)" if eval_loss is None else f"{eval_loss:.4f}"
        self.say(f"[train-jax] {step} steps ({time.perf_counter() - started:.1f}s this run); eval loss {shown}; "
                 f"train state {path}; model {final}")
