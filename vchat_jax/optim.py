"""The JAX trainer's optimizer and schedule, the optax twin of vchat_torch/optim.py: AdamW with betas
(0.9, 0.95) and eps 1e-6 over the reference's parameter groups (vchat/param_groups.py, applied to the
torch name of each JAX parameter, from vchat/param_map.py, so the groups are the torch trainer's
exactly), transformers' schedules (linear, cosine, constant, constant_with_warmup; warmup <= 1 is a
ratio of the total steps, > 1 a count) and gradient clipping by global norm 1.0.

    opt = OptimizerConfig(learning_rate=1e-3, total_steps=100)
    tx = make_optimizer(params, model.config, opt)       # params: a pure dict of the trainable parameters
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from vchat.config import ModelConfig
from vchat.param_groups import GROUPS, group_hparams, group_of
from vchat.train_args import warmup_steps

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
BETAS, EPS = (0.9, 0.95), 1e-6  # the reference's AdamW


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
        return warmup_steps(self.num_warmup_steps, self.total_steps)


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
    """JAX parameter path -> the torch (and reference) state-dict key, from vchat/param_map.py."""
    from vchat.param_map import expand

    return {e.jax: e.torch for e in expand(config)}


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
    labels = param_labels(params, config)
    used = sorted(set(jax.tree.leaves(labels)), key=GROUPS.index)

    def adamw(group):
        wd, lr = group_hparams(group, opt.learning_rate, opt.learning_rate_pretraining_components, opt.weight_decay)
        return optax.adamw(lambda count: lr * lam(count), b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=wd)

    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm),
                       optax.multi_transform({g: adamw(g) for g in used}, labels))


def _path(keypath) -> tuple:
    """A jax key path of a pure dict -> the NNX state path (strings and list indices)."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)
