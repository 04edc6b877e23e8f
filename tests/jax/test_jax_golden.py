"""vchat_jax against the reference's own outputs (tests/golden/README.md), every case of index.json:
logits at non-padding positions and the loss to 1e-5, greedy ids equal, step logits to 1e-4."""

import json
import os

import numpy as np
import pytest

from vchat.golden import compare, load_case

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
CASES = json.load(open(os.path.join(GOLDEN, "index.json")))


@pytest.mark.parametrize("case_name", CASES)
def test_golden_case(jax_golden_run, case_name):
    _, case = load_case(os.path.join(GOLDEN, case_name))
    got = jax_golden_run(case_name)
    r = compare(case, got)
    assert r.modality_equal
    assert r.logits_valid <= 1e-5, r.lines()
    assert r.loss <= 1e-5, r.lines()
    assert r.ids_equal, r.lines()
    assert r.step_logits <= 1e-4, r.lines()
    assert got["logits"].dtype == np.float32 and got["step_logits"].shape == case["gen_step_logits"].shape
    assert got["gen_ids"].dtype == np.int64 and got["gen_ids"].shape == (8,)


def test_index_lists_six_cases():
    assert sorted(CASES) == sorted(["baseline-mmca", "baseline-causal", "baseline-mmca-gqa", "perceiver-mmca",
                                    "vit-mmca", "qwen-mmca"])
