"""Gradient checkpointing (decoder layers, CLIP encoder layers, Qwen resblocks) and bf16 training.

Checkpointing must recompute every layer in the backward pass and change nothing else: the same
gradients, the same losses step by step. bf16 must train and export a checkpoint that loads.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vchat_torch import VisualChat
from vchat_torch.train import build_model
from torch_helpers import args_for, tiny_qwen_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
IMG, PRE = 95, 94


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = torch.tensor([[1] + rng.integers(3, 90, 4).tolist() + [PRE, IMG] + rng.integers(3, 90, 9).tolist()] * 2)
    images = torch.from_numpy(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    return dict(images=images, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, image_num=[1, 1])


def count_calls(module):
    """Calls of `module` (a pre-hook: torch's recompute may stop before a module returns)."""
    n = [0]
    module.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


@pytest.mark.parametrize("tower", ["clip", "qwen"])
def test_checkpointing_recomputes_every_layer_and_keeps_the_gradients(tower, tmp_path):
    # LoRA on the tower puts it in the backward pass, so its checkpointing matters
    if tower == "clip":
        name, flags = "tiny", ["--vis_lora_dim", "4"]
        vis_layer = lambda m: m.vis_encoder.get_submodule("vision_model.encoder.layers.1.mlp")
    else:
        name, flags = tiny_qwen_json(tmp_path), ["--vis_lora_dim", "4", "--vis_lora_module_name", "resblocks"]
        vis_layer = lambda m: m.vis_encoder.transformer.resblocks[1].mlp
    grads = {}
    for gc in (False, True):
        model = build_model(args_for(*flags, *(["--gradient_checkpointing"] if gc else []), model=name))
        # hooks on a module inside each layer (transformers keeps the layer's own hooks out of the recompute)
        dec, vis = count_calls(model.lang_decoder.model.layers[1].mlp), count_calls(vis_layer(model))
        model(**batch()).loss.backward()
        assert (dec[0], vis[0]) == ((2, 2) if gc else (1, 1))  # forward, then once more in backward
        grads[gc] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("vis_encoder" in n for n in grads[True])
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, atol=1e-6, rtol=1e-5, msg=n)


# -- training runs ---------------------------------------------------------------------------------
def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return e


def train(out, *extra):
    common = ["--lm_model_name_or_path", "tiny", "--dataset_names", "synthetic", "--synthetic_samples", "24",
              "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--enable_mmca_attention", "--quiet",
              "--learning_rate", "1e-2", "--vis_lora_dim", "4"]
    r = subprocess.run([sys.executable, "-m", "vchat.cli", "train", *common, "--output_dir", str(out), *extra],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [row["loss"] for row in map(json.loads, open(out / "train_log.jsonl")) if "loss" in row]


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    return train(tmp_path_factory.mktemp("fp32") / "run", "--precision", "fp32")


def test_gradient_checkpointing_run_has_the_same_losses(tmp_path, fp32_losses):
    losses = train(tmp_path / "gc", "--precision", "fp32", "--gradient_checkpointing")
    assert len(losses) == len(fp32_losses) == 5
    np.testing.assert_allclose(losses, fp32_losses, rtol=0, atol=1e-6)
    assert losses[-1] < losses[0] - 0.5  # it trained
    VisualChat.from_pretrained(str(tmp_path / "gc" / "final"))


def test_bf16_run_trains_and_exports(tmp_path, fp32_losses):
    out = tmp_path / "bf16"
    losses = train(out, "--precision", "bf16", "--gradient_checkpointing", "--lang_lora_dim", "4")
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - fp32_losses[0]) < 2e-2  # the first step runs the initial weights in bf16
    assert losses[-1] < losses[0] - 0.5
    sd = load_file(os.path.join(out, "final", "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    model = VisualChat.from_pretrained(str(out / "final"))  # LoRA merged, strict keys
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
