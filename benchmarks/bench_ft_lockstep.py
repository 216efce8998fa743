"""FT's finetunings of one request at a study's layers: one set at a time (``execute_ft``, the reference loop) vs all
sets in lockstep (``optimize_ft``: each set its own weights, Adam state, clamp and early stop; rows join at each
set's lowest layer), measured side by side in one run on the embedded model, with the largest relative difference
of the resulting weight deltas.

    python benchmarks/bench_ft_lockstep.py [--facts 2] [--layers 0 4 5 8 12 16 20 24 29] [--methods ft-1 ft-5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from locedit.editors import EditRequest
from locedit.editors.deltas import load_snapshot, snapshot
from locedit.editors.finetune import execute_ft, optimize_ft
from locedit.editors.methods import method_layers
from locedit.problems import load_dataset
from locedit.problems.filters import first_passing
from locedit.problems.variants import default_noise, problem_hparams
from locedit.tracer import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 4, 5, 8, 12, 16, 20, 24, 29])
    ap.add_argument("--methods", nargs="+", default=["ft-1", "ft-5"])
    ap.add_argument("--forcing-samples", type=int, default=3, help="Fact Forcing: noise draws the edit uses")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = load_model(device=args.device)
    facts = first_passing(model, load_dataset("counterfact"), args.facts)
    noise = default_noise(model, None)
    forcing = noise.prefix(args.forcing_samples)  # the study's forcing_edit_samples: the first N draws
    print(f"bench_ft_lockstep: {len(facts)} facts x layers {args.layers} x {args.methods} x EI, FF "
          f"(FF: {args.forcing_samples} noise draws); device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    total = {"alone": 0.0, "lockstep": 0.0}
    worst = 0.0
    for fact in facts:
        for method in args.methods:
            sets = [method_layers(method, model.cfg.n_layers, x) for x in args.layers]
            for problem, nz in (("error_injection", None), ("fact_forcing", forcing)):
                hp = problem_hparams(problem, method, model)
                target = fact.o_true if problem == "fact_forcing" else fact.o_false
                req = EditRequest(fact.template, fact.subject, target)
                t = time.perf_counter()
                together = optimize_ft(model, req, sets, hp, "maximize", nz)
                t_lock = time.perf_counter() - t
                t_alone = 0.0
                for s in dict.fromkeys(sets):
                    names = [f"blocks.{x}.mlp.{w}" for x in s for w in ("W_out", "b_out")]
                    snap = snapshot(model, names)
                    t = time.perf_counter()
                    execute_ft(model, req, s, hp, "maximize", nz)
                    t_alone += time.perf_counter() - t
                    params = dict(model.named_parameters())
                    for n in names:
                        want = (params[n].detach() - snap[n]).double()
                        got = (together[tuple(s)].params[n] - snap[n]).double()
                        if want.norm() > 0:
                            worst = max(worst, float((got - want).norm() / want.norm()))
                    load_snapshot(model, snap)
                total["alone"] += t_alone
                total["lockstep"] += t_lock
                print(f"  {fact.id} {method:5s} {problem:16s} one set at a time {t_alone:7.1f} s   lockstep "
                      f"{t_lock:7.1f} s   {t_alone / t_lock:5.2f}x", flush=True)
    print(f"total: one set at a time {total['alone']:.1f} s, lockstep {total['lockstep']:.1f} s, "
          f"{total['alone'] / total['lockstep']:.2f}x")
    print(f"largest relative difference of a weight delta (lockstep vs alone): {worst:.2e}")


if __name__ == "__main__":
    main()
