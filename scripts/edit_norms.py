"""ROME vs r-ROME on known CounterFact facts: update norms, scores and essence, split by whether the subject is the
prompt's first token (Yang et al. 2024 trace ROME's collapse cases mostly to such subjects; the embedded model has
no BOS, so position 0 is the very first token).

    python scripts/edit_norms.py --n-facts 40 --layers 5,15 --out /tmp/edit_norms.csv

Rows (one per fact × method × layer, Error Injection with the profile's App. A hyper-parameters) are appended to
``--out`` as they finish, so an interrupted run resumes. Prints the share of position-0 subjects (all CounterFact
prompts and the known facts used) and a table of means by method × layer × position-0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locedit.problems import known_mask, load_counterfact, run_edit  # noqa: E402
from locedit.tracer import load_model, locate_subject  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-facts", type=int, default=40)
    ap.add_argument("--layers", default="5,15")
    ap.add_argument("--methods", default="rome,r-rome")
    ap.add_argument("--problem", default="error_injection")
    ap.add_argument("--out", default="edit_norms.csv")
    args = ap.parse_args()
    model = load_model()
    facts = load_counterfact()
    at0 = {f.id: locate_subject(model, f.prompt, f.subject).subject_span[0] == 0 for f in facts}
    print(f"subject at position 0: {sum(at0.values())} of {len(facts)} CounterFact prompts "
          f"({sum(at0.values()) / len(facts):.1%})", flush=True)
    known = []
    for c0 in range(0, len(facts), 32):
        chunk = facts[c0 : c0 + 32]
        known += [f for f, k in zip(chunk, known_mask(model, chunk)) if k]
        if len(known) >= args.n_facts:
            break
    known = known[: args.n_facts]
    n0 = sum(at0[f.id] for f in known)
    print(f"known facts used: {len(known)}, subject at position 0: {n0} ({n0 / len(known):.1%})", flush=True)
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["fact_id"], r["method"], r["layer"]) for r in pl.read_csv(out).iter_rows(named=True)}
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.time()
    for f in known:
        for layer in layers:
            for method in args.methods.split(","):
                if (f.id, method, layer) in done:
                    continue
                o = run_edit(model, f, args.problem, method, layer)
                row = {"fact_id": f.id, "method": method, "layer": layer, "subject_at_0": at0[f.id],
                       "update_norm": o.update_norm, "rewrite_score": o.rewrite_score,
                       "paraphrase_score": o.paraphrase_score, "neighborhood_score": o.neighborhood_score,
                       "essence_score": o.essence_score, "ppl_pre": o.ppl_pre, "ppl_post": o.ppl_post,
                       "edit_seconds": o.edit_seconds}
                df = pl.DataFrame([row])
                if out.exists():
                    with open(out, "a") as fh:
                        fh.write(df.write_csv(include_header=False))
                else:
                    df.write_csv(out)
                print(f"{time.time() - t0:7.0f}s {f.id} {method} L{layer}: norm {o.update_norm:.2f} "
                      f"rewrite {o.rewrite_score:.3f} essence {o.essence_score:.3f}", flush=True)
    df = pl.read_csv(out).with_columns((pl.col("ppl_post") - pl.col("ppl_pre")).alias("d_ppl"))
    cols = ["update_norm", "rewrite_score", "paraphrase_score", "neighborhood_score", "essence_score", "d_ppl"]
    table = (df.group_by("method", "layer", "subject_at_0")
             .agg(pl.len().alias("n"), *[pl.col(c).mean() for c in cols], pl.col("update_norm").max().alias("norm_max"))
             .sort("layer", "subject_at_0", "method"))
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, float_precision=3):
        print(table)


if __name__ == "__main__":
    main()
