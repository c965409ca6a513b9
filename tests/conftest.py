from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach the Hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# The embedded real models load once per test run (from the dequantized cache after the first run).
@pytest.fixture(scope="session")
def smollm2():
    from steer_core.model import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma():
    from steer_core.model import load_model

    return load_model("gemma-3-270m")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: loads the embedded real models (slow: tens of seconds each)")
