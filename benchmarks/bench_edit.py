"""Seconds per edit for ROME, MEMIT and FT at an early, a middle and a late layer, fast path (frozen lower layers
cached, blocks from the edit layer on, unembedding only at scored positions) vs the plain path (whole model every
step), measured in the same run, and a check that both give the same weight delta.

Tolerance: the two paths compute the same function; they differ only in float32 summation order
((resid_mid + mlp_out) + δ vs resid_mid + (mlp_out + δ); full-vocab vs gathered unembedding), which perturbs
gradients at the 1e-6 relative level; Adam's normalised steps can amplify that over 20-25 steps, so we accept a
relative Frobenius difference of the deltas < 1e-3 (FT: < 1e-2 of the L∞ budget, since clamping is
discontinuous).

One-time work (context templates, key statistics for all benchmarked layers in one corpus pass) is done first
and excluded from the timings.

    python benchmarks/bench_edit.py [--layers 3 12 24] [--methods rome memit ft] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from locedit.editors import EditRequest, apply, default_hparams, key_second_moments, restore, window_layers
from locedit.editors.templates import context_templates
from locedit.tracer import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 12, 24])
    ap.add_argument("--methods", nargs="+", default=["rome", "r-rome", "memit", "ft"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-path comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    L = model.cfg.n_layers
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    layer_sets = {
        (m, c): ((c,) if m != "memit" else tuple(window_layers(c, 5, L))) for m in args.methods for c in args.layers
    }
    t = time.perf_counter()
    for m in args.methods:
        if m in ("rome", "r-rome", "memit"):
            context_templates(model, default_hparams(m, "smollm2").context_lengths)
    needed = sorted({layer for (m, _), ls in layer_sets.items() if m != "ft" for layer in ls})
    if needed:
        key_second_moments(model, needed)
    print(f"one-time templates + key statistics for layers {needed}: {time.perf_counter() - t:.1f} s")
    print(f"threads={torch.get_num_threads()}")
    print("MEMIT's update stage (keys and residuals per edited layer): fast = one continuing forward, plain = a pass"
          " from the embedding per layer; shown as update_s")
    print(f"{'method':6} {'layers':>20} {'fast s':>8} {'plain s':>8} {'ratio':>6} {'rel Δ diff':>10} {'ok':>3}"
          f" {'update_s fast/plain':>20}")
    for (m, c), layers in layer_sets.items():
        fast = apply(model, request, m, list(layers))
        restore(model, fast)
        line = f"{m:6} {str(layers):>20} {fast.seconds:8.2f}"
        if args.no_plain:
            print(line)
            continue
        plain = apply(model, request, m, list(layers), fast=False)
        restore(model, plain)
        rel = max(
            float((fast.deltas[n] - plain.deltas[n]).norm() / plain.deltas[n].norm().clamp_min(1e-30))
            for n in fast.deltas
        )
        if m == "ft":
            eps = default_hparams("ft", "smollm2").norm_constraint
            diff = max(float((fast.deltas[n] - plain.deltas[n]).abs().max()) for n in fast.deltas) / eps
            ok = diff < 1e-2
            rel = diff
        else:
            ok = rel < 1e-3
        upd = ""
        if m == "memit":
            upd = f" {fast.info['update_seconds']:9.2f}/{plain.info['update_seconds']:<9.2f}"
        print(f"{line} {plain.seconds:8.2f} {plain.seconds / fast.seconds:6.2f} {rel:10.2e} {'yes' if ok else 'NO':>3}"
              f"{upd}")


if __name__ == "__main__":
    main()
