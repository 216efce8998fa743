"""Unit order (``[study] order``), the token-rule limits (``token_methods``, ``token_facts``) and compressed journals:
pure bookkeeping, no model."""

import gzip
import json

import polars as pl
import pytest

from locedit.config import ConfigError, parse_config
from locedit.journal import Journal, compress_journal, read_journal, read_journals
from locedit.plan import EditUnit, TraceUnit, method_tokens, plan_units
from locedit.rundir import RunDir, collect_tables

FACTS = [f"cf:{i}" for i in range(5)]


def _config(order="fact", **editing):
    return parse_config({
        "study": {"order": order},
        "localization": {"methods": ["noise", "flip"]},
        "editing": {"problems": ["error_injection", "fact_forcing"], "methods": ["rome", "ft-1"], "layers": [0, 5],
                    "tokens": ["subject_last", "prompt_last"], **editing},
    })


def _units(cfg, fact_ids=None):
    return plan_units(cfg, method_tokens(cfg), cfg.editing.layers, FACTS, fact_ids)


def test_stage_order_runs_each_stage_over_all_facts_and_holds_the_same_units():
    fact, stage = _units(_config("fact")), _units(_config("stage"))
    assert sorted(map(repr, fact)) == sorted(map(repr, stage)) and len({u.key() for u in stage}) == len(stage)
    # stage order: every noise grid, then every flip grid, then ROME (both problems of a fact together) at the
    # default token, then FT-1 (no key position: token None), then ROME's other token rule
    kinds = [u.localization if isinstance(u, TraceUnit) else (u.method, u.token) for u in stage]
    blocks = [kinds[0]] + [b for a, b in zip(kinds, kinds[1:]) if a != b]
    assert blocks == ["noise", "flip", ("rome", "subject_last"), ("ft-1", None), ("rome", "prompt_last")]
    rome = [(u.fact_id, u.problem) for u in stage if isinstance(u, EditUnit) and u.method == "rome"]
    assert rome[:4] == [("cf:0", "error_injection")] * 2 + [("cf:0", "fact_forcing")] * 2
    # fact order: all of a fact's units before the next fact's
    assert [u.fact_id for u in fact] == sorted((u.fact_id for u in fact), key=FACTS.index)


def test_token_rules_are_limited_to_the_first_facts_and_named_methods_even_when_sharded():
    cfg = _config("stage", token_facts=2, methods=["rome", "r-rome", "ft-1"], token_methods=["rome"])
    units = [u for u in _units(cfg) if isinstance(u, EditUnit)]
    assert {(u.fact_id, u.method) for u in units if u.token == "prompt_last"} == {("cf:0", "rome"), ("cf:1", "rome")}
    # every fact still gets every method at its own token (FT: none)
    assert {(u.fact_id, u.method, u.token) for u in units if u.token != "prompt_last"} == {
        (f, m, None if m == "ft-1" else "subject_last") for f in FACTS for m in ("rome", "r-rome", "ft-1")}
    # a shard (facts 1, 3) counts token_facts in the study's order, not its own
    shard = _units(cfg, FACTS[1::2])
    assert {u.key() for u in shard} == {u.key() for u in _units(cfg) if u.fact_id in FACTS[1::2]}


@pytest.mark.parametrize("study, editing, message", [
    ({"order": "random"}, {}, "order"),
    ({}, {"token_methods": ["rome", "teleport"]}, "unknown edit method 'teleport'"),
    ({}, {"token_facts": 0}, "token_facts"),
])
def test_bad_order_and_token_limits_are_config_errors(study, editing, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"study": study, "editing": editing})


def _journal(path, keys):
    j = Journal(path)
    for i, k in enumerate(keys):
        j.append({"key": k, "fact_id": k, "x": float(i)})


def test_compressed_journals_merge_in_order_and_are_byte_reproducible(tmp_path):
    plain = tmp_path / "edits.shard-0-of-1.jsonl"
    _journal(plain, ["a", "b"])
    packed = compress_journal(plain)
    first = packed.read_bytes()
    assert compress_journal(plain).read_bytes() == first  # same records: same bytes (gzip mtime 0)
    assert [r["key"] for r in read_journal(packed)] == ["a", "b"]
    _journal(plain, ["a", "b", "c"])  # the run went on (Journal ignores the known keys)
    assert [r["key"] for r in read_journals([plain, packed])] == ["a", "b", "c"]
    compress_journal(plain, remove_plain=True)
    assert not plain.exists()
    assert [r["x"] for r in read_journal(packed)] == [0.0, 1.0, 2.0]
    assert json.loads(gzip.decompress(packed.read_bytes()).splitlines()[0])["key"] == "a"


def test_pack_keeps_the_plain_journal_of_a_running_shard_and_tables_read_both_forms(tmp_path):
    run = tmp_path / "run"
    _journal(run / "journal" / "edits.shard-0-of-2.jsonl", ["a", "b"])
    _journal(run / "journal" / "edits.shard-1-of-2.jsonl", ["c"])
    before = collect_tables(run)["edits"]
    lock = RunDir(run).lock((1, 2))  # shard 1 is "running"
    try:
        done = {p.name: removed for p, removed in RunDir(run).pack()}
    finally:
        lock.release()
    assert done == {"edits.shard-0-of-2.jsonl.gz": True, "edits.shard-1-of-2.jsonl.gz": False}
    assert (run / "journal" / "edits.shard-1-of-2.jsonl").exists()
    after = collect_tables(run)["edits"]
    assert after.sort("key").equals(before.sort("key")) and after.height == 3
    assert RunDir(run).collect()["edits"].height == 3 and pl.read_parquet(run / "edits.parquet").height == 3
    with pytest.raises(ValueError, match="not a locedit run directory"):
        RunDir(tmp_path).pack()
