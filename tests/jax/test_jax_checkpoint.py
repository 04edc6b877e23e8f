"""vchat_jax checkpoints: orbax save/load bit-exact, and a vchat_torch-style directory
(config.json + model.safetensors with the reference's key names) loads through the table."""

import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from vchat.torch_pickle import read_torch_bin
from vchat_jax.state_dict import to_state_dict
from vchat_jax import VisualChat
from vchat_jax.golden import load_golden_model

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")


def _params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_orbax_round_trip(tmp_path):
    model = load_golden_model(os.path.join(GOLDEN, "qwen-mmca"))
    model.save_pretrained(str(tmp_path / "ckpt"))
    model.save_pretrained(str(tmp_path / "ckpt"))  # overwriting an existing directory
    back = VisualChat.from_pretrained(str(tmp_path / "ckpt"))
    assert back.config == model.config
    a, b = _params(model), _params(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_loads_a_torch_style_directory(tmp_path):
    model = load_golden_model(os.path.join(GOLDEN, "vit-mmca"))
    model.config.save(str(tmp_path / "config.json"))
    sd = read_torch_bin(os.path.join(GOLDEN, "vit-mmca", "pytorch_model.bin"))
    save_file(sd, str(tmp_path / "model.safetensors"))
    back = VisualChat.from_pretrained(str(tmp_path), compat="fixed")
    assert back.config.compat == "fixed"
    sd, sd2 = to_state_dict(model), to_state_dict(back)
    assert all(np.array_equal(sd[k], sd2[k]) for k in sd)


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VisualChat.from_pretrained(str(tmp_path))


def test_loaders_never_build_a_model_to_overwrite(tmp_path, monkeypatch):
    """from_pretrained and from_dsvc fill an abstract model (nnx.eval_shape): VisualChat is only ever
    constructed under tracing, so no parameter is initialised only to be overwritten."""
    import jax
    import jax.numpy as jnp

    import vchat_jax.checkpoint as jc

    model = load_golden_model(os.path.join(GOLDEN, "qwen-mmca"))
    model.save_pretrained(str(tmp_path / "ckpt"))
    traced = []

    class Watched(VisualChat):
        def __init__(self, *a, **k):
            traced.append(isinstance(jnp.zeros(()) + 1, jax.core.Tracer))
            super().__init__(*a, **k)

    monkeypatch.setattr(jc, "VisualChat", Watched)
    back = VisualChat.from_pretrained(str(tmp_path / "ckpt"))
    again = jc.from_dsvc(os.path.join(GOLDEN, "qwen-mmca"), model.config)
    assert traced and all(traced), traced
    a, b, c = _params(model), _params(back), _params(again)
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)
