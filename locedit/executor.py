"""Run a study on Ray: one study across many CPUs, GPUs or machines, with the same rows as one process.

Design (``locedit run CONFIG --executor ray``):

* **Actors** (:class:`StudyWorker`) each load the model once (from the shared ``$LOCEDIT_CACHE`` when the directory
  is shared, else building their own) and the dataset, and run *whole facts* — all of a fact's units in run order,
  through the one unit runner :func:`locedit.study.run_unit` with the driver's resolved plan — so per-fact state
  (context templates, essence texts, key statistics) is reused and nothing is re-resolved on an actor. Fact
  selection (:func:`locedit.study.select_facts`) runs its filter's chunks on the actors, one wave per actor count.
* **The driver is the only writer** of the run directory: it appends every returned record to the journal (shard
  0/1's files) in order of arrival, keyed as in a serial run, so a resume — serial or Ray, any actor count — skips
  finished units and never duplicates one. It holds shard 0/1's lock: a serial run of the same directory cannot run
  at the same time.
* **Faults**: an actor that dies (killed process, OOM, lost node) is replaced and its unfinished fact re-queued (up
  to ``max_fact_retries`` times); a unit that raises is journaled as a failure, as in a serial run; Ctrl-C stops
  the actors and keeps everything finished.
* **Progress**: one tqdm bar (units done / total, failures, units per minute per actor); ``study.log`` names the
  actor and node of every unit. Parquet tables are rewritten on a time interval and at the end.

Without ``ray`` installed, :class:`RayUnavailableError` says how to install it (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from locedit.config import StudyConfig, check_against_model, parse_config
from locedit.plan import StudyPlan, parse_key
from locedit.rundir import TABLES, RunDir
from locedit.study import StudySummary, TableFlusher, data_mask, prepare, select_facts

__all__ = ["RayUnavailableError", "StudyWorker", "run_study_ray"]

log = logging.getLogger("locedit.study")


class RayUnavailableError(RuntimeError):
    """``--executor ray`` without the ``ray`` package."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            'the Ray executor needs ray: pip install -e ".[ray]" (or: pip install "ray>=2.9"); '
            "without it, run shards with --shard i/n"
        ) from None
    return ray


class StudyWorker:
    """One Ray actor: a model and the dataset, loaded once; runs whole facts and fact-selection chunks."""

    def __init__(self, config: dict, device: str | None, threads: int | None):
        import torch

        from locedit.problems import load_dataset
        from locedit.tracer import load_model

        if threads:
            torch.set_num_threads(threads)
        self.config: StudyConfig = parse_config(config)
        self.plan: StudyPlan | None = None
        self.memo: dict = {}  # what the current fact's edits share: pre-edit scores, v*/z (study.run_unit)
        self.model = load_model(self.config.model, device=device)
        self.dataset = load_dataset(self.config.data.dataset)
        self.by_id = {f.id: f for f in self.dataset}
        self.name = f"pid {os.getpid()}"
        try:
            import ray

            ctx = ray.get_runtime_context()
            self.name = f"actor {ctx.get_actor_id()[:8]} pid {os.getpid()}"
            self.node = ctx.get_node_id()[:8]
        except Exception:  # noqa: BLE001  (outside Ray: a plain object in tests)
            self.node = "local"

    def info(self) -> dict[str, Any]:
        """n_layers and the provenance of this actor's process (versions, threads, device)."""
        from locedit.study import provenance

        return {"n_layers": self.model.cfg.n_layers, "provenance": provenance(self.model),
                "name": self.name, "node": self.node}

    def resolve(self, fact_ids: list[str]) -> dict[str, Any]:
        """The plan this actor's model resolves (the driver records it at a run's first start)."""
        from locedit.plan import resolve_plan

        return resolve_plan(self.config, self.model, fact_ids).to_json()

    def set_plan(self, plan: dict[str, Any], fact_ids: list[str]) -> None:
        """Run every unit with the driver's plan (recorded in provenance.json), not a re-resolved one."""
        self.plan = StudyPlan.from_json(plan, self.config, fact_ids)

    def key_statistics(self, keys: list[str]) -> None:
        """The key statistics the units ``keys`` read, in one pass, into the (shared) cache before they run."""
        from locedit.study import key_statistics

        key_statistics(self.model, self.plan, [parse_key(k) for k in keys], progress=False)

    def mask(self, fact_ids: list[str]) -> list[bool]:
        """The data filter's verdict for each fact (known: the 36-token greedy filter; cached on disk)."""
        return data_mask(self.model, self.config, [self.by_id[i] for i in fact_ids])

    def run_fact(self, fact_id: str, keys: list[str]) -> dict[str, Any]:
        """All of one fact's units (journal keys), in order: ``(table, record)`` per unit, with the actor and node."""
        from locedit.study import run_unit

        if self.plan is None:
            raise RuntimeError("set_plan() before run_fact()")
        fact = self.by_id[fact_id]
        out = [run_unit(self.model, fact, parse_key(k), self.plan, self.dataset, self.memo) for k in keys]
        return {"fact_id": fact_id, "results": out, "actor": self.name, "node": self.node}


