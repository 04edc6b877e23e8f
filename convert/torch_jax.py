"""Torch state dicts (numpy arrays by reference/torch key) <-> vchat_jax parameters, through param_map.

    from convert.torch_jax import read_torch_bin, load_state_dict, to_state_dict
    sd = read_torch_bin("tests/golden/qwen-mmca/pytorch_model.bin")   # no torch needed
    model = vchat_jax.VisualChat(config, nnx.Rngs(0)); load_state_dict(model, sd)
    assert all((to_state_dict(model)[k] == sd[k]).all() for k in sd)  # bit-exact both ways

Strict in both directions: every source key is used exactly once, every target produced exactly once,
each shape is checked against the model's, and anything left over is listed by name in the error.
"""

from __future__ import annotations

import pickle
import zipfile

import numpy as np

from vchat.io import list_names as _names

from .param_map import expand, format_path


class ConversionError(ValueError):
    pass


def _model_params(model) -> dict[tuple, object]:
    from flax import nnx

    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def state_dict_to_params(sd: dict, config, shapes: dict[tuple, tuple] | None = None) -> dict[tuple, np.ndarray]:
    """Torch-keyed arrays -> {JAX path: array}. `shapes` ({path: shape}) checks each result."""
    entries = expand(config)
    missing = [e.torch for e in entries if e.torch not in sd]
    extra = set(sd) - {e.torch for e in entries}
    if missing or extra:
        raise ConversionError(f"state dict does not match the model: missing key(s) [{_names(missing)}]; "
                              f"unexpected key(s) [{_names(extra)}]")
    out = {}
    for e in entries:
        x = np.asarray(sd[e.torch])
        want = e.jax_shape(x.shape)
        if shapes is not None:
            if e.jax not in shapes:
                raise ConversionError(f"{e.torch}: the model has no parameter {format_path(e.jax)}")
            if tuple(shapes[e.jax]) != want:
                raise ConversionError(f"{e.torch}: shape {tuple(x.shape)} (as JAX {want}) does not match "
                                      f"{format_path(e.jax)} {tuple(shapes[e.jax])}")
        out[e.jax] = e.to_jax(x)
    if shapes is not None:
        uncovered = set(shapes) - set(out)
        if uncovered:
            raise ConversionError(f"model parameter(s) not produced by any rule: "
                                  f"[{_names(format_path(p) for p in uncovered)}]")
    return out


def params_to_state_dict(params: dict[tuple, np.ndarray], config) -> dict[str, np.ndarray]:
    """{JAX path: array} -> torch-keyed numpy arrays (the reference's key names)."""
    entries = expand(config)
    missing = [format_path(e.jax) for e in entries if e.jax not in params]
    extra = set(params) - {e.jax for e in entries}
    if missing or extra:
        raise ConversionError(f"parameters do not match the table: missing [{_names(missing)}]; "
                              f"unexpected [{_names(format_path(p) for p in extra)}]")
    return {e.torch: e.to_torch(np.asarray(params[e.jax])) for e in entries}


def load_state_dict(model, sd: dict) -> None:
    """Strictly load a torch-keyed state dict into a vchat_jax.VisualChat in place (dtype of the model)."""
    import jax.numpy as jnp

    live = _model_params(model)
    shapes = {p: tuple(v.shape) for p, v in live.items()}
    params = state_dict_to_params(sd, model.config, shapes)
    for p, x in params.items():
        var = live[p]
        var[...] = jnp.asarray(x, dtype=var[...].dtype)


def to_state_dict(model) -> dict[str, np.ndarray]:
    """A vchat_jax.VisualChat's parameters as a torch-keyed dict of numpy arrays."""
    params = {p: np.asarray(v[...]) for p, v in _model_params(model).items()}
    return params_to_state_dict(params, model.config)


# -- reading torch.save files without torch -------------------------------------------------------------

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *args):
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, prefix: str):
        super().__init__(f)
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        _, stype, key, _location, _numel = pid
        dtype = _DTYPES[stype.name]
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        return np.frombuffer(self.zf.read(f"{self.prefix}/data/{key}"), dtype=dtype)


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (zip format) as {key: numpy array}, without importing torch."""
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        with zf.open(pkl) as f:
            sd = _Unpickler(f, zf, prefix).load()
    return {k: np.asarray(v) for k, v in sd.items()}
