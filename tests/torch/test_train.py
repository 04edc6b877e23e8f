"""`vchat train` end to end on CPU: one process, two processes (ZeRO-2, ZeRO-3), resume, bad input.

Each run is a subprocess, as a user runs it (DeepSpeed's process group is per process).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
COMMON = ["--lm_model_name_or_path", "tiny", "--dataset_names", "synthetic", "--synthetic_samples", "48",
          "--precision", "fp32", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
          "--enable_mmca_attention", "--quiet", "--learning_rate", "1e-2", "--num_warmup_steps", "0.25"]


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out, *extra, procs=1):
    if procs == 1:
        cmd = [sys.executable, "-m", "vchat.cli", "train"]
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(procs), "--master_port", str(free_port()),
               "-m", "vchat_torch.train"]
    r = subprocess.run(cmd + COMMON + ["--output_dir", str(out), *extra], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def max_diff(a, b, keys=None):
    keys = keys or a.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def test_one_process_trains_and_writes_everything(tmp_path):
    r = train(tmp_path / "run", "--enable_tensorboard")
    out = tmp_path / "run"
    assert {"final", "best", "ds", "train_log.jsonl", "loss_curve.png", "tb"} <= set(os.listdir(out))
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(losses) == 10 and len(evals) == 2  # 43 train samples // 4 = 10 steps; eval before and after
    assert evals[-1] < evals[0] - 0.5, evals
    assert "10 steps per epoch" in r.stdout
    from vchat_torch import VisualChat

    model = VisualChat.from_pretrained(str(out / "final"))
    assert model.config.mmca and model.config.compat == "fixed"
    assert (out / "final" / "tokenizer.json").exists()
    torch.manual_seed(1234)  # frozen parts equal the seeded initialisation, trained parts moved
    start = VisualChat(model.config)
    assert torch.equal(start.lang_decoder.lm_head.weight, model.lang_decoder.lm_head.weight)
    assert not torch.equal(start.projection[0].weight, model.projection[0].weight)


@pytest.mark.slow  # multi-process DeepSpeed end to end: `make test-slow`
def test_zero2_and_zero3_two_processes_match_zero0(tmp_path):
    train(tmp_path / "z0", "--zero_stage", "0", procs=2)
    train(tmp_path / "z2", "--zero_stage", "2", procs=2)
    train(tmp_path / "z3", "--zero_stage", "3", procs=2)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    z0 = weights(tmp_path / "z0" / "final")
    z3 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "z3" / "ds"))
    trained = ["lang_embed.weight", "projection.0.weight", "projection.0.bias", "projection.1.weight",
               "projection.1.bias"]
    assert max_diff(z0, z3, trained) <= 1e-6
    assert max_diff(z0, weights(tmp_path / "z2" / "final")) <= 1e-6
    assert max_diff(z0, weights(tmp_path / "z3" / "final")) <= 1e-6
    assert max_diff(z0, weights(tmp_path / "z0" / "best")) == 0.0  # the last evaluation was the best
    # the DeepSpeed directories load directly (every tensor, frozen ones included)
    from vchat_torch.checkpoint import from_zero

    for run in ("z2", "z3"):
        ds = {k: v for k, v in from_zero(str(tmp_path / run / "ds")).state_dict().items()}
        assert set(ds) == set(z0) and max_diff(z0, ds) <= 1e-6, run


@pytest.mark.slow  # multi-process DeepSpeed end to end: `make test-slow`
def test_resume_ends_with_the_same_weights(tmp_path):
    train(tmp_path / "full", "--gradient_accumulation_steps", "2")
    r = train(tmp_path / "cut", "--gradient_accumulation_steps", "2", "--stop_after_steps", "2")
    assert not (tmp_path / "cut" / "final").exists()
    r = train(tmp_path / "cut", "--gradient_accumulation_steps", "2")
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    assert max_diff(weights(tmp_path / "full" / "final"), weights(tmp_path / "cut" / "final")) == 0.0
    zero0_checkpoint_loads_and_converts(tmp_path)


def zero0_checkpoint_loads_and_converts(tmp_path):
    """The ZeRO-0 DeepSpeed directory (and one step under it) equals the exported final/, in torch and JAX."""
    from vchat_torch import VisualChat
    from vchat_torch.checkpoint import CheckpointError, from_zero

    final = weights(tmp_path / "full" / "final")
    ds = tmp_path / "full" / "ds"
    assert (ds / "config.json").exists() and (ds / "tokenizer.json").exists()
    assert max_diff(final, VisualChat.from_pretrained(str(ds)).state_dict()) == 0.0
    step = (ds / "latest").read_text().strip()
    assert max_diff(final, from_zero(str(ds / step), config=str(ds / "config.json")).state_dict()) == 0.0
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        from_zero(str(tmp_path / "full" / "final"))
    r = subprocess.run([sys.executable, "-m", "vchat.cli", "convert", "--from", "zero", "--to", "jax", str(ds),
                        str(tmp_path / "jax")], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    import numpy as np

    from vchat_jax.state_dict import to_state_dict
    from vchat_jax import VisualChat as JaxVisualChat

    assert (tmp_path / "jax" / "tokenizer.json").read_text() == (ds / "tokenizer.json").read_text()
    back = to_state_dict(JaxVisualChat.from_pretrained(str(tmp_path / "jax")))
    assert max(float(np.abs(back[k] - final[k].numpy()).max()) for k in final) == 0.0


def test_bad_deepspeed_config_is_named(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    r = subprocess.run([sys.executable, "-m", "vchat.cli", "train", *COMMON, "--output_dir", str(tmp_path / "o"),
                        "--deepspeed_config", str(bad)], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert f"--deepspeed_config {bad}: zero_optimization.stage must be 0-3, got 5" in r.stderr
