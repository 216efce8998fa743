"""The suffix runner's two backends side by side on one model: the lean blocks (packed QKV, SDPA, prefix keys
normed and rotated once; :mod:`tracer.lean`) vs TransformerLens's own blocks with a frozen KV cache. Seconds per
ROME edit (the v* optimisation runs the blocks above the edit layer every step) and per exact causal trace (MLP,
window 10), each path timed alternately in the same run (so both see the same machine load), and the largest
difference of their results: the ROME update's relative Frobenius difference (Adam over 20 steps amplifies float
summation order; < 1e-3 accepted, as ``bench_edit.py``) and the trace grid's largest relative difference.

Gemma 3 270M (QK-norm, pre+post norms, sliding-window layers) ran on the TransformerLens backend until the lean
blocks learned its block; this is the benchmark that says what that bought.

    python benchmarks/bench_backends.py [--model gemma3-270m] [--layers 3 9] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch

from locedit.editors import EditRequest, apply, default_hparams, key_second_moments, restore
from locedit.editors.templates import context_templates
from locedit.tracer import load_model, suffix, trace, tracing


@contextmanager
def backend(lean: bool):
    """Force the suffix runner's backend (the lean one only where :func:`lean_supported` allows it)."""
    saved = suffix.lean_supported, tracing.lean_supported
    if not lean:
        suffix.lean_supported = tracing.lean_supported = lambda model: False
    try:
        yield
    finally:
        suffix.lean_supported, tracing.lean_supported = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    from locedit.tracer.lean import lean_supported

    if not lean_supported(model):
        raise SystemExit(f"{args.model}: the lean blocks do not support this model; nothing to compare")
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    hp = default_hparams("rome", model)
    t = time.perf_counter()
    context_templates(model, hp.context_lengths)
    key_second_moments(model, args.layers)
    print(f"# {args.model}, threads={torch.get_num_threads()}, device={next(model.parameters()).device}; "
          f"one-time templates + key statistics: {time.perf_counter() - t:.1f} s (excluded)")
    print(f"{'what':28} {'lean s':>8} {'TL s':>8} {'TL/lean':>8} {'difference':>11}")
    for layer in args.layers:
        times = {True: [], False: []}
        deltas = {}
        for _ in range(args.repeats):
            for lean in (True, False):
                with backend(lean):
                    res = apply(model, request, "rome", [layer], hparams=hp)
                restore(model, res)
                times[lean].append(res.seconds)
                deltas[lean] = next(iter(res.deltas.values()))
        diff = float((deltas[True] - deltas[False]).norm() / deltas[False].norm())
        a, b = min(times[True]), min(times[False])
        print(f"{f'ROME edit, layer {layer}':28} {a:8.2f} {b:8.2f} {b / a:8.2f} {diff:11.2e}")
    times, grids = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for lean in (True, False):
            with backend(lean):
                t = time.perf_counter()
                r = trace(model, request.text, request.subject, " French",
                          kind="mlp", window=10, noise=3.0, samples=10)
                times[lean].append(time.perf_counter() - t)
            grids[lean] = r.grid
    diff = float((grids[True] - grids[False]).abs().max() / grids[False].abs().max())
    a, b = min(times[True]), min(times[False])
    print(f"{'exact trace (MLP, window 10)':28} {a:8.2f} {b:8.2f} {b / a:8.2f} {diff:11.2e}")
    print("(seconds: the faster of --repeats alternating runs of each path)")


if __name__ == "__main__":
    main()
