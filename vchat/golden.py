"""Golden cases: outputs of the reference's own model code (tests/golden/README.md), and the
comparison that `vchat check-logits` and the tests share."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from vchat.checkpoint_files import DSVC_META_NAME, DSVC_WEIGHTS_NAME
from vchat.config import ModelConfig

CASE_NAME = "case.npz"  # the batch and the reference's outputs
DEFAULT_ATOL = 1e-4  # logits; the tests hold the torch and JAX models to 1e-5


def load_case(case_dir: str) -> tuple[ModelConfig, dict]:
    """The config (compat "dsvc": a reference checkpoint) and the arrays of a golden folder."""
    names = (DSVC_META_NAME, CASE_NAME, DSVC_WEIGHTS_NAME)
    for name in names:
        if not os.path.exists(os.path.join(case_dir, name)):
            raise FileNotFoundError(f"{case_dir}: missing {name} (expected {', '.join(names)})")
    with open(os.path.join(case_dir, DSVC_META_NAME)) as f:
        meta = json.load(f)
    with np.load(os.path.join(case_dir, CASE_NAME)) as z:
        case = {k: z[k] for k in z.files}
    return ModelConfig.from_dsvc_meta(meta, compat="dsvc"), case


def list_cases(root: str) -> list[str]:
    with open(os.path.join(root, "index.json")) as f:
        return [os.path.join(root, name) for name in json.load(f)]


@dataclass
class Comparison:
    logits_valid: float  # max |diff| at non-padding positions
    logits_all: float  # max |diff| at every position
    loss: float
    ids_equal: bool
    step_logits: float
    modality_equal: bool

    def ok(self, atol: float = DEFAULT_ATOL, loss_atol: float = 1e-5, step_atol: float | None = None) -> bool:
        step_atol = atol if step_atol is None else step_atol
        return (self.logits_valid <= atol and self.loss <= loss_atol and self.ids_equal
                and self.step_logits <= step_atol and self.modality_equal)

    def lines(self) -> list[str]:
        return [f"logits max|diff| (non-padding) {self.logits_valid:.3e}",
                f"logits max|diff| (all)         {self.logits_all:.3e}",
                f"loss |diff|                    {self.loss:.3e}",
                f"greedy ids equal               {self.ids_equal}",
                f"step logits max|diff|          {self.step_logits:.3e}",
                f"modality layout equal          {self.modality_equal}"]


def compare(case: dict, got: dict) -> Comparison:
    ref = case["logits"]
    mod = case["spliced_mask"]
    if got["logits"].shape != ref.shape:
        raise ValueError(f"logits shape {got['logits'].shape} != golden {ref.shape}")
    diff = np.abs(got["logits"].astype(np.float64) - ref)
    want_ids = case["gen_output_ids"][0, 1:]
    return Comparison(
        logits_valid=float(diff[mod > 0].max()),
        logits_all=float(diff.max()),
        loss=abs(float(got["loss"]) - float(case["loss"])),
        ids_equal=bool(np.array_equal(got["gen_ids"], want_ids)),
        step_logits=float(np.abs(got["step_logits"].astype(np.float64) - case["gen_step_logits"]).max()),
        modality_equal=bool(np.array_equal(np.asarray(got["modality"]), mod.astype(np.int64))),
    )
