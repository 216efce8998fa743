"""Benchmark of tracer.trace: naive vs exact vs attribution on CounterFact facts (run by hand).

    python benchmarks/bench_trace.py                      # 5 facts of different lengths, window 5, 10 samples
    python benchmarks/bench_trace.py --facts 3 --samples 3 --no-naive
    python benchmarks/bench_trace.py --agreement 50       # attribution-vs-exact study on 50 correct facts
    python benchmarks/bench_trace.py --smoke              # tiny equality check (used by the tests)
    python benchmarks/bench_trace.py --stock --threads 2  # also naive on stock TransformerLens modules
    python benchmarks/bench_trace.py --device cuda        # model on the GPU (default: cuda when available)

Prints per fact: p_clean, p_noised, peak layer, naive / exact / attribution seconds, speed-up, max |grid diff|,
the theoretical FLOP fraction of exact vs naive and its inverse (the speed-up at equal FLOP/s), with ``--stock`` the
naive loop on TransformerLens's stock modules too, and attribution agreement (Spearman ρ of the per-layer max
curves, peak-layer agreement). On CUDA the device is synchronized before every timer read, and one small exact /
naive / attribution trace warms the kernels up before the timed ones.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "problems" / "data" / "counterfact.json.gz"


def load_facts(path: Path = DATA) -> list[dict]:
    """CounterFact records → {id, prompt, subject, target} (target gets a leading space)."""
    out = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        records = json.load(f)
    for r in records:
        rw = r["requested_rewrite"]
        out.append(
            {
                "id": str(r["case_id"]),
                "prompt": rw["prompt"].format(rw["subject"]),
                "subject": rw["subject"],
                "target": " " + rw["target_true"]["str"].lstrip(),
            }
        )
    return out


@torch.no_grad()
def is_correct(model, fact) -> bool:
    """Greedy first token after the prompt equals the target's first token."""
    from locedit.tracer.tokens import encode, target_tokens

    ids = encode(model, fact["prompt"]).to(model.cfg.device)
    return int(model(ids[None])[0, -1].argmax()) == int(target_tokens(model, fact["target"])[0])


def pick_facts(model, facts, n: int, spread: bool = True) -> list[dict]:
    """``n`` correct facts; with ``spread``, of different prompt lengths (shortest to longest)."""
    from locedit.tracer.tokens import encode

    ok = []
    for f in facts:
        if f["subject"] in f["prompt"] and is_correct(model, f):
            ok.append(f)
            if not spread and len(ok) >= n:
                return ok
            if spread and len(ok) >= 8 * n:
                break
    if not spread:
        return ok
    ok.sort(key=lambda f: len(encode(model, f["prompt"])))
    if len(ok) <= n:
        return ok
    return [ok[round(i * (len(ok) - 1) / (n - 1))] for i in range(n)] if n > 1 else ok[:1]


