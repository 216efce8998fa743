"""A study's run directory, owned by one object: its config, facts, plan and provenance, journals, lock, packing and
the tables collected from it.

Layout (run format :data:`locedit.plan.SCHEMA_VERSION`)::

    RUN_DIR/
      config.json          the validated study config in the TOML layout, every default filled in, with
                           "schema_version" (a resume must match it; an older run is refused with one line that
                           says to run `locedit migrate RUN_DIR`)
      facts.json           the selected fact ids, in order (fixed at the first start; shards share it)
      provenance.json      versions, torch threads and device, seeds, and "plan": the resolved plan
                           (locedit.plan.StudyPlan.to_json: sigma, hyper-parameters, tokens, layers, key statistics)
      .lock.shard-I-of-N   held while a process runs that shard (a second one exits with a clear message)
      journal/             append-only JSONL journals, one per (table, shard), plain or gzip-compressed -- the source
                           of truth; bad lines are moved to journal/quarantine.jsonl
      tracing.parquet, edits.parquet, failures.parquet   derived from the journals (:meth:`RunDir.collect`)
      study.log            what happened, failures with tracebacks
      sittings.jsonl       one "start" and one "end" line per sitting (each run of a shard or of the Ray executor):
                           where and how it ran (host, device, torch threads, executor) and which units it ran (the
                           first and last unit key in plan order, the count) -- rows from sittings with other
                           threads or devices may differ at float precision, and this says which ones did

The serial runner (:mod:`locedit.study`), the Ray executor (:mod:`locedit.executor`), the report, the findings and
the CLI all go through :class:`RunDir`; none of them builds a path or parses a file of the directory itself.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from filelock import FileLock, Timeout

from locedit.config import ConfigError, StudyConfig, parse_config
from locedit.journal import (
    JOURNAL_NAME,
    Journal,
    compress_journal,
    journal_files,
    read_journals,
    refuse_symlink,
    repair_compressed,
    scan_journal,
    write_parquet_atomic,
)
from locedit.plan import SCHEMA_VERSION, StudyPlan, Unit
from locedit.tracer.atomic import write_atomic
from locedit.tracer.result import tracing_frame

__all__ = [
    "IncompatibleRunDirsError",
    "InputsChangedError",
    "OutdatedRunDirError",
    "RunDir",
    "StudyConfigMismatch",
    "StudyLockedError",
    "TABLES",
    "collect_tables",
    "companion_conflicts",
    "fact_digests",
]

log = logging.getLogger("locedit.study")

TABLES = ("tracing", "edits", "failures")
PACK_LOCK_SECONDS = 600.0  # how long a `locedit pack` waits for another one on the same directory
_FAILURE_SCHEMA = {k: pl.String for k in ("key", "stage", "fact_id", "error_type", "error")}


class StudyConfigMismatch(ValueError):
    """A run directory was started with a different config."""


class StudyLockedError(ValueError):
    """Another process holds the lock of this (run directory, shard)."""


class OutdatedRunDirError(ValueError):
    """A run directory written in an older run format (``locedit migrate`` rewrites it)."""


class InputsChangedError(ValueError):
    """A resumed run's inputs (the facts' content) differ from those it started with."""


class IncompatibleRunDirsError(ValueError):
    """Several run directories given together hold different studies."""


def fact_digests(facts) -> dict[str, str]:
    """Per fact, a content hash (16 hex digits) of everything the study reads of it (every field of the
    :class:`~locedit.problems.facts.Fact`): a resume compares them with those recorded at the first start."""
    import dataclasses
    import hashlib

    return {f.id: hashlib.sha256(json.dumps(dataclasses.asdict(f), sort_keys=True, default=list).encode()
                                 ).hexdigest()[:16] for f in facts}


class RunDir:
    """One study's run directory (see the module docstring). Creating the object touches nothing on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------ files
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def facts_path(self) -> Path:
        return self.path / "facts.json"

    @property
    def provenance_path(self) -> Path:
        return self.path / "provenance.json"

    @property
    def sittings_path(self) -> Path:
        return self.path / "sittings.jsonl"

    @property
    def journal_dir(self) -> Path:
        return self.path / "journal"

    @property
    def log_path(self) -> Path:
        return self.path / "study.log"

    def table_path(self, table: str) -> Path:
        return self.path / f"{table}.parquet"

    def journal_path(self, table: str, shard: tuple[int, int] = (0, 1)) -> Path:
        """The plain journal a process running ``shard`` appends ``table``'s records to."""
        return self.journal_dir / f"{table}.shard-{shard[0]}-of-{shard[1]}.jsonl"

    @staticmethod
    def journal_shard(path: Path) -> tuple[str, tuple[int, int]]:
        """``(table, shard)`` of a journal file name (the inverse of :meth:`journal_path`)."""
        m = JOURNAL_NAME.fullmatch(Path(path).name)
        if m is None:
            raise ValueError(f"{path} is not a journal file name")
        return m["table"], (int(m["i"]), int(m["n"]))

    # ------------------------------------------------------------ checks
    def exists(self) -> bool:
        return self.path.is_dir()

    def require(self) -> RunDir:
        """This directory, checked to be a run directory of the current format (else one clear error)."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run directory {self.path}")
        if not self.journal_dir.is_dir():
            raise ValueError(f"{self.path} is not a locedit run directory (it has no journal/ folder)")
        if self.config_path.exists():
            self.schema_version(check=True)
        return self

    def raw_config(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.config_path} is unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.config_path} is not a JSON object")
        return raw

    def schema_version(self, check: bool = False) -> int:
        """The run format of ``config.json`` (1 for a run written before formats were versioned); with ``check``,
        :class:`OutdatedRunDirError` unless it is the current one."""
        v = self.raw_config().get("schema_version", 1)
        if check and v != SCHEMA_VERSION:
            if isinstance(v, int) and v < SCHEMA_VERSION:
                raise OutdatedRunDirError(
                    f"{self.path} was written by an older locedit (run format {v}, this one reads {SCHEMA_VERSION}): "
                    f"run `locedit migrate {self.path}` once, then retry")
            raise OutdatedRunDirError(f"{self.path} has run format {v!r}, which this locedit ({SCHEMA_VERSION}) "
                                      "does not know: use the locedit that wrote it")
        return v

    def config(self) -> StudyConfig:
        """The study's config (current format only)."""
        self.schema_version(check=True)
        return parse_config(self.raw_config())

    # ------------------------------------------------------------ start / resume
    def start(self, config: StudyConfig) -> None:
        """Write ``config.json`` at the first start; at a resume check that it is the same config."""
        self.path.mkdir(parents=True, exist_ok=True)
        cfg = json.loads(json.dumps(config.to_dict()))
        if self.config_path.exists():
            old = self.config().to_dict()
            if old != cfg:
                diff = config_differences(old, cfg)
                raise StudyConfigMismatch(
                    f"{self.path} was started with another config; use a new run directory (differences in: {diff})")
            return
        write_atomic(self.config_path, json.dumps({"schema_version": SCHEMA_VERSION, **cfg}, indent=2))

    def fact_ids(self) -> list[str] | None:
        """The study's fact ids in order (None before the first start selected them)."""
        if not self.facts_path.exists():
            return None
        try:
            ids = json.loads(self.facts_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.facts_path} is unreadable ({type(e).__name__}: {e}); it must be a JSON list of "
                             "fact ids") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{self.facts_path} must be a JSON list of fact ids")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.facts_path} lists a fact more than once")
        return ids

    def fix_fact_ids(self, select: Callable[[], Sequence[str]]) -> list[str]:
        """``facts.json``, written from ``select()`` at the first start."""
        ids = self.fact_ids()
        if ids is None:
            ids = [str(i) for i in select()]
            write_atomic(self.facts_path, json.dumps(ids))
        return ids

    def provenance(self) -> dict[str, Any]:
        if not self.provenance_path.exists():
            return {}
        try:
            return json.loads(self.provenance_path.read_text())
        except (OSError, ValueError):
            return {}

    def fix_plan(self, resolve: Callable[[], StudyPlan], provenance: dict[str, Any]) -> StudyPlan:
        """The run's plan: at the first start ``resolve()``, written into ``provenance.json`` (with ``provenance``:
        versions, threads, device, seeds); at a resume the plan recorded then. A resume warns when the thread count
        or device differ, and when today's code would resolve the plan differently (the run keeps its own)."""
        fresh = resolve()
        old = self.provenance()
        if "plan" not in old:
            write_atomic(self.provenance_path, json.dumps({**provenance, "plan": fresh.to_json()}, indent=2))
            return fresh
        if "inputs" in provenance:
            self._check_inputs(old, provenance["inputs"])
        plan = StudyPlan.from_json(old["plan"], fresh.config, fresh.fact_ids)
        msgs = [f"{self.path} was started with {k}={old.get(k)!r}, this resume runs with {k}={provenance[k]!r}: its "
                "new rows may differ from the earlier ones at float precision"
                for k in ("threads", "device") if old.get(k) != provenance[k]]
        changed = plan.differences(fresh)
        if changed:
            msgs.append(f"{self.path}: this locedit would resolve the plan differently (" + "; ".join(changed)
                        + "); the run keeps the plan it started with (start a new run directory for the new one)")
        for msg in msgs:
            log.warning(msg)
            warnings.warn(msg, stacklevel=3)
        return plan

    def _check_inputs(self, old: dict[str, Any], now: dict[str, Any]) -> None:
        """A resume's facts must have the content they had at the first start (a run that recorded none, e.g. a
        migrated one, records them now)."""
        if "inputs" not in old:
            write_atomic(self.provenance_path, json.dumps({**old, "inputs": now}, indent=2))
            return
        was, is_ = old["inputs"].get("facts", {}), now.get("facts", {})
        changed = sorted(f for f in was if is_.get(f) != was[f])
        if changed or old["inputs"].get("dataset") != now.get("dataset"):
            what = (f"{len(changed)} fact(s) changed content ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''})"
                    if changed else f"the dataset is {now.get('dataset')!r}, was {old['inputs'].get('dataset')!r}")
            raise InputsChangedError(f"{self.path}: the inputs changed since this run started: {what}; finished rows "
                                     "would mix the old and the new facts -- restore the dataset or use a new run "
                                     "directory")

    # ------------------------------------------------------------ sittings
    def begin_sitting(self, *, executor: str, shard: tuple[int, int], provenance: dict[str, Any], units: int,
                      todo: Sequence[Unit], **extra: Any) -> dict[str, Any]:
        """Append a sitting's "start" line to ``sittings.jsonl`` and return its identity (a random id and the shard;
        pass it to :meth:`end_sitting`) with: UTC start time, host, executor, shard, the torch threads and device of
        ``provenance`` (:func:`locedit.study.provenance` of the process that runs the units), the shard's unit
        count, how many were done before, and the first unit key it will run (units run in plan order)."""
        import datetime as _dt
        import platform
        import uuid

        ident = {"sitting": uuid.uuid4().hex[:12], "shard": f"{shard[0]}/{shard[1]}"}
        Journal(self.sittings_path).append({
            "key": f"{ident['sitting']}|start", "event": "start", **ident,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "executor": executor, "threads": int(provenance["threads"]), "device": str(provenance["device"]),
            "units": int(units),
            "done_before": int(units) - len(todo), "first_unit": todo[0].key() if todo else None, **extra})
        return ident

    def end_sitting(self, ident: dict[str, Any], *, units_run: int, failed: int, last_unit: str | None,
                    stopped: str | None, seconds: float) -> None:
        """Append the "end" line of the sitting ``ident`` (:meth:`begin_sitting`): units run (failures included),
        failures, the last unit key, the signal that stopped it (None: it ran out of units), wall seconds. A sitting
        killed outright has a "start" line only."""
        import datetime as _dt

        Journal(self.sittings_path).append({
            "key": f"{ident['sitting']}|end", "event": "end", **ident,
            "ended": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "units_run": int(units_run),
            "failed": int(failed), "last_unit": last_unit, "stopped": stopped, "seconds": round(float(seconds), 1)})

    def sittings(self) -> list[dict[str, Any]]:
        """The sittings, one dict each in start order: the "start" line's fields updated by its "end" line's
        (absent for a sitting killed outright)."""
        if not self.sittings_path.exists():
            return []
        out: dict[str, dict[str, Any]] = {}
        for rec in read_journals([self.sittings_path]):
            merged = out.setdefault(str(rec.get("sitting")), {})
            merged.update({k: v for k, v in rec.items() if k not in ("key", "event")})
        return list(out.values())

    # ------------------------------------------------------------ journals
    def journal(self, table: str, shard: tuple[int, int] = (0, 1)) -> Journal:
        return Journal(self.journal_path(table, shard))

    def journals(self, table: str = "*") -> list[Path]:
        """Every journal of ``table`` (all with "*"), plain and compressed, every shard."""
        return journal_files(self.journal_dir, table)

    def records(self, table: str) -> list[dict[str, Any]]:
        """Valid records of ``table`` over every shard, first per key."""
        return read_journals(self.journals(table))

    def finished_keys(self) -> set[str]:
        """Keys of the units with a result (tracing or edits) in any shard's journal."""
        return {r["key"] for r in read_journals([p for p in self.journals() if not p.name.startswith("failures")])}

    def todo(self, units: Sequence[Unit], retry_failed: bool = False) -> list[Unit]:
        """The units not finished (failed ones only with ``retry_failed``)."""
        finished = self.finished_keys()
        failed = {r["key"] for r in self.records("failures")} - finished
        return [u for u in units if (k := u.key()) not in finished and (retry_failed or k not in failed)]

    def bad_lines(self) -> list[tuple[str, int]]:
        """``(journal, line number)`` of every line the readers skip (torn or garbled; :mod:`locedit.journal`)."""
        return [(str(p), n) for p in self.journals() for n, _ in scan_journal(p)[1]]

    # ------------------------------------------------------------ lock, pack, log
    def lock(self, shard: tuple[int, int] = (0, 1)) -> FileLock:
        """The lock one process holds while it runs ``shard`` (a Ray run holds shard 0/1's);
        :class:`StudyLockedError` when another process holds it."""
        i, n = shard
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / f".lock.shard-{i}-of-{n}"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StudyLockedError(
                f"another process is running shard {i}/{n} of {self.path}; wait for it or use another --shard"
            ) from None
        return lock

    def exclusive(self, timeout: float = PACK_LOCK_SECONDS) -> FileLock:
        """The lock of operations that rewrite journals (pack, repair, migrate): one at a time per directory; a
        second one waits up to ``timeout`` seconds (then :class:`StudyLockedError`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / ".lock.rewrite"))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise StudyLockedError(f"another locedit is packing or migrating {self.path}; try again when it is "
                                   "done") from None
        return lock

    def repair(self) -> int:
        """Rewrite every damaged compressed journal with its intact records (:func:`locedit.journal.
        repair_compressed`: the damaged file kept beside it, the damage noted in the quarantine); a writer runs it
        before appending. Returns the number of damaged stretches found."""
        with self.exclusive():
            return sum(repair_compressed(p) for p in self.journals() if p.suffix == ".gz")

    def pack(self) -> list[tuple[Path, bool]]:
        """Compress the journals for shipping (``NAME.jsonl`` -> ``NAME.jsonl.gz``, merged with an earlier ``.gz``).
        A shard no process is running loses its plain journal; a running one keeps appending to it and its ``.gz``
        is a snapshot (pack again later). One pack at a time (:meth:`exclusive`), so a pack never replaces a merged
        file it did not read. Returns ``(compressed file, plain journal removed)`` per journal."""
        self.require()
        out = []
        with self.exclusive():
            for plain in self.journals():
                if plain.suffix == ".gz":
                    continue
                _, shard = self.journal_shard(plain)
                try:
                    lock = self.lock(shard)
                except StudyLockedError:
                    out.append((compress_journal(plain), False))
                    continue
                try:
                    out.append((compress_journal(plain, remove_plain=True), True))
                finally:
                    lock.release()
        strays = sorted(p.name for p in self.journal_dir.glob("*.jsonl*")
                        if not JOURNAL_NAME.fullmatch(p.name) and p.name != "quarantine.jsonl")
        if strays:
            log.warning("%s: left alone, not journals: %s", self.journal_dir, ", ".join(strays))
        return out

    def setup_log(self) -> None:
        refuse_symlink(self.log_path)
        path = str(self.log_path.resolve())
        if not any(getattr(h, "baseFilename", None) == path for h in log.handlers):
            h = logging.FileHandler(path)
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(h)
        log.setLevel(logging.INFO)

    # ------------------------------------------------------------ tables
    def collect(self, write: bool = True) -> dict[str, pl.DataFrame]:
        """The study tables from the journals (every shard); with ``write`` also (re)write the Parquet files
        atomically."""
        tables = collect_tables(self)
        if write:
            for name, df in tables.items():
                write_parquet_atomic(df, self.table_path(name))
        return tables


def collect_tables(*run_dirs: RunDir | str | Path) -> dict[str, pl.DataFrame]:
    """Merge the journals of one or more run directories (all shards) into the study tables (nothing is written).
    Several directories must hold one study (the same config and plan: shards or copies of one run) or companion
    studies (:func:`companion_conflicts`: the union of their units, first record per key in the order given), else
    :class:`IncompatibleRunDirsError`."""
    dirs = [d if isinstance(d, RunDir) else RunDir(d) for d in run_dirs]
    for d in dirs:
        d.require()
    _check_compatible(dirs)

    def records(table):
        return read_journals([p for d in dirs for p in d.journals(table)])

    finished = set().union(*(d.finished_keys() for d in dirs))
    edits = records("edits")
    failures = [r for r in records("failures") if r["key"] not in finished]  # a retried unit is no failure
    return {
        "tracing": tracing_frame(records("tracing")),
        "edits": pl.DataFrame(edits, infer_schema_length=None) if edits else pl.DataFrame(),
        "failures": pl.DataFrame(failures, schema=_FAILURE_SCHEMA),
    }


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``section.key`` of every setting that differs between two configs in the TOML layout
    (:meth:`StudyConfig.to_dict`)."""
    return sorted(f"{s}.{k}" for s in set(a) | set(b) for k in set(a.get(s, {})) | set(b.get(s, {}))
                  if a.get(s, {}).get(k) != b.get(s, {}).get(k))


