"""The sharded JAX training step: optax AdamW over the reference's parameter groups, orbax train states.

Mirrors vchat_torch/train.py (the reference's `training/main.py`): AdamW with betas (0.9, 0.95) and
eps 1e-6 over four groups, {decay, no decay} x {other, name contains "embed" (lr
`learning_rate_pretraining_components`, 0 = the same lr)}, where "no decay" means the torch name
contains "bias" or "LayerNorm.weight" (names come from convert/param_map.py, so the groups are the
torch trainer's exactly); transformers' schedules (linear, cosine, constant, constant_with_warmup;
warmup <= 1 is a ratio of the total steps, > 1 a count); gradient clipping by global norm 1.0. Only
the trainable top-level parts are updated (`lang_embed` and `projection` by default, as the
reference); the rest, and the fixed sin-cos `pos_embed` tables, pass through untouched.

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

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from vchat.config import ModelConfig
from vchat.splice import order_for, plan_splice

from .model import VisualChat
from .sharding import logical_to_spec, make_mesh, param_shardings

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
TRAINABLE_PARTS = ("lang_embed", "projection", "lang_decoder", "vis_encoder")
BETAS, EPS = (0.9, 0.95), 1e-6  # the reference's AdamW
GROUPS = ("decay", "no_decay", "embed_decay", "embed_no_decay")  # vchat_torch.train.param_groups' order


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer flags of `vchat train` (same names and defaults) plus the run's length."""

    learning_rate: float = 1e-3
    learning_rate_pretraining_components: float = 0.0  # lr of the "embed" groups; 0 = learning_rate
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: float = 0  # <= 1: a ratio of total_steps; > 1: a count
    total_steps: int = 1
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")

    @property
    def warmup_steps(self) -> int:
        w = self.num_warmup_steps
        return int(w * self.total_steps) if w <= 1 else int(w)


# -- schedule and optimizer --------------------------------------------------------------------------
def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[jax.Array], jax.Array]:
    """transformers' LambdaLR multipliers (`get_scheduler(kind, ...)`) as a jit-able function of the
    number of optimizer steps taken so far (step 0 uses lambda(0): 0 under warmup, as in torch)."""

    def f(count):
        step = jnp.asarray(count, jnp.float32)
        warm = step / max(1, warmup)
        if kind == "constant":
            return jnp.ones_like(step)
        if kind == "constant_with_warmup":
            after = jnp.ones_like(step)
        elif kind == "linear":
            after = jnp.maximum(0.0, (total - step) / max(1, total - warmup))
        elif kind == "cosine":  # num_cycles 0.5
            progress = (step - warmup) / max(1, total - warmup)
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        else:
            raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
        return jnp.where(step < warmup, warm, after)

    return f


def torch_names(config: ModelConfig) -> dict[tuple, str]:
    """JAX parameter path -> the torch (and reference) state-dict key, from convert/param_map.py."""
    from convert.param_map import expand

    return {e.jax: e.torch for e in expand(config)}


def group_of(name: str) -> str:
    """vchat_torch.train.param_groups' rule on a torch parameter name."""
    no_decay = "bias" in name or "LayerNorm.weight" in name
    return GROUPS[2 * ("embed" in name) + no_decay]


