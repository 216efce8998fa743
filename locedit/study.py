"""The batch study: trace facts, edit them under every (problem, method, layer, token), and keep every finished unit.

:func:`run_study` validates the config against the model, selects the facts (:func:`select_facts`, once per run
directory), resolves the plan (:func:`locedit.plan.resolve_plan`, once per run directory: σ, hyper-parameters,
tokens, key statistics) and runs the plan's units in a fixed order through :func:`run_unit`, appending each result
to the run directory's journals (:class:`locedit.rundir.RunDir`). A unit is skipped when its key is already in a
journal (finished, or failed unless ``retry_failed``). Killing the process at any point and calling
:func:`run_study` again on the same directory therefore finishes with exactly the rows of an uninterrupted run.
:func:`locedit.executor.run_study_ray` runs the same units on Ray actors.
"""

from __future__ import annotations

import logging
import random
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from locedit.config import StudyConfig, check_against_model
from locedit.editors.methods import resolve_method
from locedit.plan import EditUnit, StudyPlan, TraceUnit, Unit, resolve_plan
from locedit.rundir import TABLES, RunDir, collect_tables, fact_digests
from locedit.stopping import stop_on_signal

__all__ = ["StudySummary", "TableFlusher", "collect_tables", "provenance", "run_study", "run_unit", "select_facts"]

log = logging.getLogger("locedit.study")

FILTER_CHUNK = 32  # facts judged per cached data-filter call while sampling


@dataclass(frozen=True)
class StudySummary:
    run_dir: str
    n_facts: int
    shard: tuple[int, int]
    done: int
    skipped: int
    failed: int
    seconds: float
    stopped: int | None = None  # the signal that stopped the run at a fact boundary, or None (it ran to the end)


# ---------------------------------------------------------------- data selection


def data_mask(model, config: StudyConfig, facts: Sequence) -> list[bool]:
    """The config's data filter's verdict for each fact (``known``: the 36-token greedy filter; cached on disk)."""
    from locedit.problems.filters import known_mask, min_target_prob_mask

    if config.data.filter == "none":
        return [True] * len(facts)
    mask = known_mask if config.data.filter == "known" else min_target_prob_mask
    return list(mask(model, list(facts)))


def select_facts(config: StudyConfig, dataset: Sequence,
                 judge: Callable[[list[list]], list[list[bool]]], wave: int = 1) -> list:
    """Shuffle the dataset with ``data.seed`` and keep, in that order, the first ``data.sample`` facts passing
    ``data.filter``. The filter runs lazily on chunks of :data:`FILTER_CHUNK` facts, ``wave`` chunks at a time
    (``judge(chunks) -> masks``: one chunk per call in a serial run, one per actor on Ray), so a 20-fact study does
    not decode 3,284 prompts; the result does not depend on ``wave``."""
    facts = list(dataset)
    random.Random(config.data.seed).shuffle(facts)
    want = config.data.sample if config.data.sample is not None else len(facts)
    if config.data.filter == "none":
        return facts[:want]
    chunks = [facts[lo : lo + FILTER_CHUNK] for lo in range(0, len(facts), FILTER_CHUNK)]
    out: list = []
    for w in range(0, len(chunks), wave):
        part = chunks[w : w + wave]
        for chunk, mask in zip(part, judge(part)):
            out += [f for f, ok in zip(chunk, mask) if ok]
        if len(out) >= want:
            break
    return out[:want]


# ---------------------------------------------------------------- units


def _trace_record(model, fact, unit: TraceUnit, plan: StudyPlan, dataset) -> dict[str, Any]:
    """One localization grid (:func:`problems.localize.localize`); flip partners come from the whole dataset."""
    from locedit.problems.localize import flip_partners, localize

    loc = plan.config.localization
    partners = flip_partners(model, fact, dataset, loc.flips, loc.seed) if unit.localization == "flip" else ()
    res = localize(model, fact, unit.localization, kind=unit.kind, window=unit.window, noise=plan.noise,
                   partners=partners)
    return {"fact_id": fact.id, "localization": unit.localization, **res.to_record()}


