"""`vchat convert --from hf --to jax` streams: vchat_jax.hf.save_hf writes what from_hf(...).save_pretrained
would, and vchat_jax.checkpoint.save_lazily holds at most IN_FLIGHT parameters at once."""

import weakref

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from hf_dirs import make_llama_dir, make_qwen_dir

from vchat.config import ModelConfig
from vchat_jax.checkpoint import IN_FLIGHT, LazyLeaf, from_pretrained, save_lazily
from vchat_jax.hf import from_hf, save_hf
from vchat_jax.state_dict import to_state_dict


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return make_llama_dir(str(root / "tied"), tie=True, dtype=torch.bfloat16), make_qwen_dir(str(root / "qwen"))


def test_save_hf_equals_from_hf_saved(dirs, tmp_path):
    save_hf(*dirs, str(tmp_path / "jax"), compat="fixed", max_seq_len=64)
    want = from_hf(*dirs, max_seq_len=64)
    got = from_pretrained(str(tmp_path / "jax"))
    assert got.config == want.config
    sw, sg = to_state_dict(want), to_state_dict(got)
    assert sw.keys() == sg.keys()
    assert all(np.array_equal(np.asarray(sw[k], np.float32), sg[k]) for k in sw)
    stored = ocp.StandardCheckpointer().metadata(str(tmp_path / "jax" / "params")).item_metadata.tree
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(stored)} == {"bfloat16"}  # the checkpoint's dtype, kept
    assert open(tmp_path / "jax" / "tokenizer.json").read() == want.tokenizer.backend.to_str()


def test_save_lazily_holds_few_leaves(tmp_path):
    live, peak, rng = [0], [0], np.random.default_rng(0)
    values = {f"w{i}": rng.standard_normal((64, 32)).astype(np.float32) for i in range(24)}

    def read(name):  # a fresh array, counted while alive
        x = values[name].copy()
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(x, lambda: live.__setitem__(0, live[0] - 1))
        return x

    params = {"block": {n: LazyLeaf(v.shape, v.dtype, lambda n=n: read(n)) for n, v in values.items()}}
    save_lazily(ModelConfig(), str(tmp_path / "ckpt"), params)
    restored = ocp.StandardCheckpointer().restore(str(tmp_path / "ckpt" / "params"))
    assert all(np.array_equal(np.asarray(restored["block"][n]), v) for n, v in values.items())
    assert 1 <= peak[0] <= IN_FLIGHT  # 24 leaves, never more than IN_FLIGHT alive
