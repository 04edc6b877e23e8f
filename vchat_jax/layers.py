"""Small building blocks shared by the vision tower, the projections and the decoder.

Every parameter carries its logical axis names as metadata (`logical_axes`), in the order of the
JAX array; `sharding.py` maps them to mesh axes from outside, so nothing here names a mesh axis.
Flax's layouts are used throughout (Linear kernel (in, out), Conv kernel HWIO, Embed (vocab, dim),
LayerNorm `scale`/`bias`); `vchat/param_map.py` holds the transposes to the torch layouts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .sharding import constrain  # noqa: F401  (re-exported: model code names logical axes only)


def linear(d_in: int, d_out: int, axes: tuple[str, str], rngs: nnx.Rngs, bias: bool = True,
           std: float = 0.02) -> nnx.Linear:
    """nnx.Linear whose kernel (d_in, d_out), drawn from normal(std), is named `axes` and bias (d_out,) `axes[1:]`."""
    return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs,
                      kernel_init=nnx.initializers.normal(std),
                      kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]})


def layer_norm(dim: int, eps: float, axis: str, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch.nn.LayerNorm semantics: two-pass variance, `scale` and `bias` of shape (dim,)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs,
                         scale_metadata={"logical_axes": (axis,)}, bias_metadata={"logical_axes": (axis,)})


def embed(num: int, dim: int, axes: tuple[str, str], rngs: nnx.Rngs, std: float = 0.02) -> nnx.Embed:
    """nnx.Embed whose table (num, dim), drawn from normal(std), is named `axes`."""
    return nnx.Embed(num, dim, rngs=rngs, embedding_init=nnx.initializers.normal(std),
                     embedding_metadata={"logical_axes": axes})


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, logical_axes=axes)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, torch.nn.GELU()'s default."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """The tanh approximation of GELU (transformers' gelu_new, gelu_pytorch_tanh, gelu_fast, gelu_accurate)."""
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN for every name vchat.config.ACTIVATIONS accepts (tests check the table against ACT2FN)
ACT = {"quick_gelu": quick_gelu, "gelu": gelu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
       "gelu_fast": gelu_tanh, "gelu_accurate": gelu_tanh, "silu": jax.nn.silu, "swish": jax.nn.silu,
       "relu": jax.nn.relu, "relu2": lambda x: jnp.square(jax.nn.relu(x)), "relu6": jax.nn.relu6,
       "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x))}


def sdpa(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked softmax attention of the vision side. q: (B, H, Lq, D); k, v: (B, H, Lk, D)."""
    q = q / jnp.asarray(math.sqrt(q.shape[-1]), q.dtype)
    w = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", w, v)  # (B, H, Lq, D)