def _edit_record(model, fact, unit: EditUnit, plan: StudyPlan, memo: dict | None = None) -> dict[str, Any]:
    from locedit.editors import key_second_moment
    from locedit.editors.targets import TargetMemo
    from locedit.problems.run import pre_edit, run_edit

    n = plan.covariance_tokens
    ed = plan.config.editing
    pre = targets = None
    if memo is not None:  # what a fact's edits share: pre-edit scores per problem, v*/z optimisations
        if memo.get("fact") != fact.id:
            memo.clear()
            memo["fact"] = fact.id
            memo["targets"] = TargetMemo(plan.target_groups)
        if unit.problem not in memo:
            memo[unit.problem] = pre_edit(model, fact, unit.problem, plan.noise, essence=ed.essence,
                                          generation=ed.generation, checkpoint_layers=plan.scoring_checkpoints,
                                          edit_samples=ed.forcing_edit_samples)
        pre, targets = memo[unit.problem], memo["targets"]
    outcome = run_edit(
        model, fact, unit.problem, unit.method, unit.layer, hparams=plan.hparams[(unit.problem, unit.method)],
        covariance=lambda m, layer: key_second_moment(m, layer, n_tokens=n, progress=False),
        noise=plan.noise, essence=ed.essence, edit_samples=ed.forcing_edit_samples, generation=ed.generation,
        token=unit.token, pre=pre, targets=targets,
    )
    return outcome.as_row()


def run_unit(model, fact, unit: Unit, plan: StudyPlan, dataset, memo: dict | None = None) -> tuple[str, dict]:
    """Run one unit with the plan's resolved values: ``(table, record)`` on success, ``("failures", failure
    record)`` when it raises (one bad record never stops a run). The one unit runner of both executors. ``memo``:
    a dict the caller owns across units, holding what the current fact's edits share — its pre-edit scores
    (:func:`problems.run.pre_edit`) and its v*/z optimisations (:class:`editors.targets.TargetMemo`: ROME and
    r-ROME share v*, and a fact's layers are optimised as one batch); None recomputes everything per edit (the
    one-edit-at-a-time path, kept for parity and ``benchmarks/bench_study.py``)."""
    t0 = time.perf_counter()
    key = unit.key()
    try:
        rec = (_trace_record(model, fact, unit, plan, dataset) if isinstance(unit, TraceUnit)
               else _edit_record(model, fact, unit, plan, memo))
    except Exception as e:
        log.error("unit %s failed: %s\n%s", key, e, traceback.format_exc())
        return "failures", {"key": key, "stage": unit.table, "fact_id": fact.id, "error_type": type(e).__name__,
                            "error": str(e)}
    rec["key"] = key
    rec["seconds"] = rec.get("seconds", time.perf_counter() - t0)
    return unit.table, rec


# ---------------------------------------------------------------- run


