"""vchat_jax checkpoints: an orbax directory, and loading torch-side checkpoints through vchat/param_map.

    model.save_pretrained("out/jax")                    # config.json + params/ (orbax, JAX layouts)
    save_lazily(config, "out/jax", {"lm": {...: LazyLeaf(shape, dtype, read)}})  # the same, leaf by leaf
    model = VisualChat.from_pretrained("out/jax")       # ... or a vchat_torch directory
                                                        #     (config.json + model.safetensors)
    model = from_dsvc("tests/golden/vit-mmca", config)  # a reference pytorch_model.bin (compat "dsvc")

Nothing here imports torch: safetensors files are read with safetensors.numpy and reference
`pytorch_model.bin` files with vchat.torch_pickle.read_torch_bin. Restores can be sharded: pass
`mesh` and every parameter is placed with its NamedSharding (vchat_jax.sharding) as it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.checkpoint_files import CONFIG_NAME, DSVC_WEIGHTS_NAME, PARAMS_DIR, WEIGHTS_NAME
from vchat.config import ModelConfig, load_checkpoint_config
from vchat.io import writing_dir
from vchat.torch_pickle import read_torch_bin

from .model import VisualChat
from .state_dict import state_dict_to_params


def save_pretrained(model: VisualChat, path: str, trainable_only: bool = False,
                    extra_files: dict | None = None) -> None:
    """Write `config.json` and `params/` (orbax: every parameter, or only those of `model.trainable_parts`),
    and `extra_files` ({name: text}, e.g. tokenizer.json), atomically: into a temporary sibling, then
    renamed into place (replacing an existing directory)."""
    import orbax.checkpoint as ocp

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if trainable_only:
        params = {k: v for k, v in params.items() if k in model.trainable_parts}
    with _writing(path, model.config, extra_files) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, PARAMS_DIR), params, custom_metadata={"trainable_only": trainable_only})
        ckpt.wait_until_finished()


IN_FLIGHT = 6  # save_lazily's leaves held at once (read, being written): 6 keeps both cores and the disk busy


class LazyLeaf:
    """A parameter that exists only while orbax writes it: `read()` returns its numpy array."""

    def __init__(self, shape: tuple, dtype, read: Callable[[], np.ndarray]):
        self.shape, self.dtype, self.read = tuple(shape), np.dtype(dtype), read
        self.size = math.prod(self.shape)


def save_lazily(config: ModelConfig, path: str, params: dict, extra_files: dict | None = None) -> None:
    """save_pretrained's directory (full) from `params`, a nested dict of LazyLeaf: each leaf is read when
    orbax writes it and released once written, at most IN_FLIGHT at a time, so memory holds a few
    parameters whatever the model's size. The parameters are recorded as numpy arrays (np.ndarray in
    params/'s metadata): from_pretrained restores the directory as any other."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import future, type_handlers

    class OneByOne(type_handlers.NumpyHandler):
        async def serialize(self, values, infos, args=None):
            args = args or [type_handlers.SaveArgs()] * len(values)
            slots = asyncio.Semaphore(IN_FLIGHT)

            async def write(value, info, arg):
                async with slots:  # reading the next leaves overlaps writing this one
                    await self._background_serialize([await asyncio.to_thread(value.read)], [info], [arg])

            async def write_all():
                await asyncio.gather(*(write(*x) for x in zip(values, infos, args)))

            return [future.CommitFutureAwaitingContractedSignals(write_all(), name="lazy_leaves")]

    registry = type_handlers.create_type_handler_registry((LazyLeaf, OneByOne(deepcopy_host_arrays=False)))
    with _writing(path, config, extra_files) as tmp:
        # uncompressed: zstd costs more time than it saves space on trained weights (a conversion is I/O)
        ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))
        ckpt.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(
            params, custom_metadata={"trainable_only": False}))


@contextlib.contextmanager
def _writing(path: str, config: ModelConfig, extra_files: dict | None):
    """A temporary sibling of `path` holding config.json and `extra_files`, renamed into place on success."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with writing_dir(path) as tmp:
        config.save(os.path.join(tmp, CONFIG_NAME))
        yield tmp
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)


def _abstract(config: ModelConfig, mesh=None) -> dict:
    """The model's parameters as a nested dict of ShapeDtypeStruct (no allocation), sharded on `mesh`."""
    model = nnx.eval_shape(lambda: VisualChat(config, nnx.Rngs(0)))
    target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if mesh is None:
        return target
    from .sharding import param_shardings

    shardings = param_shardings(model, mesh)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path in flat:
        node = target
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jax.ShapeDtypeStruct(node[path[-1]].shape, node[path[-1]].dtype, sharding=shardings[path])
    return target


