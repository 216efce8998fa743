"""The Ray executor (issue 17) on a local Ray with the embedded model: the same keys and values as the serial
runner, an actor killed mid-study is replaced with no lost or duplicated unit, and a Ray run resumed serially (and
the reverse) finishes with exactly the serial rows. Serial references run with 1 torch thread, as the actors do."""

import json
import shutil

import polars as pl
import pytest
import torch

ray = pytest.importorskip("ray", reason='the Ray executor needs the [ray] extra: pip install -e ".[ray]"')

from locedit.config import parse_config  # noqa: E402
from locedit.executor import run_study_ray  # noqa: E402
from locedit.study import collect_tables, run_study  # noqa: E402

pytestmark = pytest.mark.slow
CONFIG = parse_config({"study": {"name": "raytest"}, "data": {"sample": 2, "seed": 0},
                       "localization": {"samples": 2}, "editing": {"layers": [3], "essence": False,
                                                              "covariance_tokens": 2048}})
VOLATILE = ("seconds", "edit_seconds")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def serial(model, one_thread, tmp_path_factory):
    run = tmp_path_factory.mktemp("serial")
    run_study(CONFIG, run, model=model, progress=False)
    return collect_tables(run)


def _rows(tables) -> dict[str, pl.DataFrame]:
    keys = {"tracing": ["fact_id", "localization", "kind", "window", "token_index", "layer"], "edits": ["key"]}
    return {t: tables[t].drop([c for c in VOLATILE if c in tables[t].columns]).sort(keys[t])
            for t in ("tracing", "edits")}


def _same(a, b, tol=1e-6):
    for t in ("tracing", "edits"):
        x, y = _rows(a)[t], _rows(b)[t]
        assert x.columns == y.columns and x.height == y.height, t
        assert x.select(x.columns[:2]).rows() == y.select(y.columns[:2]).rows(), t
        for c in x.columns:
            if x.schema[c].is_numeric():
                d = (x[c].cast(pl.Float64) - y[c].cast(pl.Float64)).abs().fill_nan(0.0).max()
                assert d is None or d <= tol, (t, c, d)
            else:
                assert x[c].to_list() == y[c].to_list(), (t, c)


def _lines(run, table):
    return [json.loads(x)["key"] for p in (run / "journal").glob(f"{table}.*.jsonl") for x in p.read_text().splitlines()]


def test_ray_with_a_killed_actor_equals_serial(local_ray, serial, tmp_path):
    s = run_study_ray(CONFIG, tmp_path, actors=2, progress=False, _kill_after=1)
    n_traces = serial["tracing"].select("fact_id", "localization", "kind", "window").n_unique()
    assert s.failed == 0 and s.done == serial["edits"].height + n_traces
    _same(collect_tables(tmp_path), serial)
    for table in ("tracing", "edits"):  # no unit journaled twice
        keys = _lines(tmp_path, table)
        assert len(keys) == len(set(keys))
    log = (tmp_path / "study.log").read_text()
    assert "killing actor" in log and "re-queueing the fact" in log and "done on actor" in log


def test_resume_across_executors(model, local_ray, one_thread, serial, tmp_path):
    a, b = tmp_path / "ray-then-serial", tmp_path / "serial-then-ray"
    run_study_ray(CONFIG, a, actors=2, progress=False, limit=1)
    s = run_study(CONFIG, a, model=model, progress=False)
    assert s.skipped == 2 and s.done == 2
    _same(collect_tables(a), serial)
    run_study(CONFIG, b, model=model, progress=False, limit=1)
    r = run_study_ray(CONFIG, b, actors=2, progress=False)
    assert r.skipped == 2 and r.done == 2
    _same(collect_tables(b), serial)


def test_without_ray_the_cli_says_how_to_install(monkeypatch, tmp_path, capsys):
    import builtins

    from locedit.cli import main

    real = builtins.__import__

    def no_ray(name, *args, **kw):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *args, **kw)

    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nsample = 1\n')
    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["run", str(cfg), "--executor", "ray", "--run-dir", str(tmp_path / "r")]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err