def provenance(model) -> dict[str, Any]:
    """What produced a run's rows besides its plan: package versions, torch threads and device, the seeds fixed in
    code (context templates, essence/fluency sampling), the registered edit methods."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from locedit.editors.methods import EDIT_METHODS

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "versions": {pkg: v(pkg) for pkg in ("locedit", "torch", "transformer-lens", "transformers", "polars",
                                             "statsmodels")} | {"python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "device": str(model.cfg.device),
        "model": {"name": model.cfg.model_name, "n_layers": model.cfg.n_layers},
        "edit_methods": sorted(EDIT_METHODS),
        "seeds": {"context_templates": 0, "essence": 0, "fluency": 0},
    }


def study_inputs(config: StudyConfig, fact_ids: Sequence[str], dataset: Sequence) -> dict[str, Any]:
    """What a resume must find unchanged besides the config: the dataset's name and each study fact's content
    hash. ``ValueError`` naming them when ``facts.json`` lists facts the dataset does not have."""
    by_id = {f.id: f for f in dataset}
    missing = [i for i in fact_ids if i not in by_id]
    if missing:
        raise ValueError(f"facts.json names {len(missing)} fact(s) that dataset {config.data.dataset!r} does not have "
                         f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    return {"dataset": config.data.dataset, "facts": fact_digests(by_id[i] for i in fact_ids)}


def prepare(run_dir: RunDir, config: StudyConfig, model, select: Callable[[], Sequence],
            prov: dict[str, Any], dataset: Sequence,
            resolve: Callable[[Sequence[str]], StudyPlan] | None = None) -> StudyPlan:
    """Start or resume ``run_dir`` (the caller holds its lock): config checked or written, damaged compressed
    journals repaired, facts selected once and their content checked at every resume, the plan resolved once and
    recorded (a resume reads it back). ``resolve(fact_ids)``: how the plan is resolved (default
    :func:`locedit.plan.resolve_plan` with ``model``; the Ray executor resolves on an actor)."""
    run_dir.start(config)
    run_dir.repair()
    fact_ids = run_dir.fix_fact_ids(lambda: [f.id for f in select()])
    run_dir.setup_log()
    prov = {**prov, "inputs": study_inputs(config, fact_ids, dataset)}
    resolve = resolve or (lambda ids: resolve_plan(config, model, ids))
    return run_dir.fix_plan(lambda: resolve(fact_ids), prov)


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
    journal line once: linear in the study's size) and at the end."""
    i, n = shard
    if not (0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    start = time.perf_counter()
    rd = RunDir(run_dir)
    if rd.config_path.exists():
        rd.schema_version(check=True)  # an older run: one line, before the model loads
    if model is None:
        from locedit.tracer import load_model

        model = load_model(config.model)
    check_against_model(config, model.cfg.n_layers)  # before anything is written
    from locedit.problems import load_dataset

    dataset = load_dataset(config.data.dataset)
    lock = rd.lock(shard)
    try:
        prov = provenance(model)
        plan = prepare(rd, config, model, lambda: select_facts(config, dataset, lambda chunks: [
            data_mask(model, config, c) for c in chunks]), prov, dataset)
        units = plan.units(limit, shard)
        todo = rd.todo(units, retry_failed)
        key_statistics(model, plan, todo, progress)
        by_id = {f.id: f for f in dataset}
        journals = {t: rd.journal(t, shard) for t in TABLES}
        log.info("study %s shard %d/%d: %d facts, %d units, %d to do (sigma %.4f)", config.name, i, n,
                 len({u.fact_id for u in units}), len(units), len(todo), plan.noise.sigma)
        n_done = n_failed = 0
        bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="study", unit="unit", disable=not progress)
        flusher = TableFlusher(rd, flush_seconds)
        memo: dict = {}
        sitting = rd.begin_sitting(executor="serial", shard=shard, provenance=prov, units=len(units), todo=todo)
        last = None
        with stop_on_signal() as stop:
            for k, unit in enumerate(todo):
                last = unit.key()
                bar.set_postfix_str(last)
                out, rec = run_unit(model, by_id[unit.fact_id], unit, plan, dataset, memo)
                journals[out].append(rec)
                n_failed += out == "failures"
                n_done += out != "failures"
                bar.update(1)
                flusher.maybe()
                if stop.signal is not None and (k + 1 == len(todo) or todo[k + 1].fact_id != unit.fact_id):
                    log.warning("stopped after %d units (fact %s done); rerun to resume", n_done + n_failed,
                                unit.fact_id)
                    break
        bar.close()
        flusher.final()
        rd.end_sitting(sitting, units_run=n_done + n_failed, failed=n_failed, last_unit=last,
                       stopped=None if stop.signal is None else signal.Signals(stop.signal).name,
                       seconds=time.perf_counter() - start)
        return StudySummary(str(rd.path), len({u.fact_id for u in units}), shard, n_done, len(units) - len(todo),
                            n_failed, time.perf_counter() - start, stop.signal)
    finally:
        lock.release()


def key_statistics(model, plan: StudyPlan, todo: Sequence[Unit], progress: bool = True) -> None:
    """The key second moments of every layer the remaining edits read, in one corpus pass up to the highest of them
    (cached on disk, where every edit then finds them), before the first edit -- instead of one pass per layer as
    each layer's first edit reaches it (1 + 6 + ... + 26 = 81 block-passes for layers 0..25 instead of 26)."""
    from locedit.editors import key_second_moments

    if plan.key_layers and any(isinstance(u, EditUnit) and resolve_method(u.method, aliases=False).key_statistics
                               for u in todo):
        t0 = time.perf_counter()
        key_second_moments(model, plan.key_layers, n_tokens=plan.covariance_tokens, progress=progress)
        log.info("key statistics of layers %s (%d tokens): %.1f s", list(plan.key_layers), plan.covariance_tokens,
                 time.perf_counter() - t0)


class TableFlusher:
    """Rewrites the Parquet tables from the journals (:meth:`RunDir.collect`, linear in the journal's size) on a
    time interval and on :meth:`final`: at least ``seconds`` apart, and at least ``ratio`` × the last rewrite's own
    duration apart, so rewriting costs at most 1/(ratio + 1) of the run's time and the total stays linear in the
    number of units (a rewrite every 25 units was quadratic; ``benchmarks/bench_study_scale.py``)."""

    def __init__(self, run_dir: RunDir, seconds: float = 60.0, ratio: float = 20.0):
        self.run_dir, self.seconds, self.ratio = run_dir, seconds, ratio
        self.last, self.cost = time.monotonic(), 0.0

    def due(self, now: float) -> bool:
        return now - self.last >= max(self.seconds, self.ratio * self.cost)

    def maybe(self) -> None:
        if self.due(time.monotonic()):
            self.final()

    def final(self) -> None:
        t = time.monotonic()
        self.run_dir.collect()
        self.last = time.monotonic()
        self.cost = self.last - t
