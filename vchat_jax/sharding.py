"""Sharding from outside: logical axis names -> mesh axes (data, fsdp, tensor), in one rules table.

Model code names logical axes only: every parameter carries `logical_axes` metadata (layers.py) and
activations pass through `constrain(x, ("act_batch", "act_len", "act_embed"))`, which does nothing
unless a mesh is set. This module owns the only mapping to mesh axes (MaxText's logical axis rules):

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})   # Auto axis types (jax.make_mesh's default
    with jax.set_mesh(mesh):                                #  in jax 0.10 is Explicit)
        shard_model(model, mesh)                            # parameters placed with NamedSharding
        out = model(images, ids, mask, labels, image_num)        # jax.jit propagates the layout

A dimension that a mesh axis does not divide stays replicated (tiny test models, odd batch sizes),
so any model runs on any mesh; the results do not depend on the mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of them, or None: replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    # weights
    "embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "norm": None, "embed_out": "tensor",
    "vis_embed": "fsdp", "vis_heads": "tensor", "vis_mlp": "tensor", "vis_out": "fsdp",
    # activations
    "act_batch": ("data", "fsdp"), "act_len": None, "act_embed": None, "act_heads": "tensor",
    "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor",
}


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2} (the --mesh flags); None or ""
    -> None (the caller's default). ValueError on an unknown axis or a size that is not a positive int."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name, size = name.strip(), size.strip()
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"bad mesh entry {part!r}: expected name=size pairs from {MESH_AXES}, "
                             f"e.g. data=2,fsdp=2,tensor=2")
        out[name] = int(size)
    return out


def make_mesh(shape: dict[str, int], devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; missing axes have size 1."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected some of {MESH_AXES}")
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    devices = jax.devices() if devices is None else devices
    n = math.prod(sizes)
    if n > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, {len(devices)} available")
    return jax.sharding.Mesh(np.asarray(devices[:n]).reshape(sizes), MESH_AXES,
                             axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _axis_size(mesh_shape: dict[str, int], target) -> int:
    names = (target,) if isinstance(target, str) else tuple(target)
    return math.prod(mesh_shape.get(a, 1) for a in names)


def logical_to_spec(axes, shape, mesh_shape: dict[str, int]) -> PartitionSpec:
    """PartitionSpec of an array with logical `axes` and `shape` on a mesh of `mesh_shape` (name -> size).
    Each mesh axis is used once; an axis that does not divide its dimension is dropped."""
    used, spec = set(), []
    for name, dim in zip(axes, shape):
        target = RULES.get(name) if name is not None else None
        if target is not None:
            names = (target,) if isinstance(target, str) else tuple(target)
            names = tuple(a for a in names if mesh_shape.get(a, 1) > 1 and a not in used)
            if names and dim % _axis_size(mesh_shape, names) == 0:
                used.update(names)
                spec.append(names[0] if len(names) == 1 else names)
                continue
        spec.append(None)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """Activation layout hint by logical axes; a no-op without a mesh (jax.set_mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def param_shardings(model: nnx.Module, mesh: jax.sharding.Mesh) -> dict[tuple, NamedSharding]:
    """NamedSharding of every parameter, from its `logical_axes` metadata (replicated without)."""
    mesh_shape = dict(mesh.shape)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape  # also for abstract models (nnx.eval_shape)
        axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        out[tuple(path)] = NamedSharding(mesh, logical_to_spec(axes, shape, mesh_shape))
    return out


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Place every parameter of `model` with its NamedSharding on `mesh`, in place."""
    shardings = param_shardings(model, mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var[...] = jax.device_put(var[...], shardings[tuple(path)])
    return model
