"""Localization methods compared: does localization by method X predict where editing succeeds, better than noise?
(Reber's question; Hase et al. App. B's robustness check.)

For every localization method (:data:`tracer.vocab.LOCALIZATIONS`) × collapse × problem × edit method, the paper's
Layer / Both models (``score ~ C(layer)`` vs ``score ~ C(layer) * trace``, :mod:`stats.regressions`) on that method's
per-layer effects, with a bootstrap 95 % interval of ΔR² = R²(Both) − R²(Layer) over facts (all of a fact's edits
resampled together), and Reber's test: a *paired* bootstrap over the facts both methods localized of
ΔR²(X) − ΔR²(noise), with its interval and a sentence stating its sign.

The bootstrap refits by least squares on the same design statsmodels builds (one-hot layers, layer × trace), which
equals the formula fit's R² (tests/test_localization.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from locedit.stats.join import join_trace
from locedit.stats.regressions import fit_regression, single_blas_thread

__all__ = [
    "Agreement",
    "LocalizationComparison",
    "agreement",
    "edit_layer_agreement",
    "PairedDifference",
    "delta_r2",
    "localization_frames",
    "localization_table",
    "paired_differences",
    "reber_sentence",
]

_NAN = float("nan")
FEW_FACTS = 30


def localization_frames(
    edits: pl.DataFrame, trace: pl.DataFrame, *, kind: str = "mlp", window: int = 5, collapse: str = "max",
) -> dict[str, pl.DataFrame]:
    """The analysis frame (:func:`stats.join.join_trace`, with ``concentrated``) per localization method present in
    ``trace`` (a table without a ``localization`` column is all noise)."""
    methods = trace["localization"].unique(maintain_order=True).to_list() if "localization" in trace.columns else ["noise"]
    out = {}
    for m in methods:
        sub = trace.filter((pl.col("kind") == kind) & (pl.col("window") == window))
        if "localization" in sub.columns:
            sub = sub.filter(pl.col("localization") == m)
        if sub.height:
            out[m] = join_trace(edits, sub, kind=kind, window=window, collapse=collapse, with_concentrated=True,
                                localization=m)
    return out


def _design(layers: np.ndarray, trace: np.ndarray | None, levels: np.ndarray) -> np.ndarray:
    onehot = (layers[:, None] == levels[None, :]).astype(float)
    return onehot if trace is None else np.hstack([onehot, onehot * trace[:, None]])


def _r2(x: np.ndarray, y: np.ndarray, adjusted: bool) -> float:
    sst = float(((y - y.mean()) ** 2).sum())
    if sst <= 0:
        return _NAN
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    r2 = 1.0 - float(((y - x @ beta) ** 2).sum()) / sst
    n, k = x.shape  # k includes the intercept (the one-hot layer columns span it)
    return 1.0 - (1.0 - r2) * (n - 1) / (n - k) if adjusted else r2


def delta_r2(layers: np.ndarray, trace: np.ndarray, score: np.ndarray, *, adjusted: bool = False) -> float:
    """R²(score ~ C(layer) * trace) − R²(score ~ C(layer)) by least squares (NaN when undefined). ``adjusted``: the
    difference of adjusted R² — which, unlike the plain difference (≥ 0 for nested models whatever the data), is
    centred near 0 when the tracing effect carries nothing, so its interval can contain 0."""
    levels = np.unique(layers)
    if len(levels) < 2 or len(score) <= 2 * len(levels) or np.var(trace) == 0:
        return _NAN
    return (_r2(_design(layers, trace, levels), score, adjusted)
            - _r2(_design(layers, None, levels), score, adjusted))


def _by_fact(frame: pl.DataFrame, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    sub = frame.select("fact_id", "layer", pl.col("trace").cast(pl.Float64).fill_nan(None),
                       pl.col(metric).cast(pl.Float64).fill_nan(None)).drop_nulls()
    out = {}
    for (fid,), g in sub.group_by(["fact_id"], maintain_order=True):
        out[str(fid)] = (g["layer"].to_numpy(), g["trace"].to_numpy(), g[metric].to_numpy())
    return dict(sorted(out.items()))


def _stack(groups, facts):
    parts = [groups[f] for f in facts]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _boot(groups: dict, n_boot: int, seed: int, facts: Sequence[str] | None = None) -> np.ndarray:
    facts = list(facts if facts is not None else groups)
    rng = np.random.default_rng(seed)
    vals = np.full(n_boot, np.nan)
    for b in range(n_boot):
        pick = [facts[i] for i in rng.integers(0, len(facts), len(facts))]
        vals[b] = delta_r2(*_stack(groups, pick), adjusted=True)
    return vals


def _interval(vals: np.ndarray) -> tuple[float, float]:
    ok = vals[np.isfinite(vals)]
    if len(ok) < max(10, len(vals) // 2):
        return _NAN, _NAN
    return float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))


@dataclass(frozen=True)
class LocalizationComparison:
    """One row of the comparison table."""

    localization: str
    collapse: str
    subset: str  # "all" or "concentrated" (Table 2's subset, per method)
    problem: str
    method: str
    metric: str
    n: int
    n_facts: int
    r2_layer: float
    r2_trace: float
    r2_both: float
    r2_diff: float  # the paper's ΔR² (≥ 0 by construction)
    r2_diff_adj: float  # ΔR² of adjusted R²; the interval is this one's
    ci_low: float
    ci_high: float
    p: float
    note: str = ""


def localization_table(
    edits: pl.DataFrame,
    trace: pl.DataFrame,
    *,
    kind: str = "mlp",
    window: int = 5,
    collapses: Sequence[str] = ("max", "last_subject"),
    metric: str = "rewrite_score",
    n_boot: int = 1000,
    seed: int = 0,
) -> pl.DataFrame:
    """One row per localization × collapse × subset × problem × edit method: R² of Layer / Trace / Both, ΔR² (the
    paper's), adjusted ΔR² with its bootstrap 95 % interval over facts, the F-test p and n
    (:class:`LocalizationComparison`). The interval is on the *adjusted* difference: the plain one is ≥ 0 for any
    data (adding six parameters never lowers R²), so its interval could never contain 0."""
    rows = []
    with single_blas_thread():
        for collapse in collapses:
            for loc, frame in localization_frames(edits, trace, kind=kind, window=window, collapse=collapse).items():
                for subset in ("all", "concentrated"):
                    f = frame if subset == "all" else frame.filter(pl.col("concentrated"))
                    for (problem, method), g in f.sort(["problem", "method"]).group_by(["problem", "method"],
                                                                                       maintain_order=True):
                        res = fit_regression(g, metric, problem=problem, method=method)
                        groups = _by_fact(g, metric)
                        lo, hi = _interval(_boot(groups, n_boot, seed)) if n_boot and len(groups) > 1 else (_NAN, _NAN)
                        adj = delta_r2(*_stack(groups, list(groups)), adjusted=True) if groups else _NAN
                        rows.append(LocalizationComparison(
                            loc, collapse, subset, str(problem), str(method), metric, res.n, len(groups),
                            res.layer.r2, res.trace.r2, res.both.r2, res.r2_diff, adj, lo, hi, res.p, res.note))
    return pl.DataFrame([asdict(r) for r in rows]) if rows else pl.DataFrame()


@dataclass(frozen=True)
class PairedDifference:
    """ΔR²(localization) − ΔR²(baseline) on the facts both localized, with a paired bootstrap interval."""

    localization: str
    baseline: str
    collapse: str
    problem: str
    method: str
    metric: str
    n_facts: int
    difference: float
    ci_low: float
    ci_high: float
    sentence: str


def reber_sentence(d: PairedDifference) -> str:
    """The comparison in words (the report's reading of Reber's question)."""
    from locedit.tracer.vocab import LOCALIZATIONS

    a = LOCALIZATIONS[d.localization].label if d.localization in LOCALIZATIONS else d.localization
    b = LOCALIZATIONS[d.baseline].label if d.baseline in LOCALIZATIONS else d.baseline
    if not np.isfinite(d.difference):
        return f"{a} vs {b}: undefined ({d.n_facts} facts)."
    pts = 100 * d.difference
    verb = "more" if pts >= 0 else "fewer"
    ci = f"95% CI [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]" if np.isfinite(d.ci_low) else "no interval"
    if np.isfinite(d.ci_low) and (d.ci_low > 0 or d.ci_high < 0):
        verdict = "the interval excludes 0"
    else:
        verdict = "the interval includes 0: no detectable difference"
    return (f"{a} explains {abs(pts):.1f} {verb} points of variance in {d.metric} than {b} "
            f"({d.problem}, {d.method}, collapse {d.collapse}; {ci}; {verdict}; n = {d.n_facts} facts).")


def paired_differences(
    edits: pl.DataFrame,
    trace: pl.DataFrame,
    *,
    baseline: str = "noise",
    kind: str = "mlp",
    window: int = 5,
    collapse: str = "max",
    metric: str = "rewrite_score",
    n_boot: int = 1000,
    seed: int = 0,
) -> list[PairedDifference]:
    """Reber's test for every other localization method X: ΔR²(X) − ΔR²(``baseline``) per problem × edit method on
    the facts both localized, with a paired bootstrap (the same resampled facts for both methods). Both models
    have the same rows and parameters, so the difference of plain and of adjusted ΔR² differ only by the factor
    (n − 1)/(n − k); the plain one is reported."""
    frames = localization_frames(edits, trace, kind=kind, window=window, collapse=collapse)
    if baseline not in frames:
        return []
    out = []
    base = frames[baseline]
    with single_blas_thread():
        for loc, frame in frames.items():
            if loc == baseline:
                continue
            for (problem, method), g in frame.sort(["problem", "method"]).group_by(["problem", "method"],
                                                                                   maintain_order=True):
                gb = base.filter((pl.col("problem") == problem) & (pl.col("method") == method))
                ga, gbb = _by_fact(g, metric), _by_fact(gb, metric)
                facts = sorted(set(ga) & set(gbb))
                if len(facts) < 2:
                    continue
                diff = delta_r2(*_stack(ga, facts)) - delta_r2(*_stack(gbb, facts))
                rng = np.random.default_rng(seed)
                vals = np.full(n_boot, np.nan)
                for b in range(n_boot):
                    pick = [facts[i] for i in rng.integers(0, len(facts), len(facts))]
                    vals[b] = delta_r2(*_stack(ga, pick)) - delta_r2(*_stack(gbb, pick))
                lo, hi = _interval(vals)
                d = PairedDifference(loc, baseline, collapse, str(problem), str(method), metric, len(facts),
                                     float(diff), lo, hi, "")
                out.append(PairedDifference(**{**asdict(d), "sentence": reber_sentence(d)}))
    return out


@dataclass(frozen=True)
class Agreement:
    """Do two localization methods agree on *a fact* more than on facts in general? (:func:`agreement`)

    Attributes:
        n_facts: facts with a complete per-layer curve under both methods.
        median_r, r_q25, r_q75: per fact, Pearson r between the two methods' per-layer effect curves: median, IQR.
        close_share: share of facts whose two peak layers are ≤ ``within`` apart.
        cross_median_r, cross_close_share: the same over *other-fact* pairs (method A on fact i, B on fact j ≠ i):
            the agreement that the layer profile all facts share produces on its own.
        p_r, p_close: one-sided permutation p-values of mean same-fact r and the close share against pairings of
            each fact's A curve with a random other fact's B curve (facts permuted).
        n_permutations: permutations drawn.
    """

    n_facts: int
    median_r: float
    r_q25: float
    r_q75: float
    close_share: float
    cross_median_r: float
    cross_close_share: float
    p_r: float
    p_close: float
    n_permutations: int


def agreement(curves_a: dict[str, np.ndarray], curves_b: dict[str, np.ndarray], *, within: int = 2,
              n_permutations: int = 999, seed: int = 0, layers: Sequence[int] | None = None) -> Agreement:
    """Agreement of two methods' per-layer effect curves (``{fact_id: [L]}``) on the same fact, beside the
    cross-fact baseline (:class:`Agreement`). ``layers``: the layer of each curve position (default 0, 1, ...: every
    layer), so that "peaks ≤ ``within`` apart" counts layers, not positions. Facts whose curves are not finite at
    every layer, or are constant, are left out. NaN fields (``n_facts`` < 2) when there is nothing to compare."""
    facts = sorted(f for f in set(curves_a) & set(curves_b)
                   if np.isfinite(curves_a[f]).all() and np.isfinite(curves_b[f]).all()
                   and np.ptp(curves_a[f]) > 0 and np.ptp(curves_b[f]) > 0 and len(curves_a[f]) == len(curves_b[f]))
    n = len(facts)
    if n < 2:
        return Agreement(n, *([_NAN] * 8), 0)
    A = np.stack([curves_a[f] for f in facts]).astype(float)
    B = np.stack([curves_b[f] for f in facts]).astype(float)

    def z(X):
        X = X - X.mean(axis=1, keepdims=True)
        return X / np.linalg.norm(X, axis=1, keepdims=True)

    R = z(A) @ z(B).T  # R[i, j] = Pearson r of A's curve of fact i and B's curve of fact j
    at = np.arange(A.shape[1]) if layers is None else np.asarray(layers)
    if len(at) != A.shape[1]:
        raise ValueError(f"layers has {len(at)} entries for curves of {A.shape[1]} layers")
    pa, pb = at[A.argmax(axis=1)], at[B.argmax(axis=1)]
    C = (np.abs(pa[:, None] - pb[None, :]) <= within).astype(float)
    off = ~np.eye(n, dtype=bool)
    same_r, same_c = np.diag(R), np.diag(C)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, n)), axis=1)
    rows = np.arange(n)[None, :]
    null_r, null_c = R[rows, perms].mean(axis=1), C[rows, perms].mean(axis=1)
    p_r = float((1 + np.sum(null_r >= same_r.mean() - 1e-12)) / (1 + n_permutations))
    p_c = float((1 + np.sum(null_c >= same_c.mean() - 1e-12)) / (1 + n_permutations))
    return Agreement(n, float(np.median(same_r)), float(np.percentile(same_r, 25)), float(np.percentile(same_r, 75)),
                     float(same_c.mean()), float(np.median(R[off])), float(C[off].mean()), p_r, p_c, n_permutations)


def edit_layer_agreement(frames: dict[str, pl.DataFrame], *, metric: str = "rewrite_score", within: int = 2,
                         n_permutations: int = 999, seed: int = 0, min_layers: int = 5) -> pl.DataFrame:
    """Is a fact best edited where it traces? Per localization × problem × edit method (``frames``: the analysis
    frames of :func:`localization_frames`), each fact's curve of the tracing effect over the edited layers against
    its curve of ``metric`` over the same layers, by :func:`agreement`: per-fact Pearson r of the two curves and the
    share of facts whose best-editing layer is ≤ ``within`` layers from their peak tracing layer, each beside the
    same quantity over *other-fact* pairs (fact i's tracing, fact j's edits: what the layer profile all facts share
    gives on its own) with a one-sided permutation p (facts permuted). Only facts edited at every one of the
    group's layers (at least ``min_layers`` of them) count.

    Returns one row per group: localization, problem, method, n_layers, n_facts, median_r, cross_median_r, p_r,
    close_share, cross_close_share, p_close."""
    rows = []
    for loc, frame in frames.items():
        if frame.height == 0:
            continue
        for (problem, method), sub in frame.group_by(["problem", "method"], maintain_order=True):
            layers = sorted(sub["layer"].unique().to_list())
            if len(layers) < min_layers:
                continue
            tr, sc = {}, {}
            for (fid,), fact in sub.sort("layer").group_by(["fact_id"], maintain_order=True):
                if fact["layer"].to_list() != layers:
                    continue
                tr[fid] = fact["trace"].cast(pl.Float64).fill_null(_NAN).to_numpy()
                sc[fid] = fact[metric].cast(pl.Float64).fill_null(_NAN).to_numpy()
            a = agreement(tr, sc, within=within, n_permutations=n_permutations, seed=seed, layers=layers)
            rows.append({"localization": loc, "problem": problem, "method": method, "n_layers": len(layers),
                         "n_facts": a.n_facts, "median_r": a.median_r, "cross_median_r": a.cross_median_r,
                         "p_r": a.p_r, "close_share": a.close_share, "cross_close_share": a.cross_close_share,
                         "p_close": a.p_close})
    return pl.DataFrame(rows, schema={"localization": pl.String, "problem": pl.String, "method": pl.String,
                                      "n_layers": pl.Int64, "n_facts": pl.Int64, "median_r": pl.Float64,
                                      "cross_median_r": pl.Float64, "p_r": pl.Float64, "close_share": pl.Float64,
                                      "cross_close_share": pl.Float64, "p_close": pl.Float64})
