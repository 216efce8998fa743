"""Smoke version of benchmarks/bench_trace.py: equality of exact and naive on a few cells (no timing)."""

import importlib.util
from pathlib import Path

import torch


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trace.py"
    spec = importlib.util.spec_from_file_location("bench_trace", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_smoke(model):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _bench().smoke(model) < 1e-5
    finally:
        torch.set_num_threads(n)


def test_bench_loader():
    bench = _bench()
    assert bench.DATA.exists(), f"vendored CounterFact missing: {bench.DATA}"
    facts = bench.load_facts()
    f = facts[0]
    assert f["subject"] in f["prompt"] and f["target"].startswith(" ") and not f["target"].startswith("  ")
