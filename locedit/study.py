"""The batch study: trace facts, edit them under every (problem, method, layer), and keep every finished unit.

Layout of a run directory::

    RUN_DIR/
      config.json          the validated study config (a resume must match it)
      provenance.json      versions, torch threads and device, resolved hyper-parameters, seeds (first start)
      .lock.shard-I-of-N   held while a process runs that shard (a second one exits with a clear message)
      facts.json           the selected fact ids, in order (fixed at the first start; shards share it)
      journal/             append-only JSONL journals, one per (table, shard) -- the source of truth; bad lines
                           are moved to journal/quarantine.jsonl
      tracing.parquet      long table: fact x kind x window x token x layer (see docs/CONTRACTS.md)
      edits.parquet        one row per fact x problem x method x layer
      failures.parquet     one row per failed unit, with its error
      study.log            what happened, failures with tracebacks

Units run in a fixed order; a unit is skipped when its key is already in a journal (finished, or failed unless
``retry_failed``). Killing the process at any point and calling :func:`run_study` again on the same directory
therefore finishes with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from locedit.config import STUDY_KEYS, ConfigError, StudyConfig, check_against_model, default_edit_layers, parse_config
from locedit.journal import Journal, compress_journal, journal_files, read_journals, scan_journal, write_parquet_atomic
from locedit.tracer.atomic import write_atomic
from locedit.editors.methods import resolve_method
from locedit.tracer.result import tracing_frame
from locedit.tracer.vocab import DEFAULT_EDIT_TOKEN

__all__ = ["StudySummary", "bad_journal_lines", "run_study", "select_facts", "collect_tables", "unit_keys"]

log = logging.getLogger("locedit.study")

_FILTER_CHUNK = 32  # facts checked per cached known-filter call while sampling


class StudyConfigMismatch(ValueError):
    """A run directory was started with a different config."""


class StudyLockedError(ValueError):
    """Another process holds the lock of this (run directory, shard)."""


@dataclass(frozen=True)
class StudySummary:
    run_dir: str
    n_facts: int
    shard: tuple[int, int]
    done: int
    skipped: int
    failed: int
    seconds: float


# ---------------------------------------------------------------- data selection


def select_facts(model, config: StudyConfig, facts: Sequence | None = None) -> list:
    """Shuffle the dataset with ``data.seed`` and keep, in that order, the first ``data.sample`` facts passing
    ``data.filter``. The filter runs lazily in cached chunks, so a 20-fact study does not decode 3,284 prompts.
    ``facts``: the dataset, if already loaded."""
    from locedit.problems import load_dataset
    from locedit.problems.filters import first_passing, known_mask, min_target_prob_mask

    facts = list(load_dataset(config.data.dataset) if facts is None else facts)
    random.Random(config.data.seed).shuffle(facts)
    want = config.data.sample if config.data.sample is not None else len(facts)
    if config.data.filter == "none":
        return facts[:want]
    mask = known_mask if config.data.filter == "known" else min_target_prob_mask
    return first_passing(model, facts, want, mask, chunk=_FILTER_CHUNK)


# ---------------------------------------------------------------- units


def _trace_windows(kind: str, windows: Sequence[int]) -> tuple[int, ...]:
    return (1,) if kind == "resid" else tuple(windows)


def unit_keys(config: StudyConfig, fact_ids: Sequence[str], n_layers: int,
              study_ids: Sequence[str] | None = None) -> list[tuple[str, str, tuple]]:
    """All units of a study in run order: ``(table, key, spec)`` with table "tracing" or "edits".

    ``[study] order = "fact"`` (the default) runs every unit of a fact before the next fact; ``"stage"`` runs one
    stage over every fact before the next -- each localization method, then each edit method at the default token
    (all problems of a fact together), then the other token rules -- so a study stopped early has its first stages
    complete over all facts (and its problems equally far). ``[editing] token_methods`` / ``token_facts`` limit the
    token rules other than the default to those methods and to the first ``token_facts`` facts of ``study_ids`` (the
    study's fact order, ``facts.json``; default ``fact_ids``); elsewhere a method is edited at the default token."""
    ed = config.editing
    layers = ed.layers or default_edit_layers(n_layers, config.model)
    study_ids = list(fact_ids if study_ids is None else study_ids)
    token_ids = set(study_ids if ed.token_facts is None else study_ids[: ed.token_facts])

    def tokens_for(method: str, fid: str) -> tuple:
        if not resolve_method(method).uses_token:
            return (DEFAULT_EDIT_TOKEN,)
        if fid not in token_ids or (ed.token_methods is not None and method not in ed.token_methods):
            return (DEFAULT_EDIT_TOKEN,)
        return ed.tokens

    def traces(fid: str, method: str):
        for kind in config.tracing.kinds:
            for w in _trace_windows(kind, config.tracing.windows):
                key = f"trace|{fid}|{kind}|w{w}" + ("" if method == "noise" else f"|{method}")  # noise: old keys
                yield "tracing", key, (fid, kind, w, method)

    def edits(fid: str, problem: str, method: str, token):
        if token in tokens_for(method, fid):
            for layer in layers:
                yield "edits", _edit_key(fid, problem, method, layer, token), (fid, problem, method, layer, token)

    if config.order == "fact":
        return [u for fid in fact_ids for u in (
            *(u for m in config.tracing.methods for u in traces(fid, m)),
            *(u for p in ed.problems for m in ed.methods for t in tokens_for(m, fid) for u in edits(fid, p, m, t)),
        )]
    others = [t for t in ed.tokens if t != DEFAULT_EDIT_TOKEN]
    return [
        *(u for m in config.tracing.methods for fid in fact_ids for u in traces(fid, m)),
        *(u for m in ed.methods for fid in fact_ids for p in ed.problems for u in edits(fid, p, m, DEFAULT_EDIT_TOKEN)),
        *(u for m in ed.methods for fid in fact_ids for p in ed.problems for t in others for u in edits(fid, p, m, t)),
    ]


def _edit_key(fid: str, problem: str, method: str, layer: int, token: str | int) -> str:
    """An edit unit's journal key; the default token keeps the key it had before token rules existed (old runs
    resume)."""
    key = f"edit|{fid}|{problem}|{method}|L{layer}"
    return key if token == DEFAULT_EDIT_TOKEN else f"{key}|T{token}"


def _trace_record(model, fact, kind: str, window: int, method: str, config: StudyConfig, dataset) -> dict[str, Any]:
    """One localization grid (:func:`problems.localize.localize`); flip partners come from the whole dataset."""
    from locedit.problems.localize import flip_partners, localize

    partners = ()
    if method == "flip":
        partners = flip_partners(model, fact, dataset, config.tracing.flips, config.tracing.seed)
    res = localize(model, fact, method, kind=kind, window=window, noise=config.tracing.corruption(),
                   partners=partners)
    return {"fact_id": fact.id, "localization": method, **res.to_record()}


def _hparams_for(model, config: StudyConfig, problem: str, method: str):
    """The problem's App. A hyper-parameters for ``method`` with the config's ``[hparams.<method>]`` overrides."""
    from locedit.problems.variants import problem_hparams

    hp = problem_hparams(problem, method, model)
    overrides = config.hparams.get(method, {})
    return dataclasses.replace(hp, **overrides) if overrides else hp


def _edit_record(model, fact, problem: str, method: str, layer: int, token, config: StudyConfig) -> dict[str, Any]:
    from locedit.problems import run_edit

    extra = {}
    if config.editing.covariance_tokens is not None:
        from locedit.editors import key_second_moment

        n = config.editing.covariance_tokens
        extra["covariance"] = lambda m, layer: key_second_moment(m, layer, n_tokens=n, progress=False)
    outcome = run_edit(
        model, fact, problem, method, layer, hparams=_hparams_for(model, config, problem, method), **extra,
        noise=config.tracing.corruption(), essence=config.editing.essence,
        edit_samples=config.editing.forcing_edit_samples, generation=config.editing.generation, token=token,
    )
    return outcome.as_row()


# ---------------------------------------------------------------- run


def _journal_path(run_dir: Path, table: str, shard: tuple[int, int]) -> Path:
    return run_dir / "journal" / f"{table}.shard-{shard[0]}-of-{shard[1]}.jsonl"


def _prepare_run_dir(run_dir: Path, config: StudyConfig, select: Callable[[], Sequence]) -> list[str]:
    """Write (or check against) ``config.json``; the study's fact ids from ``facts.json``, or from ``select()`` (the
    selected facts) at the first start."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, facts_path = run_dir / "config.json", run_dir / "facts.json"
    cfg = json.loads(json.dumps(config.to_dict()))
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        try:  # a run directory written by an older locedit: compare with today's defaults filled in
            old = json.loads(json.dumps(parse_config(_nested(old)).to_dict()))
        except ConfigError:
            pass
        if old != cfg:
            raise StudyConfigMismatch(
                f"{run_dir} was started with another config; use a new run directory (differences in: "
                f"{sorted(k for k in cfg if cfg.get(k) != old.get(k))})"
            )
    else:
        write_atomic(cfg_path, json.dumps(cfg, indent=2))
    if facts_path.exists():
        return json.loads(facts_path.read_text())
    ids = [f.id for f in select()]
    write_atomic(facts_path, json.dumps(ids))
    return ids


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` (``StudyConfig.to_dict``) back to the TOML layout ``parse_config`` takes."""
    out = {k: v for k, v in flat.items() if k not in STUDY_KEYS}
    out["study"] = {k: flat[k] for k in STUDY_KEYS if k in flat}
    return out


def run_study(
    config: StudyConfig,
    run_dir: str | Path,
    *,
    model=None,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    progress: bool = True,
    flush_seconds: float = 60.0,
) -> StudySummary:
    """Run (or resume) a study. ``limit`` caps the number of facts; ``shard=(i, n)`` runs facts ``i::n``.

    Parquet tables are rewritten from the journals every ``flush_seconds`` seconds (each rewrite reads every
    journal line once: linear in the study's size) and at the end. ``locedit.executor.run_study_ray`` runs the same
    units on Ray actors."""
    i, n = shard
    if not (0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    if model is None:
        from locedit.tracer import load_model

        model = load_model(config.model)
    check_against_model(config, model.cfg.n_layers)  # before anything is written
    from locedit.problems import load_dataset

    dataset = load_dataset(config.data.dataset)
    lock = lock_run_dir(run_dir, shard)
    try:
        return _run_locked(config, run_dir, model, dataset, limit, shard, retry_failed, progress, flush_seconds, start)
    finally:
        lock.release()


def lock_run_dir(run_dir: Path, shard: tuple[int, int] = (0, 1)) -> FileLock:
    """The lock one process holds while it runs ``shard`` of ``run_dir`` (a Ray run holds shard 0/1's)."""
    i, n = shard
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / f".lock.shard-{i}-of-{n}"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StudyLockedError(
            f"another process is running shard {i}/{n} of {run_dir}; wait for it or use another --shard"
        ) from None
    return lock


def pack_run_dir(run_dir: str | Path) -> list[tuple[Path, bool]]:
    """Compress a run directory's journals for shipping (``journal/NAME.jsonl`` -> ``NAME.jsonl.gz``, merged with
    an earlier ``.gz``). A shard no process is running loses its plain journal; a running one keeps appending to it
    and its ``.gz`` is a snapshot (pack again later). Every reader takes both forms, so a packed run reports and
    resumes like a plain one. Returns ``(compressed file, plain journal removed)`` per journal."""
    run_dir = Path(run_dir)
    if not (run_dir / "journal").is_dir():
        raise ValueError(f"{run_dir} is not a locedit run directory (it has no journal/ folder)")
    out = []
    for plain in journal_files(run_dir / "journal"):
        if plain.suffix == ".gz":
            continue
        shard = tuple(int(x) for x in plain.name.split(".shard-")[1].removesuffix(".jsonl").split("-of-"))
        try:
            lock = lock_run_dir(run_dir, shard)
        except StudyLockedError:
            out.append((compress_journal(plain), False))
            continue
        try:
            out.append((compress_journal(plain, remove_plain=True), True))
        finally:
            lock.release()
    return out


def todo_units(run_dir: Path, config: StudyConfig, fact_ids: Sequence[str], n_layers: int, retry_failed: bool,
               study_ids: Sequence[str] | None = None):
    """All units of ``fact_ids`` and those still to run (not finished; failed ones only with ``retry_failed``).
    ``study_ids``: the study's whole fact order (``[editing] token_facts`` counts in it)."""
    finished = _finished(run_dir)
    failed = {r["key"] for r in read_journals(journal_files(run_dir / "journal", "failures"))} - finished
    units = unit_keys(config, fact_ids, n_layers, study_ids)
    return units, [u for u in units if u[1] not in finished and (retry_failed or u[1] not in failed)]


def run_unit(model, fact, table: str, key: str, spec: tuple, config: StudyConfig, dataset) -> tuple[str, dict]:
    """Run one unit: ``(table, record)`` on success, ``("failures", failure record)`` when it raises (one bad record
    never stops a run). The one unit runner of the serial and the Ray executors."""
    t0 = time.perf_counter()
    try:
        rec = _trace_record(model, fact, *spec[1:], config, dataset) if table == "tracing" else _edit_record(
            model, fact, *spec[1:], config
        )
    except Exception as e:
        log.error("unit %s failed: %s\n%s", key, e, traceback.format_exc())
        return "failures", {"key": key, "stage": table, "fact_id": fact.id, "error_type": type(e).__name__,
                            "error": str(e)}
    rec["key"] = key
    rec["seconds"] = rec.get("seconds", time.perf_counter() - t0)
    return table, rec


class TableFlusher:
    """Rewrites the Parquet tables from the journals (:func:`collect_tables`, linear in the journal's size) on a time
    interval and on :meth:`final`: at least ``seconds`` apart, and at least ``ratio`` × the last rewrite's own
    duration apart, so rewriting costs at most 1/(ratio + 1) of the run's time and the total stays linear in the
    number of units (a rewrite every 25 units was quadratic; ``benchmarks/bench_study_scale.py``)."""

    def __init__(self, run_dir: Path, seconds: float = 60.0, ratio: float = 20.0):
        self.run_dir, self.seconds, self.ratio = run_dir, seconds, ratio
        self.last, self.cost = time.monotonic(), 0.0

    def due(self, now: float) -> bool:
        return now - self.last >= max(self.seconds, self.ratio * self.cost)

    def maybe(self) -> None:
        if self.due(time.monotonic()):
            self.final()

    def final(self) -> None:
        t = time.monotonic()
        collect_tables(self.run_dir)
        self.last = time.monotonic()
        self.cost = self.last - t


def _run_locked(config, run_dir, model, dataset, limit, shard, retry_failed, progress, flush_seconds, start):
    i, n = shard
    fact_ids = _prepare_run_dir(run_dir, config, lambda: select_facts(model, config, dataset))
    _setup_log(run_dir)
    _check_provenance(run_dir, provenance(config, model))
    study_ids = fact_ids
    if limit is not None:
        fact_ids = fact_ids[:limit]
    fact_ids = fact_ids[i::n]
    wanted = set(fact_ids)
    by_id = {f.id: f for f in dataset if f.id in wanted}
    journals = {t: Journal(_journal_path(run_dir, t, shard)) for t in ("tracing", "edits", "failures")}
    units, todo = todo_units(run_dir, config, fact_ids, model.cfg.n_layers, retry_failed, study_ids)
    log.info("study %s shard %d/%d: %d facts, %d units, %d to do", config.name, i, n, len(fact_ids), len(units), len(todo))
    n_done = n_failed = 0
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="study", unit="unit", disable=not progress)
    flusher = TableFlusher(run_dir, flush_seconds)
    for table, key, spec in todo:
        fact = by_id[spec[0]]
        bar.set_postfix_str(f"{table}: {fact.id} {'/'.join(map(str, spec[1:]))}")
        out, rec = run_unit(model, fact, table, key, spec, config, dataset)
        journals[out].append(rec)
        n_failed += out == "failures"
        n_done += out != "failures"
        bar.update(1)
        flusher.maybe()
    bar.close()
    flusher.final()
    return StudySummary(str(run_dir), len(fact_ids), shard, n_done, len(units) - len(todo), n_failed,
                        time.perf_counter() - start)


def provenance(config: StudyConfig, model) -> dict[str, Any]:
    """What produced a run's rows: package versions, torch threads and device, the resolved hyper-parameters per
    (problem, method) and the seeds (data sample, noise draw, context templates, essence/fluency sampling)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    from locedit.editors.methods import EDIT_METHODS

    hp = {f"{p}|{m}": dataclasses.asdict(_hparams_for(model, config, p, m))
          for p in config.editing.problems for m in config.editing.methods}
    return {
        "versions": {pkg: v(pkg) for pkg in ("locedit", "torch", "transformer-lens", "transformers", "polars",
                                             "statsmodels")} | {"python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "device": str(model.cfg.device),
        "model": {"name": model.cfg.model_name, "n_layers": model.cfg.n_layers},
        "hparams": json.loads(json.dumps(hp, default=list)),
        "edit_methods": sorted(EDIT_METHODS),
        "seeds": {"data": config.data.seed, "noise": config.tracing.seed, "context_templates": 0, "essence": 0,
                  "fluency": 0},
    }


def _check_provenance(run_dir: Path, now: dict[str, Any]) -> None:
    """Write ``provenance.json`` (``now``: :func:`provenance`) at the first start; at a resume, warn when the thread
    count or device differ (rows computed under another thread count can differ at ~1e-6)."""
    path = run_dir / "provenance.json"
    if not path.exists():
        write_atomic(path, json.dumps(now, indent=2))
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        write_atomic(path, json.dumps(now, indent=2))
        return
    for key in ("threads", "device"):
        if old.get(key) != now[key]:
            msg = (f"{run_dir} was started with {key}={old.get(key)!r}, this resume runs with {key}={now[key]!r}: "
                   "its new rows may differ from the earlier ones at float precision")
            log.warning(msg)
            import warnings

            warnings.warn(msg, stacklevel=3)


def _finished(*run_dirs: Path) -> set[str]:
    """Keys of the units with a result (tracing or edits) in any shard's journal."""
    paths = [p for d in run_dirs for p in journal_files(d / "journal") if not p.name.startswith("failures")]
    return {r["key"] for r in read_journals(paths)}


def _setup_log(run_dir: Path) -> None:
    path = str(run_dir / "study.log")
    if not any(getattr(h, "baseFilename", None) == str(Path(path).resolve()) for h in log.handlers):
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)


