"""Bad Hugging Face input: each a one-line error naming the file and the key; nothing half-written."""

import json
import os
import shutil

import pytest
from hf_dirs import make_llama_dir
from safetensors.numpy import load_file, save_file

from vchat.hf import HFError
from vchat_torch.hf_convert import convert_hf


@pytest.fixture
def lm(tmp_path):
    return make_llama_dir(str(tmp_path / "lm"), shard_size="20KB")


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


def fails(tmp_path, lm_dir, vision_dir, *needles):
    """convert_hf raises a one-line HFError holding every needle, and leaves nothing in tmp_path/out's folder."""
    before = set(os.listdir(tmp_path))
    with pytest.raises(HFError) as e:
        convert_hf(lm_dir, vision_dir, str(tmp_path / "out"))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert set(os.listdir(tmp_path)) == before  # no out/, no temporary sibling
    return msg


@pytest.mark.parametrize("change,needles", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ["'rope_scaling'"]),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), ["'rope_parameters.rope_type'", "yarn"]),
    (dict(attention_bias=True), ["'attention_bias'"]),
    (dict(mlp_bias=True), ["'mlp_bias'"]),
    (dict(model_type="mistral"), ["'model_type'", "mistral"]),
    (dict(hidden_act="gelu"), ["'hidden_act'"]),
    (dict(head_dim=32), ["'head_dim'"]),
])
def test_unsupported_config_fields(tmp_path, lm, clip_dir, change, needles):
    edit_config(lm, **change)
    fails(tmp_path, lm, clip_dir, os.path.join(lm, "config.json"), *needles)


def test_not_a_checkpoint(tmp_path, clip_dir):
    os.makedirs(tmp_path / "empty")
    fails(tmp_path, str(tmp_path / "empty"), clip_dir, "config.json", "no such file")
    lm = make_llama_dir(str(tmp_path / "noweights"))
    for name in os.listdir(lm):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(lm, name))
    fails(tmp_path, lm, clip_dir, lm, "not a Hugging Face checkpoint")


def test_missing_shard(tmp_path, lm, clip_dir):
    index = json.load(open(os.path.join(lm, "model.safetensors.index.json")))["weight_map"]
    shard = index["model.norm.weight"]
    os.remove(os.path.join(lm, shard))
    fails(tmp_path, lm, clip_dir, "model.safetensors.index.json", shard, "weight_map.")


def test_tensor_of_the_wrong_shape(tmp_path, lm, clip_dir):
    index = json.load(open(os.path.join(lm, "model.safetensors.index.json")))["weight_map"]
    path = os.path.join(lm, index["model.layers.1.mlp.up_proj.weight"])
    sd = load_file(path)
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:, :10].copy()
    save_file(sd, path)
    fails(tmp_path, lm, clip_dir, path, "'model.layers.1.mlp.up_proj.weight'", "(96, 10)", "(96, 64)")


def test_missing_tensor(tmp_path, lm, clip_dir):
    index_path = os.path.join(lm, "model.safetensors.index.json")
    index = json.load(open(index_path))
    del index["weight_map"]["model.layers.0.input_layernorm.weight"]
    json.dump(index, open(index_path, "w"))
    fails(tmp_path, lm, clip_dir, lm, "'model.layers.0.input_layernorm.weight'")


def test_vision_dir_of_unknown_kind(tmp_path, lm, clip_dir):
    vit = str(tmp_path / "vit")
    shutil.copytree(clip_dir, vit)
    edit_config(vit, model_type="vit")
    fails(tmp_path, lm, vit, os.path.join(vit, "config.json"), "'model_type'", "'vit'", "--vision_model_type")
    with pytest.raises(HFError, match="holds a clip tower"):
        convert_hf(lm, clip_dir, str(tmp_path / "out"), vision_type="qwen")


def test_tokenizer_that_does_not_fit_the_embeddings(tmp_path, clip_dir):
    lm = make_llama_dir(str(tmp_path / "lm"), vocab=64, tokenizer_size=80)
    fails(tmp_path, lm, clip_dir, os.path.join(lm, "tokenizer.json"), "80 tokens", "'vocab_size' = 64")


def test_leftover_tensors_are_named(tmp_path, lm, clip_dir):
    sd = load_file(os.path.join(clip_dir, "model.safetensors"))
    vis = str(tmp_path / "clip")
    shutil.copytree(clip_dir, vis)
    sd["encoder.layers.7.mlp.fc1.weight"] = sd["encoder.layers.0.mlp.fc1.weight"]
    save_file(sd, os.path.join(vis, "model.safetensors"))
    fails(tmp_path, lm, vis, vis, "encoder.layers.7.mlp.fc1.weight")
