"""Torch-keyed state dicts (numpy arrays by reference/torch key) <-> vchat_jax parameters, through
vchat/param_map.py's table.

    from vchat.torch_pickle import read_torch_bin
    from vchat_jax.state_dict import load_state_dict, to_state_dict
    sd = read_torch_bin("tests/golden/qwen-mmca/pytorch_model.bin")   # no torch needed
    model = vchat_jax.VisualChat(config, nnx.Rngs(0)); load_state_dict(model, sd)
    assert all((to_state_dict(model)[k] == sd[k]).all() for k in sd)  # bit-exact both ways

Strict in both directions: every source key is used exactly once, every target produced exactly once,
each shape is checked against the model's, and anything left over is listed by name in the error.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.errors import UserError
from vchat.io import list_names as _names
from vchat.param_map import expand, format_path, tied_aliases


class ConversionError(UserError):
    pass


def _model_params(model) -> dict[tuple, object]:
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def state_dict_to_params(sd: dict, config, shapes: dict[tuple, tuple] | None = None) -> dict[tuple, np.ndarray]:
    """Torch-keyed arrays -> {JAX path: array}. `shapes` ({path: shape}) checks each result. A tied
    lm_head's alias key (vchat.param_map.tied_aliases), if present, must equal its source and is dropped."""
    entries = expand(config)
    aliases = tied_aliases(config)
    for alias, source in aliases.items():
        if alias in sd and source in sd and not np.array_equal(np.asarray(sd[alias]), np.asarray(sd[source])):
            raise ConversionError(f"{alias} differs from {source}, but the config ties them (tie_word_embeddings)")
    sd = {k: v for k, v in sd.items() if k not in aliases}
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
