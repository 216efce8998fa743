"""How many WikiText tokens the key second moment C needs: ROME deltas and scores with C from 10k, 100k and all
vendored tokens, C's condition number and the covariance time per layer.

    python scripts/key_statistics.py --layers 5,15 --n-facts 10 --out /tmp/key_statistics.csv

ROME's v* does not depend on C (only u = C⁻¹k*/‖C⁻¹k*‖ and the k·u denominator do), so each fact is edited once per
C with :func:`problems.run_edit` (Error Injection, scores) and the deltas are compared analytically from one ROME
edit's k*, k and δ: cosine and relative Frobenius difference against the delta with the most tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locedit.editors import EditRequest, apply, key_second_moments, restore  # noqa: E402
from locedit.editors.covariance import DEFAULT_CORPUS, DEFAULT_SEQ_LEN  # noqa: E402
from locedit.editors.rome import rome_update  # noqa: E402
from locedit.problems import known_mask, load_counterfact, problem_hparams, run_edit  # noqa: E402
from locedit.tracer import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="5,15")
    ap.add_argument("--n-facts", type=int, default=10)
    ap.add_argument("--sizes", default="10240,102400,all")
    ap.add_argument("--out", default="key_statistics.csv")
    args = ap.parse_args()
    model = load_model()
    layers = [int(x) for x in args.layers.split(",")]
    sizes = []
    for s in args.sizes.split(","):
        if s == "all":
            from locedit.editors.covariance import _read_text  # the whole vendored corpus, in whole rows

            text = _read_text(DEFAULT_CORPUS)
            lines = [" " + ln.strip() for ln in text.splitlines() if ln.strip()]
            n = sum(len(c) for c in model.tokenizer(lines, add_special_tokens=False)["input_ids"])
            sizes.append((n // DEFAULT_SEQ_LEN) * DEFAULT_SEQ_LEN)
        else:
            sizes.append(int(s))
    covs, stats = {}, []
    for n in sizes:
        t0 = time.perf_counter()
        covs[n] = key_second_moments(model, layers, n_tokens=n)
        secs = time.perf_counter() - t0
        for layer in layers:
            ev = torch.linalg.eigvalsh(covs[n][layer])
            stats.append({"n_tokens": n, "layer": layer, "seconds_per_layer": secs / len(layers),
                          "cond": float(ev.max() / ev.min()), "eig_min": float(ev.min()), "eig_max": float(ev.max())})
        print(f"C from {n} tokens: {secs:.1f} s for {len(layers)} layers", flush=True)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=4):
        print(pl.DataFrame(stats))
    facts = load_counterfact(limit=160)
    known = [f for f, k in zip(facts, known_mask(model, facts)) if k][: args.n_facts]
    rows = []
    ref = sizes[-1]
    for f in known:
        for layer in layers:
            hp = problem_hparams("error_injection", "rome", model)
            req = EditRequest(f.template, f.subject, f.o_false)
            res = apply(model, req, "rome", [layer], hparams=hp, covariance=lambda m, l: covs[ref][l])
            restore(model, res)
            info = res.info
            delta = (info["v_star"] - info["v_init"]).double()
            dws = {n: rome_update(covs[n][layer], info["k_star"].double(), info["k"].double(), delta)[0]
                   for n in sizes}
            for n in sizes:
                o = run_edit(model, f, "error_injection", "rome", layer, essence=False,
                             covariance=lambda m, l, n=n: covs[n][l])
                cos = torch.nn.functional.cosine_similarity(dws[n].flatten(), dws[ref].flatten(), dim=0)
                rel = (dws[n] - dws[ref]).norm() / dws[ref].norm()
                rows.append({"fact_id": f.id, "layer": layer, "n_tokens": n, "cos_vs_all": float(cos),
                             "rel_diff_vs_all": float(rel), "rewrite_score": o.rewrite_score,
                             "paraphrase_score": o.paraphrase_score, "neighborhood_score": o.neighborhood_score})
            print(f"{f.id} L{layer} done", flush=True)
            pl.DataFrame(rows).write_csv(args.out)
    df = pl.DataFrame(rows)
    table = df.group_by("layer", "n_tokens").agg(
        pl.len().alias("n"), *[pl.col(c).mean() for c in ("cos_vs_all", "rel_diff_vs_all", "rewrite_score",
                                                         "paraphrase_score", "neighborhood_score")],
        pl.col("cos_vs_all").min().alias("cos_min")).sort("layer", "n_tokens")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=4):
        print(table)


if __name__ == "__main__":
    main()