def _sync(model) -> None:
    """Wait for the model's device (CUDA kernels run asynchronously) so that a timer read covers the work."""
    dev = torch.device(model.cfg.device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _clock(model) -> float:
    _sync(model)
    return time.perf_counter()


def _device_name(model) -> str:
    dev = torch.device(model.cfg.device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} (threads={torch.get_num_threads()})"


def warmup(model) -> None:
    """One tiny trace per method, so that first-call costs (CUDA context, cuBLAS/SDPA kernel choice, autograd) are
    not charged to the first timed fact."""
    from locedit.tracer.tracing import trace

    args = (model, "Danielle Darrieux spoke", "Danielle Darrieux", " French")
    for method in ("exact", "naive"):
        trace(*args, samples=2, cells={4: [14]}, algorithm=method)
    trace(*args, samples=2, algorithm="attribution")
    _sync(model)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def flops(model, fact, window) -> float:
    from locedit.tracer.tokens import locate_subject, target_tokens
    from locedit.tracer.tracing import flop_fraction

    pt = locate_subject(model, fact["prompt"], fact["subject"])
    m = len(target_tokens(model, fact["target"]))
    cfg = model.cfg
    n_block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    return flop_fraction(cfg.n_layers, window, pt.n_tokens, pt.subject_span[0], m, cfg.d_model, n_block, cfg.d_vocab)


def bench(model, facts, *, kind, window, samples, naive=True, attribution=True, naive_facts=None, stock=False) -> None:
    """One row per fact. ``stock``: also time the naive loop on TransformerLens's stock GatedMLP/Unembed modules
    (per-call weight copies; what a hand-written hook loop or ``transformer_lens.patching`` runs), beside the naive
    loop on this package's copy-free modules (the same model ``exact`` uses)."""
    from locedit.tracer.fast_modules import stock_modules
    from locedit.tracer.tracing import trace

    print(f"kind={kind} window={window} samples={samples} threads={torch.get_num_threads()} "
          f"device={_device_name(model)}")
    print(
        f"{'fact':>5} {'T':>3} {'subj':>7} {'p_clean':>8} {'p_noised':>9} {'peak':>4} {'naive_s':>8} {'exact_s':>8} "
        f"{'speedup':>7} {'max|diff|':>9} {'flop_frac':>9} {'1/flop':>6} {'stock_s':>8} {'vs_stock':>8} "
        f"{'attr_s':>7} {'rho':>6} {'peak_attr':>9}"
    )
    tot_n = tot_e = tot_s = tot_es = 0.0
    for i, f in enumerate(facts):
        args = (model, f["prompt"], f["subject"], f["target"])
        kw = dict(kind=kind, window=window, samples=samples)
        t0 = _clock(model)
        e = trace(*args, algorithm="exact", **kw)
        te = _clock(model) - t0
        tn, diff, ts = float("nan"), float("nan"), float("nan")
        if naive and (naive_facts is None or i < naive_facts):
            t0 = _clock(model)
            n = trace(*args, algorithm="naive", **kw)
            tn = _clock(model) - t0
            diff = float((e.grid - n.grid).abs().max())
            tot_n += tn
            tot_e += te
            if stock:
                with stock_modules(model):
                    t0 = _clock(model)
                    s = trace(*args, algorithm="naive", **kw)
                    ts = _clock(model) - t0
                diff = max(diff, float((e.grid - s.grid).abs().max()))
                tot_s += ts
                tot_es += te
        ta, rho, pa = float("nan"), float("nan"), -1
        if attribution:
            t0 = _clock(model)
            a = trace(*args, algorithm="attribution", **kw)
            ta = _clock(model) - t0
            rho = spearman(e.per_layer(), a.per_layer())
            pa = a.peak_layer()
        frac = flops(model, f, window)
        print(
            f"{f['id']:>5} {len(e.tokens):>3} {str(e.subject_span):>7} {e.p_clean:8.4f} {e.p_noised:9.5f} "
            f"{e.peak_layer():>4} {tn:8.2f} {te:8.2f} {tn / te:7.1f} {diff:9.2e} {frac:9.3f} {1 / frac:6.1f} "
            f"{ts:8.2f} {ts / te:8.1f} {ta:7.2f} {rho:6.3f} {pa:>9}",
            flush=True,
        )
    if naive and tot_e > 0:
        print(f"total: naive {tot_n:.1f}s exact {tot_e:.1f}s speed-up {tot_n / tot_e:.1f}x")
    if stock and tot_es > 0:
        print(f"total: naive on stock TransformerLens modules {tot_s:.1f}s exact {tot_es:.1f}s speed-up "
              f"{tot_s / tot_es:.1f}x")


def agreement(model, facts, *, kind, window, samples) -> None:
    """Attribution vs exact on many facts: Spearman ρ of per-layer (max) curves and peak-layer agreement."""
    from locedit.tracer.tracing import trace

    rhos, rhos_last, same, near = [], [], 0, 0
    for i, f in enumerate(facts):
        args = (model, f["prompt"], f["subject"], f["target"])
        kw = dict(kind=kind, window=window, samples=samples)
        e = trace(*args, algorithm="exact", **kw)
        a = trace(*args, algorithm="attribution", **kw)
        rhos.append(spearman(e.per_layer(), a.per_layer()))
        rhos_last.append(spearman(e.per_layer("last_subject"), a.per_layer("last_subject")))
        same += e.peak_layer() == a.peak_layer()
        near += abs(e.peak_layer() - a.peak_layer()) <= 2
        print(f"{i + 1:>3} fact {f['id']:>5}: rho(max) {rhos[-1]:6.3f} rho(last) {rhos_last[-1]:6.3f} "
              f"peak exact {e.peak_layer():>2} attr {a.peak_layer():>2}", flush=True)
    r, rl = torch.tensor(rhos), torch.tensor(rhos_last)
    n = len(facts)
    print(f"n={n} Spearman rho per-layer max: mean {r.nanmean():.3f} median {r.nanmedian():.3f}; "
          f"last-subject: mean {rl.nanmean():.3f} median {rl.nanmedian():.3f}; "
          f"peak layer equal {same}/{n}, within ±2 {near}/{n}")


def smoke(model) -> float:
    """Tiny exact-vs-naive equality check on one short fact and a few cells; returns max |diff|."""
    from locedit.tracer.tracing import trace

    args = (model, "Danielle Darrieux spoke", "Danielle Darrieux", " French")
    cells = {0: [0], 4: [14], 5: [29]}
    e = trace(*args, samples=2, cells=cells)
    n = trace(*args, samples=2, cells=cells, algorithm="naive")
    ok = ~e.grid.isnan()
    return float((e.grid[ok] - n.grid[ok]).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--kind", default="mlp")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine's cores are shared)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-attribution", action="store_true")
    ap.add_argument("--naive-facts", type=int, default=None, help="run naive on the first N facts only")
    ap.add_argument("--stock", action="store_true",
                    help="also time naive on TransformerLens's stock MLP/unembed modules (per-call weight copies)")
    ap.add_argument("--agreement", type=int, default=0, help="run the attribution-vs-exact study on N facts")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of the model (default: cuda when available, else cpu)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from locedit.tracer import load_model

    model = load_model(device=a.device)
    if a.smoke:
        print(f"smoke: max |exact - naive| = {smoke(model):.2e}")
        return
    facts = load_facts()
    if torch.device(a.device).type == "cuda":
        warmup(model)
    if a.agreement:
        agreement(model, pick_facts(model, facts, a.agreement, spread=False),
                  kind=a.kind, window=a.window, samples=a.samples)
        return
    bench(model, pick_facts(model, facts, a.facts), kind=a.kind, window=a.window, samples=a.samples,
          naive=not a.no_naive, attribution=not a.no_attribution, naive_facts=a.naive_facts, stock=a.stock)


if __name__ == "__main__":
    main()