def param_labels(params: dict, config: ModelConfig) -> dict:
    """The group label (one of GROUPS) of every leaf of a pure params dict."""
    names = torch_names(config)

    def label(path, _):
        key = _path(path)
        return group_of(names.get(key, ".".join(map(str, key))))

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(params: dict, config: ModelConfig, opt: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then one optax.adamw per non-empty group (its lr and weight decay), each
    under the same schedule multiplier, as torch's LambdaLR scales every group's base lr."""
    lam = lr_lambda(opt.lr_scheduler_type, opt.warmup_steps, opt.total_steps)
    lr_small = opt.learning_rate_pretraining_components or opt.learning_rate
    spec = {"decay": (opt.weight_decay, opt.learning_rate), "no_decay": (0.0, opt.learning_rate),
            "embed_decay": (opt.weight_decay, lr_small), "embed_no_decay": (0.0, lr_small)}
    labels = param_labels(params, config)
    used = sorted(set(jax.tree.leaves(labels)), key=GROUPS.index)

    def adamw(wd, lr):
        return optax.adamw(lambda count: lr * lam(count), b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=wd)

    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm),
                       optax.multi_transform({g: adamw(*spec[g]) for g in used}, labels))


# -- which parameters train ----------------------------------------------------------------------------
def trainable_filter(parts: Sequence[str]):
    """An NNX filter: the Params under the named top-level parts, except the fixed sin-cos `pos_embed`."""
    bad = [p for p in parts if p not in TRAINABLE_PARTS]
    if bad or not parts:
        raise ValueError(f"trainable parts must come from {TRAINABLE_PARTS}, got {list(parts)}")
    parts = tuple(parts)
    return nnx.All(nnx.Param, lambda path, _: path[0] in parts and path[-1] != "pos_embed")


def _path(keypath) -> tuple:
    """A jax key path of a pure dict -> the NNX state path (strings and list indices)."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)


def _trailing_dict_path(keypath) -> tuple:
    out = []
    for k in reversed(keypath):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        out.append(k.key)
    return tuple(reversed(out))


# -- batches ---------------------------------------------------------------------------------------------
BATCH_KEYS = ("images", "ids", "image_index", "modality", "position_ids", "labels")


def plan_batch(config: ModelConfig, batch, seq_multiple: int = 64, seq_len: int | None = None,
               images_per_sample: int | None = None) -> dict[str, np.ndarray]:
    """A collated `vchat.data.Batch` -> the model's planned arrays (vchat/splice.py), padded.

    The spliced length L rounds up to a multiple of `seq_multiple` (or is `seq_len`, fixed); the images
    (N, 3, H, W) are padded with zero images to B * `images_per_sample` (fixed) or else to B times the
    next power of two of ceil(N / B), so N is a multiple of the batch size. Padding images are never
    referenced by `image_index`; padding positions have modality 0 and label -100."""
    a = batch.arrays() if hasattr(batch, "arrays") else batch
    ids = np.asarray(a["input_ids"])
    B = ids.shape[0]
    p = plan_splice(ids, np.asarray(a["attention_mask"]), np.asarray(a["image_num"]), config.image_tokens,
                    config.image_token_id, config.pad_token_id, labels=np.asarray(a["labels"]),
                    order=order_for(config.compat), pad_multiple=seq_len or seq_multiple)
    if seq_len is not None and p.ids.shape[1] != seq_len:
        raise ValueError(f"a batch spliced to {p.ids.shape[1]} positions does not fit seq_len {seq_len}")
    images = np.asarray(a["images"], np.float32)
    n = images.shape[0]
    if images_per_sample is not None:
        if n > B * images_per_sample:
            raise ValueError(f"{n} images exceed {images_per_sample} per sample x batch {B}")
        n_pad = B * images_per_sample
    else:
        n_pad = B * (1 << max(0, math.ceil(max(n, 1) / B) - 1).bit_length())
    c = config.vision
    full = np.zeros((n_pad, c.num_channels, c.image_size, c.image_size), np.float32)
    full[:n] = images
    return {"images": full, "ids": p.ids.astype(np.int32), "image_index": p.image_index.astype(np.int32),
            "modality": p.modality.astype(np.int32), "position_ids": p.position_ids.astype(np.int32),
            "labels": p.labels.astype(np.int32)}


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
        self._step = jax.jit(self._train_step,
                             in_shardings=(s.params, s.opt_state, s.step, s.frozen, self.batch_shardings),
                             out_shardings=(s.params, s.opt_state, s.step, metrics),
                             donate_argnums=(0, 1) if donate else ())
        self._eval = jax.jit(self.loss_fn, in_shardings=(s.params, s.frozen, self.batch_shardings),
                             out_shardings=self.replicated)
        self._lam = lr_lambda(opt.lr_scheduler_type, opt.warmup_steps, opt.total_steps)

    # -- the step --------------------------------------------------------------------------------------
    def loss_fn(self, params: dict, frozen: dict, batch: dict) -> jax.Array:
        """The model's loss on a planned batch (plan_batch), as a function of the trainable params."""
        model = nnx.merge(self.graphdef, params, frozen)
        loss, _ = model.forward_spliced(batch["images"], batch["ids"], batch["image_index"], batch["modality"],
                                        batch["position_ids"], batch["labels"])
        return loss

    def _train_step(self, params, opt_state, step, frozen, batch):
        loss, grads = jax.value_and_grad(self.loss_fn)(params, frozen, batch)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": self.opt.learning_rate * self._lam(step)}
        return params, opt_state, step + 1, metrics

    def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        """One optimizer step on a `vchat.data.Batch` (or a planned dict). Returns the new state and
        {"loss", "grad_norm" (before clipping), "lr" (of the non-embed groups)} as device scalars. With
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

        @jax.jit
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
    """The newest saved step under an orbax train-state directory (None if there is none)."""
    import os

    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    with ocp.CheckpointManager(os.path.abspath(directory)) as mgr:
        return mgr.latest_step()
