"""Wall time of the same small study run serially and on Ray actors, side by side in one run (issue 17).

    .venv/bin/python benchmarks/bench_executors.py [--facts 4] [--actors 2] [--gpus-per-actor 0]

Runs, in fresh temporary run directories with the same config: serial with 1 torch thread, serial with 2 threads,
and Ray with ``--actors`` actors of 1 thread each (a local Ray; its start-up and the actors' model loads are part of
the Ray time, as they are for a user). Checks that the Ray rows equal the 1-thread serial rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import polars as pl
import torch

from locedit.config import parse_config
from locedit.executor import run_study_ray
from locedit.study import collect_tables, run_study
from locedit.tracer import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = ap.parse_args()
    config = parse_config({"study": {"name": "bench"}, "data": {"sample": args.facts, "seed": 0},
                           "localization": {"samples": 10},
                           "editing": {"layers": [5, 15, 25], "essence": False, "covariance_tokens": 10240}})
    model = load_model(config.model, device="cpu")
    times, tables = {}, {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        run = tempfile.mkdtemp(prefix=f"bench-serial{threads}-")
        t = time.perf_counter()
        run_study(config, run, model=model, progress=False)
        times[f"serial, {threads} thread(s)"] = time.perf_counter() - t
        tables[threads] = collect_tables(run)
    run = tempfile.mkdtemp(prefix="bench-ray-")
    t = time.perf_counter()
    run_study_ray(config, run, actors=args.actors, threads_per_actor=1, gpus_per_actor=args.gpus_per_actor,
                  progress=False)
    times[f"ray, {args.actors} actors × 1 thread"] = time.perf_counter() - t
    ray_edits = collect_tables(run)["edits"].sort("key")
    same = ray_edits.select("key", "rewrite_score").equals(tables[1]["edits"].sort("key").select("key", "rewrite_score"))
    n_units = ray_edits.height + config.data.sample
    print(f"study: {args.facts} facts, {n_units} units (1 trace + 3 ROME edits per fact)")
    for k, v in times.items():
        print(f"  {k:28s} {v:7.1f} s  ({v / n_units:5.1f} s per unit)")
    base = times["serial, 1 thread(s)"]
    print("  speed-up over serial 1 thread: " + ", ".join(f"{k}: {base / v:.2f}x" for k, v in times.items()))
    print(f"  Ray rows == serial 1-thread rows (rewrite scores): {same}")


if __name__ == "__main__":
    pl.Config.set_tbl_rows(-1)
    main()
