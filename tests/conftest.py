"""Shared fixtures: one embedded model per test session (loading takes ~5 s once cached)."""

import pytest
import torch


@pytest.fixture(scope="session")
def model():
    from tracer import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")
