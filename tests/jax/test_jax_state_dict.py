"""vchat_jax.state_dict, vchat.torch_pickle and the vchat.param_map table: reference checkpoints -> vchat_jax -> state dict, bit-exact,
and strict errors that name the offending key."""

import json
import os

import numpy as np
import pytest
import torch
from flax import nnx

from vchat.config import ModelConfig
from vchat.param_map import RULES, TRANSFORMS, expand
from vchat.torch_pickle import read_torch_bin
from vchat_jax import VisualChat
from vchat_jax.state_dict import ConversionError, load_state_dict, state_dict_to_params, to_state_dict

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
CASES = json.load(open(os.path.join(GOLDEN, "index.json")))


def _case(name):
    with open(os.path.join(GOLDEN, name, "meta.json")) as f:
        cfg = ModelConfig.from_dsvc_meta(json.load(f))
    return cfg, os.path.join(GOLDEN, name, "pytorch_model.bin")


@pytest.mark.parametrize("case_name", CASES)
def test_reference_checkpoint_round_trip_is_bit_exact(case_name):
    cfg, path = _case(case_name)
    sd = read_torch_bin(path)
    ref = torch.load(path, map_location="cpu")
    assert list(sd) == list(ref)
    for k, v in ref.items():  # the torch-free reader gives torch.load's arrays
        assert sd[k].dtype == np.float32 and np.array_equal(sd[k], v.numpy()), k
    model = VisualChat(cfg, nnx.Rngs(1))
    load_state_dict(model, sd)
    back = to_state_dict(model)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and np.array_equal(back[k], sd[k]), k


def _tiny():
    cfg, path = _case("baseline-mmca")
    return cfg, read_torch_bin(path), VisualChat(cfg, nnx.Rngs(0))


def test_missing_key_is_named():
    _, sd, model = _tiny()
    del sd["lang_decoder.model.layers.1.mlp.up_proj.weight"]
    key = r"lang_decoder\.model\.layers\.1\.mlp\.up_proj\.weight"
    with pytest.raises(ConversionError, match=rf"missing key\(s\) \[{key}\]"):
        load_state_dict(model, sd)


def test_extra_key_is_named():
    _, sd, model = _tiny()
    sd["projection.2.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"unexpected key\(s\) \[projection\.2\.weight\]"):
        load_state_dict(model, sd)


def test_wrong_shape_is_named():
    _, sd, model = _tiny()
    sd["lang_decoder.model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 128), np.float32)
    with pytest.raises(ConversionError, match=r"lang_decoder\.model\.layers\.0\.self_attn\.k_proj\.weight: shape"):
        load_state_dict(model, sd)


def test_a_checkpoint_for_another_projection_is_refused():
    cfg, _ = _case("vit-mmca")
    _, sd, _ = _tiny()
    with pytest.raises(ConversionError, match=r"missing key\(s\) \[projection\.projection\.0\.bias"):
        state_dict_to_params(sd, cfg)


def test_reverse_direction_is_strict():
    from vchat_jax.state_dict import params_to_state_dict

    cfg, sd, _ = _tiny()
    params = state_dict_to_params(sd, cfg)
    params.pop(("lang_embed", "embedding"))
    params[("lang_embed", "extra")] = np.zeros(1)
    with pytest.raises(ConversionError, match=r"missing \[lang_embed\.embedding\]; unexpected \[lang_embed\.extra\]"):
        params_to_state_dict(params, cfg)


def test_table_is_one_to_one_and_transforms_invert():
    for name in CASES:
        cfg, _ = _case(name)
        entries = expand(cfg)
        assert len({e.torch for e in entries}) == len(entries) == len({e.jax for e in entries})
    rng = np.random.default_rng(0)
    for name, (fwd, inv, shape) in TRANSFORMS.items():
        x = rng.standard_normal((2, 3, 4, 5) if name == "conv" else (2, 3))
        assert np.array_equal(inv(fwd(x)), x) and fwd(x).shape == shape(x.shape)
    assert all(r.transform in TRANSFORMS for r in RULES)
