"""How the study's bookkeeping scales (issue 17), measured side by side in one run:

* the Parquet flush (``locedit.rundir.RunDir.collect``: read every journal line, build the tables, write them) at
  10^3, 10^4 and 10^5 synthetic edit records — linear in the study's size (the serial and Ray runners now flush on a
  time interval, default 60 s, instead of every 25 units, which made the total flush cost quadratic);
* the old policy's total flush cost (a flush every 25 units) vs the new one's over a simulated 10^4-unit study;
* the Ray driver's own work per returned unit (journal append with fsync, log line, progress bar): target < 5 ms.

    .venv/bin/python benchmarks/bench_study_scale.py
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from locedit.journal import Journal
from locedit.rundir import RunDir

FIELDS = ["rewrite_score", "paraphrase_score", "neighborhood_score", "overall_score", "overall_hmean", "essence_score",
          "paraphrase_score_first", "neighborhood_score_first", "p_rewrite_pre", "p_rewrite_post", "p_paraphrase_pre",
          "p_paraphrase_post", "p_neighborhood_pre", "p_neighborhood_post", "ppl_pre", "ppl_post", "efficacy_success",
          "efficacy_magnitude", "paraphrase_success", "paraphrase_magnitude", "neighborhood_success",
          "neighborhood_magnitude", "meng_score", "update_norm", "fluency_pre", "fluency_post", "edit_seconds",
          "seconds"]


def record(i: int, rng: random.Random) -> dict:
    layer = (i % 6) * 5
    rec = {"key": f"edit|cf:{i // 6}|error_injection|rome|L{layer}|Tsubject_last", "fact_id": f"cf:{i // 6}",
           "problem": "error_injection", "method": "rome", "layer": layer, "layers": [layer], "token": "subject_last",
           "token_index": 7, "target": " English", "objective": "maximize", "n_paraphrases": 2, "n_neighborhood": 10}
    rec.update({f: rng.random() for f in FIELDS})
    return rec


def write_journal(run: Path, n: int) -> None:
    (run / "journal").mkdir(parents=True)
    rng = random.Random(0)
    with open(run / "journal" / "edits.shard-0-of-1.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps(record(i, rng)) + "\n")


def flush_seconds(n: int, repeats: int = 3) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        write_journal(run, n)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            RunDir(run).collect()
            best = min(best, time.perf_counter() - t)
        return best


def driver_ms_per_unit(n: int = 2000) -> float:
    log = logging.getLogger("bench.driver")
    with tempfile.TemporaryDirectory() as tmp:
        h = logging.FileHandler(Path(tmp) / "study.log")
        log.addHandler(h), log.setLevel(logging.INFO)
        journal = Journal(Path(tmp) / "edits.jsonl")
        rng = random.Random(0)
        recs = [record(i, rng) for i in range(n)]
        bar = tqdm(total=n, disable=True)
        t = time.perf_counter()
        for rec in recs:
            journal.append(rec)
            log.info("unit %s done on %s (node %s)", rec["key"], "actor 1234abcd pid 42", "node0000")
            bar.update(1)
        dt = time.perf_counter() - t
        log.removeHandler(h)
        return 1000 * dt / n


def main() -> None:
    sizes = (1_000, 10_000, 100_000)
    cost = {n: flush_seconds(n) for n in sizes}
    print("flush (RunDir.collect) of n edit records, best of 3:")
    for n in sizes:
        print(f"  n = {n:>7,}: {cost[n]:7.3f} s   ({1e6 * cost[n] / n:6.1f} µs per record)")
    print(f"  growth 10^3 -> 10^4: {cost[10_000] / cost[1_000]:.1f}x, 10^4 -> 10^5: {cost[100_000] / cost[10_000]:.1f}x"
          " (linear: 10x)")
    # total flush work over a whole study, simulated on a virtual clock with the measured per-record cost: the old
    # policy (a rewrite every 25 units) vs the new one (TableFlusher: >= 60 s apart and >= 20x the last rewrite)
    per_record = cost[100_000] / 100_000

    def total(n_units: int, unit_s: float, policy: str) -> float:
        clock = last = spent = last_cost = 0.0
        for done in range(1, n_units + 1):
            clock += unit_s
            due = done % 25 == 0 if policy == "every 25" else clock - last >= max(60.0, 20 * last_cost)
            if due:
                last_cost = per_record * done
                spent += last_cost
                clock += last_cost
                last = clock
        return spent

    for unit_s in (5.0, 0.5):
        print(f"total rewrite time of a study at {unit_s} s per unit (simulated):")
        for n in sizes:
            old, new = total(n, unit_s, "every 25"), total(n, unit_s, "time")
            print(f"  n = {n:>7,}: every 25 units {old:9.1f} s ({100 * old / (n * unit_s):5.1f} % of the run) | "
                  f"interval {new:7.1f} s ({100 * new / (n * unit_s):4.1f} %)")
    print(f"Ray driver work per returned unit (journal append + fsync, log line, progress): {driver_ms_per_unit():.2f} ms"
          " (target < 5 ms)")


if __name__ == "__main__":
    main()
