"""Shared fixtures: one embedded model per test session (loading takes ~5 s once cached)."""

import os

import pytest
import torch

# Key statistics from 10,240 WikiText tokens instead of the library default 102,400: the tests check the editors'
# mechanics, not C's precision, and this keeps a suite from an empty cache within its time budget. Notebooks and
# subprocesses started by the tests inherit it.
os.environ.setdefault("LOCEDIT_COVARIANCE_TOKENS", "10240")


@pytest.fixture(scope="session")
def model():
    from tracer import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")