def run_study_ray(
    config: StudyConfig,
    run_dir: str | Path,
    *,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    threads_per_actor: int | None = None,
    device: str | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    flush_seconds: float = 60.0,
    max_fact_retries: int = 3,
    _kill_after: int | None = None,
) -> StudySummary:
    """Run (or resume) ``config`` in ``run_dir`` on ``actors`` Ray actors; same journal keys and rows as
    :func:`locedit.study.run_study`.

    Args:
        address: a running cluster (``"auto"``, ``"HOST:PORT"``); None starts a local Ray on this machine.
        gpus_per_actor, cpus_per_actor: each actor's Ray resources (a GPU actor loads the model on ``cuda``).
        threads_per_actor: torch threads per actor (default: ``cpus_per_actor`` rounded, at least 1).
        _kill_after: tests only — kill a busy actor after this many finished facts (fault injection).
    """
    ray = _ray()
    start = time.perf_counter()
    run_dir = Path(run_dir)
    if actors < 1:
        raise ValueError(f"--actors must be >= 1, got {actors}")
    threads = threads_per_actor or max(1, int(round(cpus_per_actor)))
    device = device or ("cuda" if gpus_per_actor > 0 else "cpu")
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.environ[k] for k in ("LOCEDIT_CACHE", "LOCEDIT_COVARIANCE_TOKENS", "HF_HUB_OFFLINE")
               if k in os.environ}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env} if env else None)
    remote = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=0)(StudyWorker)
    cfg_dict = config.to_dict()

    def spawn():
        return remote.remote(cfg_dict, device, threads)

    pool = [spawn() for _ in range(actors)]
    lock = None
    rd = RunDir(run_dir)
    try:
        if rd.config_path.exists():
            rd.schema_version(check=True)
        info = ray.get(pool[0].info.remote())
        check_against_model(config, info["n_layers"])
        from locedit.problems import load_dataset

        dataset = load_dataset(config.data.dataset)
        lock = rd.lock()

        def judge(chunks):
            return ray.get([a.mask.remote([f.id for f in c]) for a, c in zip(pool, chunks)])

        plan = prepare(rd, config, None, lambda: select_facts(config, dataset, judge, wave=len(pool)),
                       info["provenance"], dataset, resolve=lambda ids: StudyPlan.from_json(  # on an actor: the model
                           ray.get(pool[0].resolve.remote(list(ids))), config, ids))
        ray.get([a.set_plan.remote(plan.to_json(), list(plan.fact_ids)) for a in pool])
        units = plan.units(limit)
        todo = rd.todo(units, retry_failed)
        ray.get(pool[0].key_statistics.remote([u.key() for u in todo]))  # one pass, before any actor edits
        n_facts = len({u.fact_id for u in units})
        # which units ran here: every journalled unit of this sitting is logged with its actor and node (study.log)
        sitting = rd.begin_sitting(executor="ray", shard=(0, 1), provenance=info["provenance"], units=len(units),
                                   todo=todo, actors=actors)
        log.info("study %s on Ray: %d actors (%s cpus, %s gpus each), %d facts, %d units, %d to do", config.name,
                 actors, cpus_per_actor, gpus_per_actor, n_facts, len(units), len(todo))
        # one actor call per run of consecutive units of one fact in run order: a whole fact in "fact" order, one
        # (stage, fact) in "stage" order -- so the stages finish in order here too
        batches: list[tuple[str, list]] = []
        for u in todo:
            if batches and batches[-1][0] == u.fact_id:
                batches[-1][1].append(u)
            else:
                batches.append((u.fact_id, [u]))
        queue = deque(range(len(batches)))
        journals = {t: rd.journal(t) for t in TABLES}
        flusher = TableFlusher(rd, flush_seconds)
        bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="study (ray)", unit="unit",
                   disable=not progress)
        inflight: dict = {}  # object ref -> (actor index, batch index)
        idle = list(range(len(pool)))
        tries: dict[int, int] = defaultdict(int)
        done_units: dict[int, int] = defaultdict(int)
        n_done = n_failed = facts_done = 0
        t0 = time.monotonic()

        def submit():
            while idle and queue:
                a, b = idle.pop(), queue.popleft()
                fid, batch = batches[b]
                ref = pool[a].run_fact.remote(fid, [u.key() for u in batch])
                inflight[ref] = (a, b)

        submit()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            a, b = inflight.pop(ref)
            fid = batches[b][0]
            try:
                res = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError) as e:
                tries[b] += 1
                log.warning("actor %d died while running %s (%s); replacing it and re-queueing the fact's units "
                            "(try %d)", a, fid, type(e).__name__, tries[b])
                pool[a] = spawn()
                ray.get(pool[a].set_plan.remote(plan.to_json(), list(plan.fact_ids)))
                if tries[b] <= max_fact_retries:
                    queue.appendleft(b)
                else:
                    for u in batches[b][1]:
                        journals["failures"].append({"key": u.key(), "stage": "actor", "fact_id": fid,
                                                     "error_type": type(e).__name__, "error": str(e)[:500]})
                        n_failed += 1
                        bar.update(1)
                idle.append(a)
                submit()
                continue
            for table, rec in res["results"]:
                journals[table].append(rec)
                n_failed += table == "failures"
                n_done += table != "failures"
                log.info("unit %s done on %s (node %s)%s", rec["key"], res["actor"], res["node"],
                         " FAILED" if table == "failures" else "")
            done_units[a] += len(res["results"])
            facts_done += 1
            bar.update(len(res["results"]))
            minutes = max(1e-9, (time.monotonic() - t0) / 60)
            bar.set_postfix_str(f"failed {n_failed}; units/min per actor "
                                + " ".join(f"{done_units[i] / minutes:.1f}" for i in range(len(pool))))
            flusher.maybe()
            idle.append(a)
            if _kill_after is not None and facts_done == _kill_after and inflight:
                victim = next(iter(inflight.values()))[0]
                log.warning("fault injection: killing actor %d", victim)
                ray.kill(pool[victim], no_restart=True)
            submit()
        bar.close()
        flusher.final()
        rd.end_sitting(sitting, units_run=n_done + n_failed, failed=n_failed,
                       last_unit=todo[-1].key() if todo else None, stopped=None, seconds=time.perf_counter() - start)
        return StudySummary(str(run_dir), n_facts, (0, 1), n_done, len(units) - len(todo), n_failed,
                            time.perf_counter() - start)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping the actors; finished units are kept")
        if rd.journal_dir.is_dir():
            rd.collect()
        raise
    finally:
        for actor in pool:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if lock is not None:
            lock.release()
        if started_here:
            ray.shutdown()

