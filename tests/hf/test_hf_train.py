"""`vchat train` and `vchat train-jax` start from Hugging Face directories (--lm_model_name_or_path a LLaMA
directory, --vision_model_name_or_path a CLIP or Qwen-VL one), train, and save the tokenizer with the
reference's tokens; the frozen decoder stays the pretrained one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hf_dirs import make_llama_dir, make_qwen_dir
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
MEAN, STD = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import CLIPImageProcessor

    root = tmp_path_factory.mktemp("train")
    vision = make_qwen_dir(str(root / "qwen"))
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=MEAN,
                       image_std=STD).save_pretrained(vision)  # preprocessing the trained checkpoints must keep
    return make_llama_dir(str(root / "llama"), kv_heads=2, pad=False), vision


@pytest.mark.parametrize("command", [pytest.param("train", marks=pytest.mark.slow), "train-jax"])
def test_trainers_start_from_hf_directories(hf_dirs, tmp_path, command):
    lm, vision = hf_dirs
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vchat.cli", command, "--lm_model_name_or_path", lm, "--vision_model_name_or_path",
           vision, "--vision_model_type", "qwen", "--enable_mmca_attention", "--dataset_names", "synthetic",
           "--synthetic_samples", "24", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
           "--max_steps", "2", "--max_seq_len", "256", "--quiet", "--output_dir", str(out)]
    cmd += ["--precision", "fp32"] if command == "train" else []
    env = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from tokenizers import Tokenizer

    from vchat.config import ModelConfig

    final = out / "final"
    cfg = ModelConfig.load(str(final / "config.json"))
    assert cfg.vision.kind == "qwen" and cfg.llm.vocab_size == 64 + 3 and cfg.llm.max_position_embeddings == 256
    tok = Tokenizer.from_file(str(final / "tokenizer.json"))
    assert tok.token_to_id("<image>") == cfg.image_token_id and tok.get_vocab_size() == 67
    with open(final / "preprocessor_config.json") as f:
        saved = json.load(f)
    assert saved["image_mean"] == MEAN and saved["image_std"] == STD and saved["size"] == {"shortest_edge": 40}
    if command == "train":
        from vchat_torch.checkpoint import from_pretrained

        back = from_pretrained(str(final))  # chat, eval and a resumed run preprocess as the run did
        assert back.image_processor.size == 40 and list(back.image_processor.mean) == MEAN
        sd = load_file(str(final / "model.safetensors"))
        src = load_file(os.path.join(lm, "model.safetensors"))
        assert np.array_equal(sd["lang_decoder.model.layers.1.mlp.up_proj.weight"],
                              src["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.slow  # multi-process DeepSpeed end to end: `make test-slow`
def test_zero3_training_from_hf_directories(hf_dirs, tmp_path):
    """Two processes, ZeRO-3: the model is built inside zero.Init from the HF files and trains."""
    import socket

    lm, vision = hf_dirs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "z3"
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "-m",
           "vchat_torch.train", "--lm_model_name_or_path", lm, "--vision_model_name_or_path", vision,
           "--zero_stage", "3", "--precision", "fp32", "--dataset_names", "synthetic", "--synthetic_samples", "24",
           "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--max_steps", "2", "--max_seq_len", "256",
           "--quiet", "--output_dir", str(out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sd = load_file(str(out / "final" / "model.safetensors"))
    src = load_file(os.path.join(lm, "model.safetensors"))
    assert np.array_equal(sd["lang_decoder.model.layers.0.self_attn.k_proj.weight"],
                          src["model.layers.0.self_attn.k_proj.weight"])
