"""Reliability (issue "no silent wrong numbers"): corrupted caches are detected and rebuilt, configs are validated
before anything is written, journals quarantine bad lines, shards are locked, runs record their provenance.
Each test failed on the code before this change."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from locedit.config import ConfigError, parse_config
from locedit.journal import Journal, read_journal

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- caches
def _garble_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(data))


def test_checked_cache_entries_detect_corruption(tmp_path, caplog):
    from locedit.tracer.atomic import read_checked_json, read_checked_tensor, write_checked_json, write_checked_tensor

    write_checked_tensor(tmp_path / "c.pt", torch.arange(1000.0))
    assert torch.equal(read_checked_tensor(tmp_path / "c.pt"), torch.arange(1000.0))
    _garble_middle(tmp_path / "c.pt")  # same size, different content
    with caplog.at_level("WARNING"):
        assert read_checked_tensor(tmp_path / "c.pt") is None
    assert "c.pt" in caplog.text and not (tmp_path / "c.pt").exists()
    write_checked_json(tmp_path / "t.json", {"a": 1})
    (tmp_path / "t.json").write_text('{"a": 1')  # truncated
    assert read_checked_json(tmp_path / "t.json") is None
    (tmp_path / "u.json").write_text('{"a": 1}')  # no checksum: never trusted
    assert read_checked_json(tmp_path / "u.json") is None
    assert read_checked_json(tmp_path / "missing.json") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # corrupt entries removed, no temporaries


def test_garbled_covariance_is_recomputed(model, tmp_path, monkeypatch):
    """A garbled covariance file once changed the ROME delta (norm 22.1 vs 15.4) silently."""
    from locedit.editors import key_second_moment

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    c0 = key_second_moment(model, 3, n_tokens=1024, progress=False)
    (entry,) = [p for p in (tmp_path / "stats").rglob("*.pt")]
    _garble_middle(entry)
    c1 = key_second_moment(model, 3, n_tokens=1024, progress=False)
    assert torch.equal(c0, c1)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    assert torch.equal(key_second_moment(model, 3, n_tokens=1024, progress=False), c0)


def test_garbled_or_incomplete_model_cache_is_reconverted(model, tmp_path, monkeypatch):
    """A converted-weights file garbled in the middle loaded without complaint and changed the logits; a missing
    meta.json reconverted and left a 650 MB temporary folder behind."""
    from locedit.tracer import cache_dir, load_model
    from locedit.tracer.models import converted_cache_path as _smollm2_cache_path

    src = _smollm2_cache_path()
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    dst = _smollm2_cache_path()
    dst.parent.mkdir(parents=True)
    shutil.copytree(src, dst)
    _garble_middle(dst / "state_dict.pt")
    tokens = model.to_tokens("The mother tongue of Danielle Darrieux is")
    with torch.no_grad():
        reference = model(tokens)
        fresh = load_model(device="cpu")
        torch.testing.assert_close(fresh(tokens), reference)
    (dst / "meta.json").unlink()
    with torch.no_grad():
        torch.testing.assert_close(load_model(device="cpu")(tokens), reference)
    assert sorted(p.name for p in (cache_dir() / "models").iterdir()) == [dst.name]  # no temporary left


# ------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("section,values,message", [
    ("editing", {"layers": "5, 15"}, "valid tuple"),
    ("localization", {"kinds": "mlp"}, "valid tuple"),
    ("editing", {"layers": [5.5]}, "valid integer"),
    ("editing", {"layers": [-1]}, "greater than or equal to 0"),
    ("localization", {"samples": 0}, "greater than 0"),
    ("localization", {"samples": "3"}, "valid integer"),
    ("editing", {"layers": []}, "at least 1 item"),
    ("data", {"sample": -2}, "greater than 0"),
    ("editing", {"essence": "no"}, "valid boolean"),
    ("editing", {"layers": 5}, "valid tuple"),
    ("localization", {"noise": float("nan")}, "finite and > 0"),
])
def test_config_values_are_type_and_range_checked(section, values, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({section: values})


def test_config_errors_are_listed_together_and_hparams_are_typed():
    with pytest.raises(ConfigError) as e:
        parse_config({"localization": {"samples": 0, "windows": [0]}, "editing": {"essence": "no"},
                      "hparams": {"rome": {"v_lr": "0.5", "bogus": 1}}})
    text = str(e.value)
    for part in ("localization.samples", "localization.windows", "editing.essence", "v_lr = '0.5' must be a float",
                 "unknown key 'bogus'"):
        assert part in text, part


def test_out_of_range_layers_fail_before_the_run_directory_is_written(model, tmp_path):
    from locedit.study import run_study

    config = parse_config({"editing": {"layers": [3, 30]}, "data": {"sample": 1}})
    with pytest.raises(ConfigError, match=r"layers \[30\] are out of range"):
        run_study(config, tmp_path / "run", model=model, progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- journals
def test_a_bad_line_in_the_middle_is_quarantined_and_later_records_kept(tmp_path):
    """A bad middle line used to hide every later record, and a resume truncated the file there."""
    path = tmp_path / "journal" / "edits.shard-0-of-1.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({"key": k, "x": i}) for i, k in enumerate("abcde")]
    lines[1] = '{"key": "b", "x": GARBLED'
    path.write_text("\n".join(lines) + "\n")
    assert [r["key"] for r in read_journal(path)] == ["a", "c", "d", "e"]
    from locedit.rundir import RunDir

    assert RunDir(tmp_path).bad_lines() == [(str(path), 2)]
    j = Journal(path)  # a resume
    assert j.quarantined == 1 and j.keys == {"a", "c", "d", "e"}
    quarantine = [json.loads(x) for x in (path.parent / "quarantine.jsonl").read_text().splitlines()]
    assert quarantine == [{"journal": path.name, "line": 2, "text": lines[1]}]
    assert [r["key"] for r in read_journal(path)] == ["a", "c", "d", "e"]


def test_report_on_a_journal_with_a_bad_line_says_so(tmp_path, capsys):
    from locedit.cli import main

    run = tmp_path / "run"
    (run / "journal").mkdir(parents=True)
    (run / "journal" / "edits.shard-0-of-1.jsonl").write_text('{"key": "a", "problem": "x"}\nnot json\n')
    main(["summary", str(run)])
    assert "skipped 1 bad journal line(s)" in capsys.readouterr().err


def test_a_second_process_on_the_same_shard_is_refused(model, tmp_path):
    from filelock import FileLock

    from locedit.rundir import StudyLockedError
    from locedit.study import run_study

    run = tmp_path / "run"
    run.mkdir()
    with FileLock(str(run / ".lock.shard-0-of-1")):  # another process holds the shard
        with pytest.raises(StudyLockedError, match="another process is running shard 0/1"):
            run_study(parse_config({"data": {"sample": 1}}), run, model=model, progress=False)


def test_provenance_is_recorded_and_a_thread_change_warns(model, tmp_path):
    from locedit.plan import resolve_plan
    from locedit.rundir import RunDir
    from locedit.study import provenance

    config = parse_config({})
    rd = RunDir(tmp_path)
    rd.fix_plan(lambda: resolve_plan(config, model, ["cf:1"]), provenance(model))
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["threads"] == torch.get_num_threads() and prov["device"] == "cpu"
    from locedit.problems import problem_hparams

    want = problem_hparams("error_injection", "rome", model).kl_factor  # resolved once, with the tuned table
    assert prov["plan"]["hparams"]["error_injection|rome"]["kl_factor"] == want and prov["versions"]["torch"]
    assert prov["plan"]["noise"]["sigma"] == pytest.approx(0.350, abs=5e-4)
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        with pytest.warns(UserWarning, match="threads"):
            rd.fix_plan(lambda: resolve_plan(config, model, ["cf:1"]), provenance(model))
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------- the CLI
def test_run_exits_nonzero_when_units_failed(model, tmp_path, monkeypatch, capsys):
    import locedit.study as study
    from locedit import tracer
    from locedit.cli import main

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: model)  # the run reuses the session's model
    monkeypatch.setattr(study, "_edit_record", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nfilter = "none"\nsample = 1\n[localization]\nkinds = ["resid"]\nsamples = 1\n'
                   '[editing]\nmethods = ["ft-1"]\nlayers = [3]\nessence = false\n')
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "1 unit(s) failed" in err and "study.log" in err and "--retry-failed" in err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import locedit.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_summary", interrupted)
    assert cli.main(["summary", "x"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """config.json/facts.json were written through one fixed temporary name, which concurrent starts raced on."""
    from concurrent.futures import ThreadPoolExecutor

    from locedit.tracer.atomic import write_atomic

    texts = [json.dumps({"writer": i, "pad": "x" * 100_000}) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: write_atomic(tmp_path / "config.json", t), texts * 4))
    assert (tmp_path / "config.json").read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_threads_option_sets_torch_threads_and_refuses_zero(capsys):
    from locedit.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "info"]) == 0
        assert "threads: 1" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
    assert main(["--threads", "0", "info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads must be >= 1" in err[0]
