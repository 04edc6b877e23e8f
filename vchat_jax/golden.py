"""Run vchat_jax on a reference golden case (tests/golden/<case>/: meta.json, pytorch_model.bin, case.npz).

    from vchat_jax.golden import run_golden
    out = run_golden("tests/golden/qwen-mmca")            # one device
    out = run_golden("tests/golden/qwen-mmca", {"data": 1, "fsdp": 2, "tensor": 4})  # on a mesh

The CLI's `vchat check-logits --framework jax` calls `run_golden` and compares its arrays with the case's.
The checkpoint is read without torch (vchat.torch_pickle.read_torch_bin) and loaded strictly.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from vchat.checkpoint_files import DSVC_META_NAME
from vchat.config import ModelConfig
from vchat.golden import load_case

from .checkpoint import from_dsvc
from .model import VisualChat


def load_golden_model(case_dir: str, compat: str = "dsvc") -> VisualChat:
    """The case's reference checkpoint in vchat_jax (config from meta.json), loaded strictly."""
    with open(os.path.join(case_dir, DSVC_META_NAME)) as f:
        config = ModelConfig.from_dsvc_meta(json.load(f), compat=compat)
    return from_dsvc(case_dir, config)


def run_golden(case_dir: str, mesh: dict | None = None) -> dict:
    """The forward pass (logits over the spliced batch, loss) and the 8-step greedy generation of a case.

    Returns {"logits": (B, L, V) float32, "loss": float, "gen_ids": (8,) int64 (the generated tokens,
    without the BOS the reference prepends), "step_logits": (8, V) float32, "modality": (B, L)}.
    `mesh` maps mesh axis names (data, fsdp, tensor) to sizes; parameters and activations are then
    sharded by vchat_jax.sharding.
    """
    config, case = load_case(case_dir)
    model = from_dsvc(case_dir, config)
    with jax.default_matmul_precision("highest"):  # float32 parity, also on accelerators
        if mesh is None:
            return _run(model, case)
        from .sharding import make_mesh, shard_model

        m = make_mesh(mesh)
        with jax.set_mesh(m):
            shard_model(model, m)
            return _run(model, case)


def _run(model: VisualChat, case: dict) -> dict:
    out = model(case["images"], case["input_ids"], case["attention_mask"], labels=case["labels"],
                image_num=case["image_num"])
    n_new = case["gen_output_ids"].shape[1] - 1
    gen = model.generate(case["gen_images"], case["gen_input_ids"], max_new_tokens=n_new)
    return {"logits": np.asarray(out.logits, dtype=np.float32), "loss": float(out.loss),
            "modality": np.asarray(out.modality), "gen_ids": np.asarray(gen.ids[0], dtype=np.int64),
            "step_logits": np.asarray(gen.step_logits[0], dtype=np.float32)}
