"""The PyTorch model against the reference's own outputs (tests/golden/README.md)."""

import json
import os

import pytest

from vchat.golden import compare, load_case
from vchat_torch.golden import run_golden

CASES = json.load(open(os.path.join(os.path.dirname(__file__), "..", "golden", "index.json")))


@pytest.mark.parametrize("case_name", CASES)
def test_golden_case(golden_dir, case_name):
    case_dir = os.path.join(golden_dir, case_name)
    _, case = load_case(case_dir)
    r = compare(case, run_golden(case_dir))
    assert r.modality_equal
    assert r.logits_valid <= 1e-5, r.lines()
    assert r.loss <= 1e-5, r.lines()
    assert r.ids_equal, r.lines()
    assert r.step_logits <= 1e-4, r.lines()


def test_all_six_cases_are_listed():
    assert sorted(CASES) == sorted(["baseline-mmca", "baseline-causal", "baseline-mmca-gqa", "perceiver-mmca",
                                    "vit-mmca", "qwen-mmca"])
