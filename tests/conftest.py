import os

import pytest

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="session")
def golden_dir() -> str:
    return GOLDEN_DIR