# ---------------------------------------------------------------- tables


def bad_journal_lines(*run_dirs: str | Path) -> list[tuple[str, int]]:
    """``(journal, line number)`` of every line the readers skip (torn or garbled; see :mod:`locedit.journal`)."""
    out = []
    for d in run_dirs:
        for p in journal_files(Path(d) / "journal"):
            out += [(str(p), n) for n, _ in scan_journal(p)[1]]
    return out


def collect_tables(*run_dirs: str | Path) -> dict[str, pl.DataFrame]:
    """Merge the journals of one or more run directories (all shards) into the study tables; for a single
    directory also (re)write its Parquet files atomically."""
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"no run directory {d}")
        if not (d / "journal").is_dir():
            raise ValueError(f"{d} is not a locedit run directory (it has no journal/ folder)")

    def records(table):
        return read_journals([p for d in dirs for p in journal_files(d / "journal", table)])

    edits = records("edits")
    finished = _finished(*dirs)
    failures = [r for r in records("failures") if r["key"] not in finished]  # a retried unit is no failure
    failure_schema = {k: pl.String for k in ("key", "stage", "fact_id", "error_type", "error")}
    tables = {
        "tracing": tracing_frame(records("tracing")),
        "edits": pl.DataFrame(edits, infer_schema_length=None) if edits else pl.DataFrame(),
        "failures": pl.DataFrame(failures, schema=failure_schema),
    }
    if len(dirs) == 1:
        for name, df in tables.items():
            write_parquet_atomic(df, dirs[0] / f"{name}.parquet")
    return tables


