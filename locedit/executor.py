"""Run a study on Ray: one study across many CPUs, GPUs or machines, with the same rows as one process.

Design (``locedit run CONFIG --executor ray``):

* **Actors** (:class:`StudyWorker`) each load the model once (from the shared ``$LOCEDIT_CACHE`` when the directory
  is shared, else building their own) and the dataset, and run *whole facts* — all of a fact's units in run order,
  through the one unit runner :func:`locedit.study.run_unit` — so per-fact state (context templates, essence texts,
  key statistics) is reused. Fact selection (the known filter) runs on the actors too, in chunks.
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
import random
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from locedit.config import StudyConfig, check_against_model
from locedit.journal import Journal
from locedit.study import (
    _FILTER_CHUNK,
    StudySummary,
    TableFlusher,
    _check_provenance,
    _journal_path,
    _prepare_run_dir,
    _setup_log,
    lock_run_dir,
    todo_units,
)

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

        from locedit.config import parse_config
        from locedit.study import _nested
        from locedit.problems import load_dataset
        from locedit.tracer import load_model

        if threads:
            torch.set_num_threads(threads)
        self.config: StudyConfig = parse_config(_nested(config))
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
        """n_layers and the provenance of this actor's process (versions, threads, device, hyper-parameters)."""
        from locedit.study import provenance

        return {"n_layers": self.model.cfg.n_layers, "provenance": provenance(self.config, self.model),
                "name": self.name, "node": self.node}

    def mask(self, fact_ids: list[str]) -> list[bool]:
        """The data filter's verdict for each fact (known: the 36-token greedy filter; cached on disk)."""
        from locedit.problems.filters import known_mask, min_target_prob_mask

        facts = [self.by_id[i] for i in fact_ids]
        if self.config.data.filter == "none":
            return [True] * len(facts)
        mask = known_mask if self.config.data.filter == "known" else min_target_prob_mask
        return list(mask(self.model, facts))

    def run_fact(self, fact_id: str, units: list[tuple[str, str, tuple]]) -> dict[str, Any]:
        """All of one fact's units, in order: ``(table, record)`` per unit, with the actor and node."""
        from locedit.study import run_unit

        fact = self.by_id[fact_id]
        out = [run_unit(self.model, fact, table, key, tuple(spec), self.config, self.dataset)
               for table, key, spec in units]
        return {"fact_id": fact_id, "results": out, "actor": self.name, "node": self.node}


def _select_on_actors(ray, actors: list, config: StudyConfig, dataset: list) -> list:
    """:func:`locedit.study.select_facts` with the filter's chunks spread over the actors: the same facts in the same
    order (chunks are judged in waves of one per actor and taken in dataset order)."""
    facts = list(dataset)
    random.Random(config.data.seed).shuffle(facts)
    want = config.data.sample if config.data.sample is not None else len(facts)
    if config.data.filter == "none":
        return facts[:want]
    chunks = [facts[lo : lo + _FILTER_CHUNK] for lo in range(0, len(facts), _FILTER_CHUNK)]
    out: list = []
    for w in range(0, len(chunks), len(actors)):
        wave = chunks[w : w + len(actors)]
        masks = ray.get([a.mask.remote([f.id for f in c]) for a, c in zip(actors, wave)])
        for chunk, mask in zip(wave, masks):
            out += [f for f, ok in zip(chunk, mask) if ok]
        if len(out) >= want:
            break
    return out[:want]


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
    try:
        info = ray.get(pool[0].info.remote())
        check_against_model(config, info["n_layers"])
        from locedit.problems import load_dataset

        dataset = load_dataset(config.data.dataset)
        lock = lock_run_dir(run_dir)
        fact_ids = _prepare_run_dir(run_dir, config, lambda: _select_on_actors(ray, pool, config, dataset))
        _setup_log(run_dir)
        _check_provenance(run_dir, info["provenance"])
        study_ids = fact_ids
        if limit is not None:
            fact_ids = fact_ids[:limit]
        units, todo = todo_units(run_dir, config, fact_ids, info["n_layers"], retry_failed, study_ids)
        log.info("study %s on Ray: %d actors (%s cpus, %s gpus each), %d facts, %d units, %d to do", config.name,
                 actors, cpus_per_actor, gpus_per_actor, len(fact_ids), len(units), len(todo))
        # one actor call per run of consecutive units of one fact in run order: a whole fact in "fact" order, one
        # (stage, fact) in "stage" order -- so the stages finish in order here too
        batches: list[tuple[str, list]] = []
        for u in todo:
            if batches and batches[-1][0] == u[2][0]:
                batches[-1][1].append(u)
            else:
                batches.append((u[2][0], [u]))
        queue = deque(range(len(batches)))
        journals = {t: Journal(_journal_path(run_dir, t, (0, 1))) for t in ("tracing", "edits", "failures")}
        flusher = TableFlusher(run_dir, flush_seconds)
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
                ref = pool[a].run_fact.remote(fid, [(t, k, list(spec)) for t, k, spec in batch])
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
                if tries[b] <= max_fact_retries:
                    queue.appendleft(b)
                else:
                    for _, key, _spec in batches[b][1]:
                        journals["failures"].append({"key": key, "stage": "actor", "fact_id": fid,
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
        return StudySummary(str(run_dir), len(fact_ids), (0, 1), n_done, len(units) - len(todo), n_failed,
                            time.perf_counter() - start)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping the actors; finished units are kept")
        from locedit.study import collect_tables

        if (run_dir / "journal").is_dir():
            collect_tables(run_dir)
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

