"""Study throughput: the same edit units on the one-edit-at-a-time path and on the study's shared path, side by side.

A small study — the first ``--facts`` known CounterFact facts (the main job's selection) × ``--layers`` × Error
Injection and Fact Forcing × ROME, r-ROME and FT-1 — runs twice through the study's one unit runner
(:func:`locedit.study.run_unit`), in the study's unit order:

* **old**: ``memo=None`` — every edit scores its fact before the edit itself, optimises its own v* (r-ROME
  re-optimises ROME's), one layer at a time, and scores after the edit through the whole model;
* **new**: a memo per fact, as ``locedit run`` does — pre-edit scores once per (fact, problem), recorded at the
  study's lowest edited layers so post-edit scoring reruns only the blocks from the edit's own; ROME and r-ROME
  share v*; a fact's v* at all layers optimised as one lockstep batch (``editors.targets.TargetMemo``).

Both read the same key statistics, computed before the timers start (a study computes them once, before its first
edit, on either path). Printed: seconds and units per second of each path, per method × problem, the ratio, and the
largest |difference| of every score column between the two (they compute the same numbers up to float summation
order). Last, what a bigger batch buys per row (one layer's v* batch, six layers', two facts'): on a CPU the
answer is the case for or against batching several facts. On CUDA the device is synchronized before each timer
read.

    python benchmarks/bench_study.py                               # 4 facts x 6 layers (0, 5, ..., 25), cpu
    python benchmarks/bench_study.py --facts 2 --layers 5 15 --device cuda
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections import defaultdict

import polars as pl
import torch

from locedit.config import parse_config
from locedit.plan import resolve_plan
from locedit.problems import load_dataset
from locedit.study import data_mask, key_statistics, run_unit, select_facts
from locedit.tracer import load_model

SKIP = {"key", "seconds", "edit_seconds", "layers"}


def _sync(model) -> None:
    if torch.device(model.cfg.device).type == "cuda":
        torch.cuda.synchronize()


def run_path(model, units, plan, dataset, shared: bool) -> tuple[float, list[dict], dict]:
    """Run ``units`` (one path), printing a line per finished fact (the run is long: progress survives a stop)."""
    by_id = {f.id: f for f in dataset}
    name = "new" if shared else "old"
    memo: dict | None = {} if shared else None
    rows, per = [], defaultdict(float)
    _sync(model)
    t0 = time.perf_counter()
    for u in units:
        t = time.perf_counter()
        table, rec = run_unit(model, by_id[u.fact_id], u, plan, dataset, memo)
        if table != "edits":
            raise RuntimeError(f"unit {u.key()} failed: {rec}")
        _sync(model)
        per[(u.method, u.problem)] += time.perf_counter() - t
        rows.append(rec)
        if u is units[-1] or units[units.index(u) + 1].fact_id != u.fact_id:
            print(f"  {name} path: fact {u.fact_id} done, {len(rows)}/{len(units)} units, "
                  f"{time.perf_counter() - t0:.1f} s so far", flush=True)
    _sync(model)
    return time.perf_counter() - t0, rows, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25])
    ap.add_argument("--methods", nargs="+", default=["rome", "r-rome", "ft-1"])
    ap.add_argument("--problems", nargs="+", default=["error_injection", "fact_forcing"])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the rows-per-batch scaling measurement")
    ap.add_argument("--float64-reference", action="store_true",
                    help="also run the old path in float64 (same inputs: key statistics, context templates, essence "
                         "texts) and print how far each float32 path is from it: the float32 noise floor")
    ap.add_argument("--forcing-edit-samples", type=int, default=None,
                    help="Fact Forcing's noise draws per edit (default: all; the reference study uses 3)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = parse_config({
        "study": {"name": "bench-study", "model": "smollm2-135m"},
        "data": {"dataset": "counterfact", "filter": "known", "sample": args.facts, "seed": 0},
        "localization": {"kinds": []},
        "editing": {"problems": args.problems, "methods": args.methods, "layers": args.layers, "essence": True}
        | ({} if args.forcing_edit_samples is None else {"forcing_edit_samples": args.forcing_edit_samples}),
    })
    model = load_model(config.model, device=args.device)
    dataset = load_dataset(config.data.dataset)
    facts = select_facts(config, dataset, lambda chunks: [data_mask(model, config, c) for c in chunks])
    plan = resolve_plan(config, model, [f.id for f in facts])
    units = plan.units()
    t = time.perf_counter()
    key_statistics(model, plan, units, progress=False)  # cached on disk: both paths read the same C
    setup = time.perf_counter() - t
    # one throwaway edit so that both timed paths start warm (context templates, essence texts on disk)
    run_unit(model, facts[0], units[0], plan, dataset, None)

    t_old, old, per_old = run_path(model, units, plan, dataset, shared=False)
    t_new, new, per_new = run_path(model, units, plan, dataset, shared=True)

    n = len(units)
    print(f"bench_study: {len(facts)} facts x {len(plan.layers)} layers {list(plan.layers)} x {args.problems} x "
          f"{args.methods} = {n} edit units; device {model.cfg.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    print(f"key statistics (one pass, cached; before the timers): {setup:.1f} s")
    print(f"old path (memo=None): {t_old:8.1f} s  {n / t_old:.3f} units/s")
    print(f"new path (per-fact memo): {t_new:8.1f} s  {n / t_new:.3f} units/s")
    print(f"ratio old/new: {t_old / t_new:.2f}x")
    print("seconds per unit by method x problem (old -> new):")
    for key in sorted(per_old):
        k = sum(1 for u in units if (u.method, u.problem) == key)
        print(f"  {key[0]:7s} {key[1]:16s} {per_old[key] / k:7.2f} -> {per_new[key] / k:7.2f} s  "
              f"({per_old[key] / per_new[key]:.2f}x)")
    a, b = pl.DataFrame(old), pl.DataFrame(new)
    worst = differences(a, b)
    print("max |old - new| per score column (absolute, relative to |old|):")
    for col, d, r in worst:
        print(f"  {col:26s} {d:.2e}  {r:.2e}")
    print(f"largest absolute: {_largest(worst, 1):.2e}; largest relative: {_largest(worst, 2):.2e}")
    if args.float64_reference:
        float64_floor(model, units, plan, dataset, a, b)
    if not args.no_scaling:
        row_scaling(model)


def differences(a: pl.DataFrame, b: pl.DataFrame, exact_columns: bool = True) -> list[tuple[str, float, float]]:
    """Per float column of two runs of the same units: (column, max |a − b|, max |a − b| / |a|). Non-float columns
    must agree exactly when ``exact_columns``."""
    assert a["key"].to_list() == b["key"].to_list()
    worst = []
    for col in a.columns:
        if col in SKIP or a[col].dtype not in (pl.Float64, pl.Float32):
            if exact_columns and col not in SKIP and a[col].to_list() != b[col].to_list():
                raise AssertionError(f"column {col} differs between the paths")
            continue
        d = (a[col] - b[col]).abs()
        rel = d / a[col].abs().clip(lower_bound=1e-12)
        worst.append((col, float(d.max()) if d.len() else math.nan, float(rel.max()) if d.len() else math.nan))
    return worst


def _largest(worst, i: int) -> float:
    return max((w[i] for w in worst if not math.isnan(w[i])), default=math.nan)


def float64_floor(model, units, plan, dataset, old32: pl.DataFrame, new32: pl.DataFrame) -> None:
    """The old path once more with the model in float64 and the same inputs (the float32 model's cache identity,
    so the same key statistics, context templates and essence texts are read), and how far each float32 path is
    from it: when the new path is as far from float64 as the old one, the two float32 paths differ by float32's own
    accuracy on this computation, not by a difference in the maths."""
    import locedit.tracer.models as models

    fp32 = models.model_fingerprint(model)
    real = models.model_fingerprint
    model.to(torch.float64)
    model.cfg.dtype = torch.float64
    models.model_fingerprint = lambda m: fp32 if m is model else real(m)
    try:
        t, ref, _ = run_path(model, units, plan, dataset, shared=False)
    finally:
        models.model_fingerprint = real
        model.to(torch.float32)
        model.cfg.dtype = torch.float32
    ref64 = pl.DataFrame(ref)
    d_old, d_new = differences(ref64, old32, False), differences(ref64, new32, False)
    print(f"float64 reference (old path, float64, {t:.0f} s): max |float32 path - float64| per column "
          "(absolute; old path, new path):")
    for (col, o, _), (_, n, _) in zip(d_old, d_new):
        print(f"  {col:26s} {o:.2e}  {n:.2e}")
    print(f"largest absolute: old {_largest(d_old, 1):.2e}, new {_largest(d_new, 1):.2e}")


def row_scaling(model, rows=(22, 44, 132, 264), positions: int = 5, first: int = 6, reps: int = 3) -> None:
    """What batching buys per row: forward + input-gradient backward of blocks ``first..`` (a v* step's work) on
    ``rows`` suffix rows of ``positions`` tokens; 22 rows is one layer's ROME batch (21 templates + the KL prompt),
    132 six layers in lockstep, 264 two facts' worth."""
    print(f"v*-step cost per row, blocks {first}..{model.cfg.n_layers - 1}, {positions} positions per row:")
    dev = model.cfg.device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        base = None
        for n in rows:
            x0 = torch.randn(n, positions, model.cfg.d_model, device=dev)
            for rep in range(reps + 1):  # the first repetition warms up
                if rep == 1:
                    _sync(model)
                    t = time.perf_counter()
                x = x0.clone().requires_grad_(True)
                h = x
                for block in model.blocks[first:]:
                    h = block(h)
                h.pow(2).sum().backward()
            _sync(model)
            per_row = (time.perf_counter() - t) / reps / n
            base = base or per_row
            print(f"  {n:4d} rows: {per_row * 1e3:7.3f} ms/row  ({base / per_row:.2f}x the {rows[0]}-row rate)")
    finally:
        for p, f in flags:
            p.requires_grad_(f)


if __name__ == "__main__":
    main()