def _identity(d: RunDir) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A run directory's config (TOML layout) and the plan entries that fix what its units compute."""
    if not d.config_path.exists():
        return None
    plan = d.provenance().get("plan", {})
    return d.config().to_dict(), {k: plan.get(k) for k in ("noise", "hparams", "tokens", "model",
                                                           "covariance_tokens")}


def companion_conflicts(a: RunDir, b: RunDir) -> list[str]:
    """Why two run directories of *different* studies cannot be read as companions ([] when they can).

    Companion studies split one design over several runs (e.g. the reference study and its other edit methods, or
    a dense layer sweep of its first facts): their units may differ, but a unit key must mean the same computation in
    each, so they share the model, the dataset and filter, the resolved noise and every localization setting a
    tracing key does not name (which localizations, kinds and windows run may differ); and
    where both edit the same problem × method (or method), the same resolved hyper-parameters and token rules, and
    the same key-statistics tokens. Their tables are then the union of their journals (first record per key)."""
    ia, ib = _identity(a), _identity(b)
    if ia is None or ib is None:
        return ["config.json"]
    (ca, pa), (cb, pb) = ia, ib
    out = [f"{sec}.{k}" for sec, keys in (("study", ("model",)), ("data", ("dataset", "filter")))
           for k in keys if ca.get(sec, {}).get(k) != cb.get(sec, {}).get(k)]
    # which localizations, kinds and windows are in a unit's key: companions may run different ones
    keyed = ("methods", "kinds", "windows")
    out += config_differences({"localization": {k: v for k, v in ca.get("localization", {}).items() if k not in keyed}},
                              {"localization": {k: v for k, v in cb.get("localization", {}).items() if k not in keyed}})
    out += [f"plan.{k}" for k in ("model", "noise") if pa.get(k) != pb.get(k)]
    for k in ("hparams", "tokens"):
        x, y = pa.get(k) or {}, pb.get(k) or {}
        out += [f"plan.{k}[{m}]" for m in sorted(set(x) & set(y)) if x[m] != y[m]]
    if pa.get("hparams") and pb.get("hparams") and pa.get("covariance_tokens") != pb.get("covariance_tokens"):
        out.append("plan.covariance_tokens")
    return sorted(out)


def _check_compatible(dirs: Sequence[RunDir]) -> None:
    """Several run directories read together hold one study (shards or copies: the same config and plan) or
    companion studies (:func:`companion_conflicts`); anything else is refused, naming what differs."""
    if len(dirs) < 2:
        return
    first = _identity(dirs[0])
    for d in dirs[1:]:
        if _identity(d) == first:
            continue
        diff = companion_conflicts(dirs[0], d)
        if diff:
            raise IncompatibleRunDirsError(
                f"{dirs[0].path} and {d.path} hold different studies that are not companions (differences in: "
                f"{diff}); give run directories of one study (its shards), or companion studies (same model, data, "
                "localization and noise; equal settings for what both edit), or report each on its own")
