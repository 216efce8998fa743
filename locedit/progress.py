"""Where a study stands, read from its run directory alone (no model): units done / total per stage of the recorded
plan, failures, the journal's own seconds per unit, what is left at that rate, and the recorded sittings.

``locedit status RUN_DIR`` prints it; a long study's closing notes quote it ("units done / total, the measured rate
and what is left"). Seconds per unit are the journal's ``seconds`` (the unit's whole run: edit and scoring; a fact's
first unit of a lockstep batch carries the batch, so the mean over a stage is the right per-unit figure) and depend
on the threads and the machine each sitting ran with: the estimate of what is left assumes the stage's mean so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import polars as pl

from locedit.editors.tokens import DEFAULT_EDIT_TOKEN
from locedit.plan import EditUnit, StudyPlan, TraceUnit, Unit
from locedit.rundir import RunDir

__all__ = ["StudyProgress", "incomplete_cells", "sittings_line", "study_progress", "unit_threads"]


def sittings_line(sittings: list[dict[str, Any]]) -> str:
    """"N (k on DEVICE × T thread(s): U units; ...)" for recorded sittings (:meth:`RunDir.sittings`), or "none
    recorded" (a run from before ``sittings.jsonl``: its study.log says which resumes changed threads).

    A sitting stopped at once (a second signal) or cut off has a start record only: it counts as a sitting, its units
    (journalled, and in the stage counts) cannot be counted here, and the line says how many such sittings there are.
    """
    if not sittings:
        return "none recorded"
    by: dict[tuple[str, Any], list[int]] = {}
    for s in sittings:
        k = (str(s.get("device")), s.get("threads"))
        by.setdefault(k, [0, 0])
        by[k][0] += 1
        by[k][1] += int(s.get("units_run") or 0)
    unended = sum("ended" not in s for s in sittings)
    tail = (f"; {unended} with no end record (stopped at once or cut off): their units are journalled but not "
            "counted here") if unended else ""
    return f"{len(sittings)} (" + "; ".join(
        f"{n} on {dev} × {t} thread(s): {u:,} units" for (dev, t), (n, u) in sorted(by.items(), key=str)) + tail + ")"


def unit_threads(run_dir: RunDir, units: Sequence[Unit]) -> dict[str, int]:
    """The torch threads each of ``units`` (the run's plan, in plan order) ran with, by unit key, from the recorded
    sittings: a run works through its plan in order, so a unit ran in the sitting that started at the latest plan
    position at or before it. Units before the first recorded sitting, and every unit of a run without
    ``sittings.jsonl``, get the threads ``provenance.json`` records. (A resume with ``--retry-failed`` starts earlier
    in the plan: the failed units it reruns are counted with the sitting before it.)"""
    index = {u.key(): i for i, u in enumerate(units)}
    default = int(run_dir.provenance().get("threads", 1))
    starts = sorted((index[s["first_unit"]], n, int(s.get("threads") or default))
                    for n, s in enumerate(run_dir.sittings()) if s.get("first_unit") in index)
    out, at, threads = {}, 0, default
    for i, u in enumerate(units):
        while at < len(starts) and starts[at][0] <= i:
            threads = starts[at][2]
            at += 1
        out[u.key()] = threads
    return out


@dataclass(frozen=True)
class StudyProgress:
    """A run directory's progress.

    Attributes:
        run_dir: the run directory.
        stages: one row per stage of the plan in run order: ``stage``, ``total``, ``done``, ``failed``,
            ``timed`` (finished units whose journal records their seconds), ``threads`` (the sorted torch thread
            counts the finished units ran with, :func:`unit_threads`), ``seconds_mean`` (journal seconds per timed
            unit; null before any), ``hours_spent`` (those seconds summed), ``cpu_hours_spent`` (each unit's
            seconds × its sitting's torch threads, :func:`unit_threads`),
            ``hours_left`` (units left × ``seconds_mean``; null when the stage has no finished unit to
            measure by).
        sittings: :meth:`locedit.rundir.RunDir.sittings` as recorded.
    """

    run_dir: str
    stages: pl.DataFrame
    sittings: list[dict[str, Any]]

    @property
    def total(self) -> int:
        return int(self.stages["total"].sum())

    @property
    def done(self) -> int:
        return int(self.stages["done"].sum())

    def text(self) -> str:
        """A plain-text summary (what ``locedit status`` prints)."""
        left = [h for h in self.stages["hours_left"].to_list() if h is not None]
        unmeasured = self.stages.filter(pl.col("hours_left").is_null() & (pl.col("done") < pl.col("total")))
        share = 100 * self.done / max(self.total, 1)
        lines = [f"{self.run_dir}: {self.done:,} / {self.total:,} units ({share:.1f} %), "
                 f"{int(self.stages['failed'].sum())} failed"]
        width = max(len(s) for s in self.stages["stage"].to_list())
        lines.append(f"  {'stage':<{width}}  {'done / total':>15}  {'s / unit':>8}  {'left (h, at that rate)':>22}")
        for r in self.stages.iter_rows(named=True):
            sec = "–" if r["seconds_mean"] is None else f"{r['seconds_mean']:.1f}"
            hl = "–" if r["hours_left"] is None else f"{r['hours_left']:.1f}"
            fail = f" ({r['failed']} failed)" if r["failed"] else ""
            lines.append(f"  {r['stage']:<{width}}  {r['done']:>6,} / {r['total']:<6,}  {sec:>8}  {hl:>22}{fail}")
        est = f"{sum(left):.1f} h at the measured rates"
        if unmeasured.height:
            est += f", plus {int((unmeasured['total'] - unmeasured['done']).sum()):,} units of stages not measured yet"
        spent = float(self.stages["hours_spent"].sum())
        cpu = float(self.stages["cpu_hours_spent"].sum())
        lines.append(f"  spent: {spent:.1f} h of unit time (the journal's seconds, summed; {cpu:.1f} CPU-hours at "
                     f"each sitting's torch threads); left: {est}")
        lines.append(f"  sittings: {sittings_line(self.sittings)}")
        return "\n".join(lines)


def study_progress(run_dir: str | Path | RunDir, *, stage_prefix: str = "") -> StudyProgress:
    """The progress of ``run_dir`` (every shard's journals), from its recorded plan; ``stage_prefix`` is put before
    each stage's name (``docs/FINDINGS.md`` names each companion study's stages after it).

    Raises:
        ValueError: the directory has no recorded plan (the run never started).
    """
    rd = (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).require()
    prov = rd.provenance()
    if "plan" not in prov:
        raise ValueError(f"{rd.path}/provenance.json records no plan: the run never started a unit")
    plan = StudyPlan.from_json(prov["plan"], rd.config(), rd.fact_ids())
    units = plan.units()
    seconds: dict[str, float] = {}
    for table in ("tracing", "edits"):
        for r in rd.records(table):
            s = r.get("seconds")
            seconds[r["key"]] = math.nan if s is None else float(s)
    failed = {r["key"] for r in rd.records("failures")} - set(seconds)
    threads = unit_threads(rd, units)
    rows: dict[str, dict[str, Any]] = {}
    for u in units:
        row = rows.setdefault(u.stage, {"stage": stage_prefix + u.stage, "total": 0, "done": 0, "failed": 0,
                                        "_s": [], "_cpu": 0.0, "_threads": set()})
        row["total"] += 1
        k = u.key()
        if k in seconds:
            row["done"] += 1
            row["_threads"].add(threads[k])
            if not math.isnan(seconds[k]):
                row["_s"].append(seconds[k])
                row["_cpu"] += seconds[k] * threads[k]
        elif k in failed:
            row["failed"] += 1
    out = []
    for row in rows.values():
        s, cpu, ran_with = row.pop("_s"), row.pop("_cpu"), row.pop("_threads")
        mean = sum(s) / len(s) if s else None
        left = row["total"] - row["done"] - row["failed"]
        out.append({**row, "timed": len(s), "threads": sorted(ran_with), "seconds_mean": mean,
                    "hours_spent": sum(s) / 3600, "cpu_hours_spent": cpu / 3600,
                    "hours_left": None if mean is None else left * mean / 3600})
    schema = {"stage": pl.String, "total": pl.Int64, "done": pl.Int64, "failed": pl.Int64, "timed": pl.Int64,
              "threads": pl.List(pl.Int64), "seconds_mean": pl.Float64, "hours_spent": pl.Float64,
              "cpu_hours_spent": pl.Float64, "hours_left": pl.Float64}
    return StudyProgress(str(rd.path), pl.DataFrame(out, schema=schema), rd.sittings())


def _plan_and_finished(rd: RunDir) -> tuple[StudyPlan, set[str]] | None:
    """The recorded plan and the keys of the units that finished (journalled or failed; a failed unit will not be
    retried by a plain resume), or None for a run that records no plan."""
    prov = rd.provenance()
    if "plan" not in prov:
        return None
    plan = StudyPlan.from_json(prov["plan"], rd.config(), rd.fact_ids() or [])
    finished = {r["key"] for table in ("tracing", "edits", "failures") for r in rd.records(table)}
    return plan, finished


def incomplete_cells(*run_dirs: str | Path | RunDir) -> dict[tuple[str, str, str], str]:
    """The analysis cells (localization × problem × method, edits at the method's own token as in the paper's
    analysis) whose planned units have not all finished, each with a sentence saying how far it is ("PROBLEM ×
    METHOD: 72 of 100 planned facts edited").

    A pre-registered test is defined on its planned facts: :func:`locedit.stats.preregistered.preregistered_analysis`
    withholds the tests of these cells rather than show an interim look the plan does not declare. A cell is
    finished when every unit of it is journalled or failed (failures are reported, not retried by a plain resume).
    Companion runs are merged: a cell is incomplete when any run that plans units of it has not finished them. Runs
    that record no plan (before run format 3) contribute nothing.
    """
    trace_facts: dict[str, list[set[str]]] = {}  # localization -> [planned facts, facts not finished]
    edit_facts: dict[tuple[str, str], list[set[str]]] = {}
    for d in run_dirs:
        got = _plan_and_finished(d if isinstance(d, RunDir) else RunDir(d).require())
        if got is None:
            continue
        plan, finished = got
        for u in plan.units():
            if isinstance(u, TraceUnit):
                cell = trace_facts.setdefault(u.localization, [set(), set()])
            elif isinstance(u, EditUnit) and u.token in (None, DEFAULT_EDIT_TOKEN):
                cell = edit_facts.setdefault((u.problem, u.method), [set(), set()])
            else:
                continue
            cell[0].add(u.fact_id)
            if u.key() not in finished:
                cell[1].add(u.fact_id)
    out: dict[tuple[str, str, str], str] = {}
    for loc, (planned_l, open_l) in trace_facts.items():
        for (problem, method), (planned_e, open_e) in edit_facts.items():
            parts = []
            if open_e:
                parts.append(f"{problem} × {method}: {len(planned_e) - len(open_e)} of {len(planned_e)} planned "
                             "facts edited")
            if open_l:
                parts.append(f"{loc} localization: {len(planned_l) - len(open_l)} of {len(planned_l)} planned "
                             "facts localized")
            if parts:
                out[(loc, problem, method)] = "; ".join(parts)
    return out
