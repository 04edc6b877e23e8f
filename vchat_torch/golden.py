"""Run a reference golden case (tests/golden/<case>) through the PyTorch model."""

from __future__ import annotations

import numpy as np
import torch

from vchat.golden import load_case

from .checkpoint import from_dsvc


@torch.no_grad()
def run_golden(case_dir: str) -> dict:
    """Logits and loss of the case's batch, and the greedy generation of its prompt (8 tokens)."""
    config, case = load_case(case_dir)
    model = from_dsvc(case_dir, config)
    t = torch.from_numpy
    out = model(t(case["images"]), t(case["input_ids"]), t(case["attention_mask"]), labels=t(case["labels"]),
                image_num=t(case["image_num"]))
    n_new = case["gen_output_ids"].shape[1] - 1
    gen = model.generate(t(case["gen_images"]), t(case["gen_input_ids"]), max_new_tokens=n_new)
    return {"logits": out.logits.numpy(), "loss": float(out.loss), "modality": out.modality.numpy(),
            "gen_ids": gen.ids[0].numpy().astype(np.int64), "step_logits": gen.step_logits[0].numpy()}
