"""The batch study: resumable after kill -9 (and after its journals were packed) with exactly the rows of an
uninterrupted run; bad units are logged."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from locedit.config import ConfigError, parse_config
from locedit.journal import Journal, read_journal
from locedit.rundir import RunDir, collect_tables
from locedit.study import run_study

RAW = {
    "study": {"name": "resume-test", "model": "smollm2-135m"},
    "data": {"dataset": "counterfact", "filter": "none", "sample": 3, "seed": 1},
    "localization": {"kinds": ["mlp"], "windows": [3], "samples": 2},
    "editing": {"problems": ["error_injection", "fact_erasure"], "methods": ["ft-1"], "layers": [4, 12],
                "essence": False},
    "hparams": {"ft-1": {"num_steps": 3}},
}
TOML = """
[study]
name = "resume-test"
model = "smollm2-135m"
[data]
dataset = "counterfact"
filter = "none"
sample = 3
seed = 1
[localization]
kinds = ["mlp"]
windows = [3]
samples = 2
[editing]
problems = ["error_injection", "fact_erasure"]
methods = ["ft-1"]
layers = [4, 12]
essence = false
[hparams.ft-1]
num_steps = 3
"""
TIMING = ("seconds", "key")


def _comparable(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    drop = [c for c in df.columns if c in TIMING or c.endswith("seconds")]
    return df.drop(drop).sort(keys)


def test_journal_repairs_torn_tail(tmp_path):
    j = Journal(tmp_path / "t.jsonl")
    j.append({"key": "a", "x": 1})
    j.append({"key": "b", "x": 2})
    with open(tmp_path / "t.jsonl", "a") as f:
        f.write('{"key": "c", "x"')  # a writer killed mid-line
    assert [r["key"] for r in read_journal(tmp_path / "t.jsonl")] == ["a", "b"]
    j2 = Journal(tmp_path / "t.jsonl")
    assert j2.keys == {"a", "b"}
    j2.append({"key": "c", "x": 3})
    j2.append({"key": "a", "x": 99})  # duplicate key: ignored
    assert [r["x"] for r in read_journal(tmp_path / "t.jsonl")] == [1, 2, 3]


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown problem 'fact_teleport'"):
        parse_config({**RAW, "editing": {**RAW["editing"], "problems": ["fact_teleport"]}})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config({**RAW, "localization": {"kindz": ["mlp"]}})


def test_kill_and_resume_equals_uninterrupted(model, tmp_path):
    config = parse_config(RAW)
    full = tmp_path / "full"
    summary = run_study(config, full, model=model, progress=False)
    assert summary.failed == 0 and summary.done == 3 * (1 + 2 * 2)
    ref = collect_tables(full)

    # a separate process, killed with SIGKILL once a few units are durably written
    cfg_path = tmp_path / "study.toml"
    cfg_path.write_text(TOML)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "locedit.cli", "run", str(cfg_path), "--run-dir", str(killed), "--no-report"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )

    def written():
        return sum(1 for p in (killed / "journal").glob("*.jsonl") for _ in read_journal(p)) if (
            killed / "journal").exists() else 0

    deadline = time.time() + 240
    while written() < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = written()
    assert 4 <= n_before < summary.done

    # ship it half-done: journals gzip-compressed (plain files removed, no process holds the lock); it resumes as is
    packed = RunDir(killed).pack()
    assert packed and all(removed for _, removed in packed)
    assert not list((killed / "journal").glob("*.jsonl"))

    resumed = run_study(config, killed, model=model, progress=False)
    assert resumed.skipped >= n_before and resumed.done + resumed.skipped == summary.done
    got = collect_tables(killed)
    for name, keys in (("tracing", ["fact_id", "kind", "window", "token_index", "layer"]),
                       ("edits", ["fact_id", "problem", "method", "layer"])):
        a, b = _comparable(ref[name], keys), _comparable(got[name], keys)
        assert a.height == b.height and a.columns == b.columns
        assert b.select(keys).is_duplicated().sum() == 0
        for col in a.columns:
            if a[col].dtype.is_float():
                assert (a[col].is_nan() == b[col].is_nan()).all(), col
                diff = (a[col] - b[col]).abs().fill_nan(0.0).max()
                assert diff is None or diff <= 1e-5, col
            else:
                assert a[col].to_list() == b[col].to_list(), col
    assert pl.read_parquet(killed / "edits.parquet").height == ref["edits"].height


def test_failing_unit_is_logged_and_skipped(model, tmp_path, monkeypatch):
    import locedit.study as study

    raw = {**RAW, "data": {**RAW["data"], "sample": 2}, "localization": {**RAW["localization"], "windows": [1]},
           "editing": {**RAW["editing"], "problems": ["error_injection"], "layers": [4]}}
    config = parse_config(raw)
    real = study._edit_record
    victim = {}

    def flaky(model, fact, *spec):
        victim.setdefault("id", fact.id)
        if fact.id == victim["id"]:
            raise RuntimeError(f"synthetic failure on {fact.id}")
        return real(model, fact, *spec)

    monkeypatch.setattr(study, "_edit_record", flaky)
    run_dir = tmp_path / "run"
    summary = run_study(config, run_dir, model=model, progress=False)
    assert summary.failed == 1 and summary.done == 3
    tables = collect_tables(run_dir)
    assert tables["failures"].height == 1
    assert tables["failures"]["error"][0] == f"synthetic failure on {victim['id']}"
    assert tables["edits"].height == 1 and tables["edits"]["fact_id"][0] != victim["id"]
    assert "synthetic failure" in (run_dir / "study.log").read_text()
    # a plain resume does not retry; --retry-failed does, and then the row appears
    assert run_study(config, run_dir, model=model, progress=False).done == 0
    monkeypatch.setattr(study, "_edit_record", real)
    again = run_study(config, run_dir, model=model, progress=False, retry_failed=True)
    assert again.done == 1 and collect_tables(run_dir)["edits"].height == 2


def test_cli_user_errors_are_one_line_with_exit_2(tmp_path, capsys):
    """Every user error of the command line prints one line (no traceback) and exits 2; --debug re-raises."""
    from locedit.cli import main

    cases = [
        (["report", str(tmp_path / "missing")], "no run directory"),
        (["summary", str(tmp_path)], "not a locedit run directory"),
        (["trace", "--prompt", "p", "--subject", "s", "--target", "t", "--noise", "nan"], "finite and > 0"),
        (["trace", "--prompt", "p", "--subject", "s"], "give --fact ID"),
        (["trace", "--prompt", "The cat", "--subject", "cat", "--target", ""], "--target is empty"),
        (["trace", "--prompt", "The cat", "--subject", "dog", "--target", " x"], "does not occur"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("locedit: error:") and message in err[0], err
    (tmp_path / "empty" / "journal").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished units" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[editing]\nmethods = ["mend"]\n')
    assert main(["run", str(bad)]) == 2
    assert "unknown edit method 'mend'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "report", str(tmp_path / "missing")])
