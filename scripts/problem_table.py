"""Mean edit scores per problem for ROME (or another study method) at a few layers on known CounterFact facts.

    python scripts/problem_table.py --n-facts 20 --layers 3,10,20 --method rome --out /tmp/problem_table.csv

Facts: the first ``--n-facts`` vendored CounterFact facts the model knows (the paper's 36-token greedy filter,
cached); Fact Erasure additionally keeps only facts with p(o_true) ≥ 0.02. Every (fact, problem, layer) edit is one
``problems.run_edit`` call; rows are appended to ``--out`` (CSV) as they come, so an interrupted run keeps its rows
and a rerun skips the (fact, problem, layer) triples already there. Prints a table of means per problem × layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, if `problems` is not installed yet

from locedit.problems import PROBLEM_NAMES, filter_min_target_prob, known_mask, load_counterfact, run_edit
from locedit.tracer import load_model

COLS = ["rewrite_score", "paraphrase_score", "neighborhood_score", "overall_score", "essence_score"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-facts", type=int, default=20)
    ap.add_argument("--scan", type=int, default=256, help="how many CounterFact facts to filter for known ones (cached by `python -m locedit.problems`)")
    ap.add_argument("--fact-ids", default=None,
                    help="comma-separated fact ids to use instead of filtering (e.g. facts already known to be known)")
    ap.add_argument("--layers", default="3,10,20")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--problems", default=",".join(PROBLEM_NAMES))
    ap.add_argument("--no-essence", action="store_true")
    ap.add_argument("--out", default="problem_table.csv")
    args = ap.parse_args()

    model = load_model(args.model)
    if args.fact_ids:
        by_id = {f.id: f for f in load_counterfact()}
        known = [by_id[i] for i in args.fact_ids.split(",")]
    else:
        facts = load_counterfact(limit=args.scan)
        known = [f for f, k in zip(facts, known_mask(model, facts)) if k][: args.n_facts]
    erasable = {f.id for f in filter_min_target_prob(model, known)}
    layers = [int(x) for x in args.layers.split(",")]
    problems = args.problems.split(",")
    out = Path(args.out)
    done = set()
    if out.exists():
        prev = pl.read_csv(out)
        done = {(r["fact_id"], r["problem"], r["layer"]) for r in prev.iter_rows(named=True)}
    print(f"{len(known)} known facts ({len(erasable)} with p(o_true) >= 0.02); layers {layers}; {args.method}")
    t0 = time.time()
    for f in known:
        for problem in problems:
            if problem == "fact_erasure" and f.id not in erasable:
                continue
            for layer in layers:
                if (f.id, problem, layer) in done:
                    continue
                o = run_edit(model, f, problem, args.method, layer, essence=not args.no_essence)
                row = o.as_row()
                row["layers"] = ",".join(map(str, row["layers"]))
                df = pl.DataFrame([row])
                with open(out, "a") as fh:
                    df.write_csv(fh, include_header=fh.tell() == 0)
                print(f"{time.time() - t0:7.0f}s {f.id} {problem} L{layer}: rewrite {o.rewrite_score:.3f} "
                      f"para {o.paraphrase_score:.3f} nbhd {o.neighborhood_score:.3f} "
                      f"essence {o.essence_score:.3f} ({o.seconds:.1f}s)", flush=True)
    df = pl.read_csv(out)
    table = (
        df.group_by(["problem", "layer"])
        .agg([pl.len().alias("n"), *[pl.col(c).mean().round(3) for c in COLS]])
        .sort(["problem", "layer"])
    )
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200):
        print(table)


if __name__ == "__main__":
    main()
