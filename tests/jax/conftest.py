import functools
import json
import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
CASES = json.load(open(os.path.join(GOLDEN, "index.json")))


@functools.lru_cache(maxsize=None)
def golden_run(case: str) -> dict:
    """vchat_jax's outputs for a golden case, computed once per session and shared by the tests."""
    from vchat_jax.golden import run_golden

    return run_golden(os.path.join(GOLDEN, case))


@pytest.fixture(scope="session")
def jax_golden_run():
    return golden_run