def from_pretrained(path: str, base: str | None = None, compat: str | None = None, mesh=None) -> VisualChat:
    """Load a vchat directory: orbax `params/` (vchat_jax) or `model.safetensors` (vchat_torch, full). A
    trainable-only checkpoint needs `base`, a full one to start from (a vchat directory or a reference
    checkpoint), as vchat_torch's."""
    config = load_checkpoint_config(path, compat)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        import orbax.checkpoint as ocp

        ckpt, params_dir = ocp.StandardCheckpointer(), os.path.abspath(os.path.join(path, PARAMS_DIR))
        meta = ckpt.metadata(params_dir)
        target = _abstract(config, mesh)
        if not (meta.custom_metadata or {}).get("trainable_only"):
            restored = ckpt.restore(params_dir, target)  # each leaf placed with its sharding as it is read
            model = filled(config, {tuple(p): v for p, v in nnx.traversals.flatten_mapping(restored).items()}, mesh)
            return attach_processor(model, path)
        if base is None:
            raise ValueError(f"{path} holds only the trainable parameters; pass base= a full checkpoint")
        vchat_dir = os.path.exists(os.path.join(base, CONFIG_NAME))
        model = from_pretrained(base, compat=compat, mesh=mesh) if vchat_dir else from_dsvc(base, config, mesh)
        restored = ckpt.restore(params_dir, {k: v for k, v in target.items() if k in meta.item_metadata.tree})
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(model, state)
        return attach_processor(model, path)
    if os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        from safetensors.numpy import load_file

        return attach_processor(from_state_dict(config, load_file(os.path.join(path, WEIGHTS_NAME)), mesh), path)
    raise FileNotFoundError(f"{path}: neither {PARAMS_DIR}/ (orbax) nor {WEIGHTS_NAME}")


def attach_processor(model: VisualChat, path: str) -> VisualChat:
    """`model.image_processor` from the checkpoint's preprocessor_config.json, when it has one (a model
    built from a Hugging Face vision directory keeps its preprocessing through training and conversion)."""
    from vchat.hf import saved_processor

    processor = saved_processor(path, model.config.vision)
    if processor is not None:
        model.image_processor = processor
    return model


def from_dsvc(path: str, config: ModelConfig, mesh=None) -> VisualChat:
    """A reference checkpoint (`pytorch_model.bin`, or a directory holding one), loaded strictly."""
    if os.path.isdir(path):
        path = os.path.join(path, DSVC_WEIGHTS_NAME)
    return from_state_dict(config, read_torch_bin(path), mesh)


def from_state_dict(config: ModelConfig, sd: dict, mesh=None) -> VisualChat:
    """A VisualChat holding a torch-keyed state dict's tensors (strict: vchat_jax.state_dict)."""
    model = nnx.eval_shape(lambda: VisualChat(config, nnx.Rngs(0)))
    shapes = {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return filled(config, state_dict_to_params(sd, config, shapes), mesh, model)


def filled(config: ModelConfig, params: dict, mesh=None, model: VisualChat | None = None, dtype=None) -> VisualChat:
    """The abstract model (`nnx.eval_shape`: nothing allocated, nothing initialised) with its parameters
    set from `params` ({path: array, or a function returning it}, every one: functions are called one at
    a time, as each parameter is set), each cast to `dtype` (default: the model's) and placed with its
    sharding on `mesh`."""
    model = model if model is not None else nnx.eval_shape(lambda: VisualChat(config, nnx.Rngs(0)))
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if set(flat) != set(params):
        raise RuntimeError(f"parameters do not match the model: {sorted(set(flat) ^ set(params))[:8]}")
    shardings = None
    if mesh is not None:
        from .sharding import param_shardings

        shardings = param_shardings(model, mesh)
    for path, var in flat.items():
        value = params[path]() if callable(params[path]) else params[path]
        arr = jnp.asarray(value, dtype=dtype if dtype is not None else var.get_value().dtype)
        var.set_value(jax.device_put(arr, shardings[path]) if shardings is not None else arr)
    return model
