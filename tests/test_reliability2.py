"""Reliability II (issue 28): one test per probe, each with the probe's own input. Fast tier: tiny random models and
copies of the shipped studies; no real model."""

import errno
import gzip
import json
import multiprocessing
import os
import signal
import shutil
import time
from pathlib import Path

import pytest
import torch

from locedit.cli import main
from locedit.config import ConfigError, parse_config
from locedit.editors import EditOrderError, EditRequest, UnsupportedDtypeError, apply, default_hparams, edit, restore
from locedit.journal import Journal, SymlinkWriteError, read_journals
from locedit.rundir import InputsChangedError, RunDir, collect_tables

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
REQ = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
EYE = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama(name="tiny-rel-llama")


def _hp(model, method, **kw):
    hp = default_hparams(method, model)
    return type(hp)(**{**hp.__dict__, **({"v_num_grad_steps": 3, "context_lengths": ()} if method != "ft-1"
                                         else {"num_steps": 3}), **kw})


def _copy(name: str, dst: Path) -> Path:
    shutil.copytree(STUDIES / name, dst, ignore=shutil.ignore_patterns(".lock.*"))
    return dst


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# 1 ------------------------------------------------------------------------------------------ cache keys by content
def test_two_checkpoints_with_one_name_do_not_share_cache_entries(tokenizer, tmp_path, monkeypatch):
    """runA/checkpoint-500 and runB/checkpoint-500 (same config, other weights) once shared key statistics."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from locedit.editors import key_second_moment
    from locedit.tracer import load_model
    from locedit.tracer.models import model_id

    paths = []
    for run, seed in (("runA", 0), ("runB", 1)):
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=128,
                                        n_ctx=128))
        path = tmp_path / run / "checkpoint-500"
        hf.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    a, b = (load_model(str(p), device="cpu") for p in paths)
    assert a.cfg.model_name == b.cfg.model_name == "checkpoint-500" and model_id(a) != model_id(b)
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "alone"))
    b_alone = key_second_moment(b, 1, n_tokens=256, seq_len=128, progress=False)
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "shared"))
    key_second_moment(a, 1, n_tokens=256, seq_len=128, progress=False)
    b_shared = key_second_moment(b, 1, n_tokens=256, seq_len=128, progress=False)
    assert torch.equal(b_shared, b_alone)
    assert model_id(a) == model_id(load_model(str(paths[0]), device="cpu"))  # stable for the same weights


# 2 ------------------------------------------------------------------------------------------ concurrent pack
def _half_packed(src: Path, dst: Path) -> int:
    """A copy of ``src`` whose edits journal is split: the first half compressed, the rest a plain journal."""
    _copy(src.name, dst)
    gz = dst / "journal" / "edits.shard-0-of-1.jsonl.gz"
    lines = gzip.decompress(gz.read_bytes()).decode().splitlines(keepends=True)
    half = len(lines) // 2
    with gzip.GzipFile(gz, "wb", mtime=0) as f:
        f.write("".join(lines[:half]).encode())
    (dst / "journal" / "edits.shard-0-of-1.jsonl").write_text("".join(lines[half:]))
    return len(lines)


def _pack(path: str, delay: float) -> None:
    time.sleep(delay)
    RunDir(path).pack()


def test_concurrent_packs_lose_nothing(tmp_path):
    """Two `locedit pack` at once lost 60 of 300 records; here 20 rounds of two packs 0-0.3 s apart."""
    ctx = multiprocessing.get_context("fork")
    for i in range(20):
        run = tmp_path / f"r{i}"
        n = _half_packed(STUDIES / "reber", run)
        procs = [ctx.Process(target=_pack, args=(str(run), d)) for d in (0.0, 0.015 * i)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs), i
        assert len(read_journals(RunDir(run).journals("edits"))) == n, i
        assert not (run / "journal" / "edits.shard-0-of-1.jsonl").exists()


# 3 ------------------------------------------------------------------------------------------ damaged .jsonl.gz
def test_a_truncated_compressed_journal_keeps_its_intact_records_and_resumes(tmp_path, capsys):
    run = _copy("reference-v1", tmp_path / "ref")
    gz = run / "journal" / "edits.shard-0-of-1.jsonl.gz"
    whole = len(gzip.decompress(gz.read_bytes()).splitlines())
    gz.write_bytes(gz.read_bytes()[:-200])  # the probe: 200 bytes off the end
    edits = collect_tables(run)["edits"]
    assert whole - 5 <= edits.height < whole  # every intact record before the damage
    assert main(["summary", str(run)]) == 0
    assert "skipped 1 bad journal line" in capsys.readouterr().err
    assert RunDir(run).repair() == 1  # what a resume does before it appends
    assert (run / "journal" / "edits.shard-0-of-1.jsonl.gz.damaged").exists()
    assert collect_tables(run)["edits"].height == edits.height and RunDir(run).bad_lines() == []
    quarantine = [json.loads(x) for x in (run / "journal" / "quarantine.jsonl").read_text().splitlines()]
    assert quarantine[-1]["journal"] == gz.name and "damaged" in quarantine[-1]["text"]


# 4 ------------------------------------------------------------------------------------------ atomic writes
def test_a_full_disk_never_truncates_a_document(tmp_path, monkeypatch):
    """`locedit findings` truncated docs/FINDINGS.md mid-table on a full disk."""
    from locedit.findings import write_findings

    doc = tmp_path / "FINDINGS.md"
    doc.write_text((ROOT / "docs" / "FINDINGS-v1.md").read_text().replace("| ", "|  ", 3))  # out of date
    before = doc.read_bytes()
    real = Path.write_text

    def full_disk(self, data, *a, **k):
        real(self, data[: len(data) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_findings(STUDIES / "reference-v1", doc, n_boot=20)
    monkeypatch.undo()
    assert doc.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["FINDINGS.md"]  # no temporary left


# 5 ------------------------------------------------------------------------------------------ inputs changed
def _custom_dataset(path: Path, o_true: str = "French") -> Path:
    records = json.loads(gzip.decompress((ROOT / "problems" / "data" / "counterfact.json.gz").read_bytes()))[:2]
    records[0]["requested_rewrite"]["target_true"]["str"] = o_true
    path.write_text(json.dumps(records))
    return path


def test_a_resume_refuses_inputs_changed_since_the_start(tiny, tmp_path, monkeypatch):
    from locedit.study import run_study

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    data = _custom_dataset(tmp_path / "facts.json")
    config = parse_config({"data": {"dataset": str(data), "filter": "none", "sample": 2},
                           "localization": {"kinds": []},
                           "editing": {"methods": ["ft-1"], "layers": [1], "essence": False},
                           "hparams": {"ft-1": {"num_steps": 1}}})
    run = tmp_path / "run"
    assert run_study(config, run, model=tiny, progress=False, limit=1).done == 1
    _custom_dataset(data, o_true="German")  # the dataset file edited between a kill and the resume
    with pytest.raises(InputsChangedError, match=r"1 fact\(s\) changed content \(cf:0\)"):
        run_study(config, run, model=tiny, progress=False)


# 6 ------------------------------------------------------------------------------------------ summary A B
def test_summary_of_two_different_studies_is_refused(tmp_path, capsys):
    a, b = _copy("reber", tmp_path / "a"), _copy("tokens", tmp_path / "b")
    for argv in (["summary", str(a), str(b)], ["summary", str(b), str(a)], ["report", str(a), str(b)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not companions" in err[0] and "localization.noise_scale_rule" in err[0]
    c = _copy("reber", tmp_path / "c")  # two copies of one study are fine
    assert main(["summary", str(a), str(c)]) == 0


def test_companion_studies_are_read_as_one_design_and_conflicting_ones_refused(tiny, tmp_path, monkeypatch):
    from locedit.findings import _stages, _thread_label
    from locedit.rundir import IncompatibleRunDirsError, companion_conflicts
    from locedit.study import run_study

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    data = _custom_dataset(tmp_path / "facts.json")

    def run(name, problems, steps=1):
        config = parse_config({"study": {"name": name}, "data": {"dataset": str(data), "filter": "none", "sample": 2},
                               "localization": {"kinds": []},
                               "editing": {"problems": problems, "methods": ["ft-1"], "layers": [1], "essence": False},
                               "hparams": {"ft-1": {"num_steps": steps}}})
        assert run_study(config, tmp_path / name, model=tiny, progress=False).done == 2 * len(problems)
        return RunDir(tmp_path / name)

    main_run = run("main", ["error_injection"])
    other = run("other", ["error_injection", "fact_forcing"])  # the same EI edits, plus FF: a companion
    clash = run("clash", ["fact_forcing"], steps=2)  # FF with other hyper-parameters than `other`'s
    assert companion_conflicts(main_run, other) == [] and companion_conflicts(main_run, clash) == []
    assert companion_conflicts(other, clash) == ["plan.hparams[fact_forcing|ft-1]"]
    merged = collect_tables(main_run, other)["edits"]
    alone = [collect_tables(d)["edits"] for d in (main_run, other)]
    # the union of the units, one row per key (the shared EI keys once, from the first run given)
    assert sorted(merged["key"].to_list()) == sorted(set(alone[0]["key"].to_list()) | set(alone[1]["key"].to_list()))
    assert merged.height == 4
    assert main(["report", str(main_run.path), str(other.path), "--out", str(tmp_path / "r.html")]) == 0
    assert "the pre-registered analysis is main" in (tmp_path / "r.html").read_text()
    with pytest.raises(IncompatibleRunDirsError, match=r"not companions.*hparams\[fact_forcing\|ft-1\]"):
        collect_tables(other, clash)
    # each study's stages keep their names, prefixed by the study
    st = _stages(main_run, other)
    assert dict(zip(st["stage"], st["total"], strict=True)) == {"main: edits: ft-1": 2, "other: edits: ft-1": 4}
    assert _thread_label(st).isdigit()


# 7 ------------------------------------------------------------------------------------------ symlinks
def test_writes_never_follow_a_symlink(tmp_path):
    outside = tmp_path / "bashrc"
    outside.write_text("export PATH=/usr/bin\n")
    journal = tmp_path / "run" / "journal"
    journal.mkdir(parents=True)
    (journal / "edits.shard-0-of-1.jsonl").write_text('{"key": "a"}\n{"key": garbled\n')
    (journal / "quarantine.jsonl").symlink_to(outside)
    with pytest.raises(SymlinkWriteError, match="symbolic link"):
        Journal(journal / "edits.shard-0-of-1.jsonl")
    target = tmp_path / "elsewhere.jsonl"
    (journal / "tracing.shard-0-of-1.jsonl").symlink_to(target)
    with pytest.raises(SymlinkWriteError):
        Journal(journal / "tracing.shard-0-of-1.jsonl").append({"key": "x"})
    (tmp_path / "run" / "study.log").symlink_to(outside)
    with pytest.raises(SymlinkWriteError):
        RunDir(tmp_path / "run").setup_log()
    assert outside.read_text() == "export PATH=/usr/bin\n" and not target.exists()


# 8 ------------------------------------------------------------------------------------------ hyper-parameter ranges
@pytest.mark.parametrize("method,values,message", [
    ("ft-1", {"num_steps": -5}, "num_steps = -5 must be an int >= 1"),
    ("ft-1", {"norm_constraint": -1e-4}, "norm_constraint = -0.0001 must be > 0"),
    ("rome", {"v_num_grad_steps": -1}, "v_num_grad_steps = -1"),
    ("rome", {"v_lr": 0.0}, "v_lr = 0.0 must be > 0"),
    ("memit", {"mom2_update_weight": -1.0}, "mom2_update_weight"),
])
def test_out_of_range_hyper_parameters_are_refused(method, values, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"hparams": {method: values}})
    hp = default_hparams(method)
    with pytest.raises(ValueError, match=message):
        type(hp)(**{**hp.__dict__, **values})


# 9 ------------------------------------------------------------------------------------------ edit() exit order
def test_nested_edits_exited_outer_first_raise_and_leave_the_inner_edit(tiny):
    original = _weights(tiny)
    outer = edit(tiny, REQ, "rome", [1], hparams=_hp(tiny, "rome"), covariance=EYE)
    r1 = outer.__enter__()
    after_outer = _weights(tiny)
    inner = edit(tiny, EditRequest("The mother tongue of {} is", "Danielle Darrieux", " German"), "rome", [1],
                 hparams=_hp(tiny, "rome"), covariance=EYE)
    inner.__enter__()
    after_inner = _weights(tiny)
    with pytest.raises(EditOrderError, match="last-in-first-out"):
        outer.__exit__(None, None, None)
    assert all(torch.equal(p, after_inner[n]) for n, p in tiny.named_parameters())  # as the inner edit expects
    inner.__exit__(None, None, None)
    assert all(torch.equal(p, after_outer[n]) for n, p in tiny.named_parameters())
    restore(tiny, r1)
    assert all(torch.equal(p, original[n]) for n, p in tiny.named_parameters())


# 10 ----------------------------------------------------------------------------------------- dtype, grad mode
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["rome", "ft-1"])
def test_half_precision_models_fail_before_any_work(tiny_llama, dtype, method):
    model = tiny_llama(dtype=dtype)
    before = _weights(model)
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedDtypeError, match="float32"):
        apply(model, REQ, method, [1], hparams=_hp(model, method), covariance=EYE)
    assert time.perf_counter() - t0 < 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["rome", "ft-1"])
def test_editing_inside_no_grad_works(tiny, method):
    before = _weights(tiny)
    with torch.no_grad():
        res = apply(tiny, REQ, method, [1], hparams=_hp(tiny, method), covariance=EYE)
    assert any(float(d.abs().max()) > 0 for d in res.deltas.values())
    restore(tiny, res)
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())


# 11 ----------------------------------------------------------------------------------------- reading never writes
def test_reading_a_run_directory_never_writes_to_it(tmp_path):
    run = _copy("reber", tmp_path / "reber")

    def state():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}

    before = state()
    assert main(["summary", str(run)]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere" / "r.html")]) == 0
    main(["findings", str(run), "--check"])  # out of date with docs/FINDINGS.md (that is the reference study's)
    assert state() == before


# 12 ----------------------------------------------------------------------------------------- the lesser items
@pytest.mark.parametrize("section,values", [("editing", {"layers": [5, 5]}), ("localization", {"windows": [5, 5]}),
                                            ("localization", {"kinds": ["mlp", "mlp"]}),
                                            ("editing", {"problems": ["error_injection"] * 2}),
                                            ("editing", {"methods": ["rome", "rome"]})])
def test_duplicate_entries_are_config_errors(section, values):
    with pytest.raises(ConfigError, match="duplicate"):
        parse_config({section: values})


def _started(tmp_path, tiny):
    from locedit.study import run_study

    config = parse_config({"data": {"filter": "none", "sample": 1}, "localization": {"kinds": []},
                           "editing": {"methods": ["ft-1"], "layers": [1], "essence": False},
                           "hparams": {"ft-1": {"num_steps": 1}}})
    run = tmp_path / "run"
    run_study(config, run, model=tiny, progress=False)
    return config, run


def test_bad_run_files_are_one_clear_error(tiny, tmp_path, monkeypatch, capsys):
    from locedit import tracer
    from locedit.study import run_study

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    config, run = _started(tmp_path, tiny)
    (run / "facts.json").write_text('["cf:0", ')
    with pytest.raises(ValueError, match="facts.json is unreadable"):
        run_study(config, run, model=tiny, progress=False)
    (run / "facts.json").write_text('["cf:no-such-fact"]')
    with pytest.raises(ValueError, match="facts.json names 1 fact.*cf:no-such-fact"):
        run_study(config, run, model=tiny, progress=False)
    (run / "config.json").write_text('{"schema_version": 2, "study": ')
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nfilter = "none"\nsample = 1\n[localization]\nkinds = []\n[editing]\nmethods = ["ft-1"]\n'
                   'layers = [1]\nessence = false\n[hparams.ft-1]\nnum_steps = 1\n')
    assert main(["run", str(cfg), "--run-dir", str(run), "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is unreadable" in err[0]
    for limit in ("-1", "0"):
        with pytest.raises(SystemExit) as e:
            main(["run", str(cfg), "--limit", limit])
        assert e.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_a_full_disk_is_one_line(monkeypatch, capsys):
    import locedit.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/edits.parquet")

    monkeypatch.setattr(cli, "cmd_summary", full)
    assert cli.main(["summary", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]


def test_a_stray_file_in_journal_is_left_alone_by_pack(tmp_path, caplog):
    run = _copy("reber", tmp_path / "reber")
    backup = run / "journal" / "edits.backup.jsonl"
    backup.write_text("not a journal\n")
    RunDir(run).pack()
    assert backup.read_text() == "not a journal\n" and "edits.backup.jsonl" in caplog.text
    assert collect_tables(run)["edits"].height == 120


def test_prompts_longer_than_the_context_and_bad_templates_are_typed_errors(tiny_llama):
    from locedit.tracer import trace
    from locedit.tracer.tokens import PromptTooLongError

    short = tiny_llama(n_ctx=8)
    with pytest.raises(PromptTooLongError, match="more than the model's context of 8"):
        trace(short, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French", samples=1)
    with pytest.raises(ValueError, match="exactly one"):
        EditRequest("{} met {} in", "Danielle Darrieux", " Paris")
    with pytest.raises(ValueError, match="brace"):
        EditRequest("The set {x} of {} is", "Danielle Darrieux", " Paris")


def test_a_target_without_its_leading_space_warns(tiny):
    from locedit.tracer import trace
    from locedit.tracer.tokens import UnspacedTargetWarning

    with pytest.warns(UnspacedTargetWarning, match="no leading space"):
        trace(tiny, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French", samples=1)
    with pytest.warns(UnspacedTargetWarning, match="give ' English'"):
        restore(tiny, apply(tiny, EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"), "rome",
                            [1], hparams=_hp(tiny, "rome"), covariance=EYE))


# 7 ------------------------------------------------------------------------------------------ stop on a signal
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_after_the_current_fact_and_the_resume_equals_an_uninterrupted_run(
        tiny, tmp_path, monkeypatch, signum):
    """`kill PID` (SIGTERM) or SIGINT -- which a `nohup ... &` job ignores unless handled -- during a fact's first unit:
    its remaining units finish, the run returns with the signal recorded, and a resume writes exactly the rows of
    a run nobody stopped. A second signal stops at once."""
    import locedit.study as study

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    data = _custom_dataset(tmp_path / "facts.json")
    config = parse_config({"data": {"dataset": str(data), "filter": "none", "sample": 2},
                           "localization": {"kinds": []},
                           "editing": {"problems": ["error_injection", "fact_forcing"], "methods": ["ft-1"],
                                       "layers": [0, 1], "essence": False},
                           "hparams": {"ft-1": {"num_steps": 1}}})
    whole = study.run_study(config, tmp_path / "whole", model=tiny, progress=False)
    assert (whole.done, whole.stopped) == (8, None)

    real, calls = study.run_unit, []

    def signalling(*args, **kw):
        calls.append(args[2].fact_id)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)  # the handler only records it: this unit and the fact's others finish
        return real(*args, **kw)

    monkeypatch.setattr(study, "run_unit", signalling)
    previous = signal.getsignal(signum)
    first = study.run_study(config, tmp_path / "stopped", model=tiny, progress=False)
    assert signal.getsignal(signum) == previous  # handlers restored
    assert (first.done, first.stopped) == (4, signum)  # the first fact's 4 units, not the second fact's
    assert set(calls) == {calls[0]}
    monkeypatch.setattr(study, "run_unit", real)
    from locedit.progress import study_progress

    half = study_progress(tmp_path / "stopped")  # from the run directory alone: one stage (ft-1), half done
    assert half.stages.select("stage", "total", "done", "failed").rows() == [("edits: ft-1", 8, 4, 0)]
    assert half.stages["hours_spent"][0] == pytest.approx(4 * half.stages["seconds_mean"][0] / 3600)
    assert half.stages["seconds_mean"][0] > 0 and half.stages["hours_left"][0] == pytest.approx(
        4 * half.stages["seconds_mean"][0] / 3600)
    assert "4 / 8 units (50.0 %)" in half.text() and "1 on cpu" in half.text() and "spent: 0.0 h" in half.text()
    rest = study.run_study(config, tmp_path / "stopped", model=tiny, progress=False)
    assert (rest.done, rest.skipped, rest.stopped) == (4, 4, None)
    a = collect_tables(tmp_path / "whole")["edits"].drop("seconds", "edit_seconds").sort("key")
    b = collect_tables(tmp_path / "stopped")["edits"].drop("seconds", "edit_seconds").sort("key")
    assert a.equals(b)
    # sittings.jsonl says which units each sitting ran, with its threads and device: the stopped one the first fact's
    # 4 (plan order: its first to its last unit), the resume the other 4
    import torch

    units = study.resolve_plan(config, tiny, RunDir(tmp_path / "stopped").fact_ids()).units()
    s1, s2 = RunDir(tmp_path / "stopped").sittings()
    assert (s1["done_before"], s1["units_run"], s1["stopped"], s1["first_unit"], s1["last_unit"]) == (
        0, 4, signal.Signals(signum).name, units[0].key(), units[3].key())
    assert (s2["done_before"], s2["units_run"], s2["stopped"], s2["first_unit"], s2["last_unit"]) == (
        4, 4, None, units[4].key(), units[7].key())
    assert {s["threads"] for s in (s1, s2)} == {torch.get_num_threads()} and s1["device"] == "cpu"
    assert s1["executor"] == "serial" and s1["units"] == 8 and s1["ended"] >= s1["started"]
    from locedit.progress import sittings_line

    assert sittings_line([s1, s2]) == f"2 (2 on cpu × {torch.get_num_threads()} thread(s): 8 units)"
    assert sittings_line([]) == "none recorded"
    # each unit's threads come from the sitting it ran in: as if the resume had run on 7 threads
    from locedit.progress import unit_threads

    path = RunDir(tmp_path / "stopped").sittings_path
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "threads": 7} if r["sitting"] == s2["sitting"] and "threads" in r
                                       else r) + "\n" for r in lines))
    ran = unit_threads(RunDir(tmp_path / "stopped"), units)
    assert [ran[u.key()] for u in units] == [torch.get_num_threads()] * 4 + [7] * 4
    secs = {r["key"]: r["seconds"] for r in RunDir(tmp_path / "stopped").records("edits")}
    assert study_progress(tmp_path / "stopped").stages["cpu_hours_spent"][0] == pytest.approx(
        sum(secs[u.key()] * ran[u.key()] for u in units) / 3600)

    def twice(*args, **kw):  # a second signal: KeyboardInterrupt now, the finished units kept
        os.kill(os.getpid(), signum)
        return real(*args, **kw)

    monkeypatch.setattr(study, "run_unit", twice)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(config, tmp_path / "again", model=tiny, progress=False)
    assert signal.getsignal(signum) == previous
    assert len(RunDir(tmp_path / "again").finished_keys()) == 1
    (killed,) = RunDir(tmp_path / "again").sittings()  # stopped at once: a "start" line, no "end"
    assert killed["done_before"] == 0 and "ended" not in killed
    assert sittings_line([s1, killed]) == (
        f"2 (2 on cpu × {torch.get_num_threads()} thread(s): 4 units; 1 with no end record (stopped at once or cut "
        "off): their units are journalled but not counted here)")
