"""Regressions of edit success on edit layer and tracing effect (Hase et al. 2023 §4.3, §5.3; Tables 1–8; Figs. 4,
6, 15–18).

Per (problem, method, metric) three OLS models, fit with statsmodels formulas on the analysis frame
(:func:`stats.join.join_trace`):

* **Layer**: ``score ~ C(layer)`` (edit layer as a categorical variable),
* **Trace**: ``score ~ trace``,
* **Both**: ``score ~ C(layer) * trace`` (the paper's "both terms interacted").

Reported: unadjusted R² of each; Diff = R²(Both) − R²(Layer) (the "added effect" of tracing, Tables 3–6); the
nested-model F-test of Both vs Layer (``both.compare_f_test(layer)``: F, df_diff, p; footnote 2 of §5.3); in-sample
RMSE = sqrt(SSR / n) and MAE = mean |residual| of each model (Tables 7–8). Per-layer Pearson ρ of score vs trace
with its two-sided p-value (Fig. 4: ρ = −0.13 at layer 6; Figs. 15–18).

Degenerate inputs never raise: rows with a null/NaN trace or score are dropped; a model that cannot be fit
(single edit layer → no categorical layer model, constant trace, constant score, fewer rows than parameters,
no added degrees of freedom) gets NaN statistics and the reason is written to ``note``.
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import polars as pl
import statsmodels.formula.api as smf
from scipy import stats as sps


__all__ = [
    "FORMULAS",
    "single_blas_thread",
    "FitStats",
    "RegressionResult",
    "Correlation",
    "fisher_interval",
    "fit_regression",
    "fit_regressions",
    "results_frame",
    "regression_table",
    "pearson",
    "layer_correlations",
]

FORMULAS = {
    "layer": "score ~ C(layer)",
    "trace": "score ~ trace",
    "both": "score ~ C(layer) * trace",
}
_NAN = float("nan")


_BLAS_THREAD_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


@contextlib.contextmanager
def single_blas_thread() -> Iterator[None]:
    """Limit the OpenBLAS libraries loaded in this process (numpy's, scipy's) to one thread, then restore.

    Uses ``threadpoolctl`` when installed, else the OpenBLAS ``*_set_num_threads`` C entry points found in
    ``/proc/self/maps`` (Linux). Anything unexpected → a no-op: only speed is at stake, never results.
    """
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-not-found]
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    restore: list[tuple[object, int]] = []
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.rsplit("/", 1)[-1].lower()})
        for path in paths:
            lib = ctypes.CDLL(path)
            for get, set_ in _BLAS_THREAD_SYMBOLS:
                if hasattr(lib, get) and hasattr(lib, set_):
                    restore.append((getattr(lib, set_), int(getattr(lib, get)())))
                    getattr(lib, set_)(1)
                    break
    except Exception:  # noqa: BLE001 - best effort only
        pass
    try:
        yield
    finally:
        for setter, n in restore:
            with contextlib.suppress(Exception):
                setter(n)


@dataclass(frozen=True)
class FitStats:
    """Goodness of fit of one OLS model (Tables 1, 3–8): unadjusted R², in-sample RMSE and MAE."""

    r2: float = _NAN
    rmse: float = _NAN
    mae: float = _NAN
    n: int = 0
    df_model: float = _NAN


@dataclass(frozen=True)
class RegressionResult:
    """Layer / Trace / Both models for one (problem, method, metric) cell of Tables 3–6 (Table 1 for ROME)."""

    problem: str | None
    method: str | None
    metric: str
    n: int
    n_layers: int
    layer: FitStats
    trace: FitStats
    both: FitStats
    r2_diff: float  # R²(Both) − R²(Layer)
    f: float  # F statistic of Both vs Layer
    df_diff: float
    p: float
    note: str = ""

    def row(self) -> dict:
        """Flat dict (one row of :func:`results_frame`)."""
        out: dict = {"problem": self.problem, "method": self.method, "metric": self.metric, "n": self.n,
                     "n_layers": self.n_layers}
        for name in ("layer", "trace", "both"):
            fs: FitStats = getattr(self, name)
            out[f"r2_{name}"] = fs.r2
            out[f"rmse_{name}"] = fs.rmse
            out[f"mae_{name}"] = fs.mae
        out.update(r2_diff=self.r2_diff, f=self.f, df_diff=self.df_diff, p=self.p, note=self.note)
        return out


@dataclass(frozen=True)
class Correlation:
    """Pearson ρ with its two-sided p-value (Figs. 4, 15–18), and Spearman's rank correlation beside it (robust to the
    tracing covariate's extreme values), each with a 95 % interval: Fisher's z, ``atanh(r) ± 1.96·se`` with
    se = 1/√(n − 3) for Pearson and Bonett & Wright's (2000) se = √((1 + r²/2)/(n − 3)) for Spearman."""

    rho: float
    p: float
    n: int
    note: str = ""
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    spearman: float = float("nan")
    spearman_p: float = float("nan")
    spearman_ci_low: float = float("nan")
    spearman_ci_high: float = float("nan")


def fisher_interval(r: float, n: int, *, spearman: bool = False, level: float = 0.95) -> tuple[float, float]:
    """Fisher-z interval for a correlation ``r`` from ``n`` pairs (Bonett–Wright's variance for Spearman); NaN for
    n ≤ 3 or |r| = 1."""
    if n <= 3 or not np.isfinite(r) or abs(r) >= 1:
        return _NAN, _NAN
    se = np.sqrt((1 + r * r / 2 if spearman else 1.0) / (n - 3))
    z, q = np.arctanh(r), sps.norm.ppf(0.5 + level / 2)
    return float(np.tanh(z - q * se)), float(np.tanh(z + q * se))


def _clean(df: pl.DataFrame, metric: str) -> tuple[pd.DataFrame, int]:
    """Pandas frame (score, layer, trace) with finite values only; and the number of rows dropped."""
    for c in ("layer", "trace", metric):
        if c not in df.columns:
            raise ValueError(f"analysis frame is missing column {c!r}; has {df.columns}")
    sub = df.select(
        pl.col(metric).cast(pl.Float64).fill_nan(None).alias("score"),
        pl.col("layer").cast(pl.Int64),
        pl.col("trace").cast(pl.Float64).fill_nan(None),
    )
    kept = sub.drop_nulls()
    pdf = pd.DataFrame({c: kept[c].to_numpy() for c in kept.columns})
    return pdf, sub.height - kept.height


def _fit(formula: str, data: pd.DataFrame, n_params: int):
    """Fit one OLS model or return None when there are no residual degrees of freedom."""
    if len(data) <= n_params:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smf.ols(formula, data=data).fit()


def _stats(res, n: int, r2_defined: bool) -> FitStats:
    if res is None:
        return FitStats(n=n)
    resid = np.asarray(res.resid, dtype=float)
    return FitStats(
        r2=float(res.rsquared) if r2_defined else _NAN,
        rmse=float(np.sqrt(np.mean(resid**2))),
        mae=float(np.mean(np.abs(resid))),
        n=n,
        df_model=float(res.df_model),
    )


def fit_regression(
    df: pl.DataFrame, metric: str, *, problem: str | None = None, method: str | None = None
) -> RegressionResult:
    """Fit the Layer / Trace / Both models of one (problem, method) slice of the analysis frame for ``metric``.

    ``df`` needs columns ``layer``, ``trace`` and ``metric``. Never raises on degenerate data (see module doc).
    """
    data, dropped = _clean(df, metric)
    n = len(data)
    n_layers = int(data["layer"].nunique()) if n else 0
    notes: list[str] = []
    if dropped:
        notes.append(f"dropped {dropped} rows with null/NaN trace or score")
    if n == 0:
        notes.append("no rows")
        empty = FitStats(n=0)
        return RegressionResult(problem, method, metric, 0, 0, empty, empty, empty, _NAN, _NAN, _NAN, _NAN,
                                "; ".join(notes))
    score_var = float(np.var(data["score"].to_numpy()))
    trace_var = float(np.var(data["trace"].to_numpy()))
    r2_defined = score_var > 0
    if not r2_defined:
        notes.append("constant score: R² undefined")
    layer_ok, trace_ok = n_layers >= 2, trace_var > 0
    if not layer_ok:
        notes.append("single edit layer: C(layer) has one level, Layer/Both models not fit")
    if not trace_ok:
        notes.append("constant trace: Trace/Both models not fit")

    fits = {}
    specs = (("layer", n_layers, layer_ok), ("trace", 2, trace_ok), ("both", 2 * n_layers, layer_ok and trace_ok))
    with single_blas_thread():
        for name, k, ok in specs:
            fits[name] = _fit(FORMULAS[name], data, k) if ok else None
            if ok and fits[name] is None:
                notes.append(f"too few rows for the {name.capitalize()} model (n={n} ≤ {k} parameters)")
    st = {name: _stats(fits[name], n, r2_defined) for name in fits}

    f = df_diff = p = _NAN
    lay, both = fits["layer"], fits["both"]
    if lay is not None and both is not None:
        df_diff = float(lay.df_resid - both.df_resid)
        if df_diff <= 0:
            notes.append("Both adds no degrees of freedom over Layer (trace collinear with layer): no F-test")
        elif both.ssr <= 1e-12 * max(lay.ssr, 1e-300):
            notes.append("Both model fits exactly: F-test undefined")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f, p, df_diff = (float(x) for x in both.compare_f_test(lay))
    r2_diff = st["both"].r2 - st["layer"].r2
    return RegressionResult(problem, method, metric, n, n_layers, st["layer"], st["trace"], st["both"],
                            float(r2_diff), f, df_diff, p, "; ".join(notes))


def _groups(analysis: pl.DataFrame, by: Sequence[str]):
    if not by:
        yield {}, analysis
        return
    missing = [c for c in by if c not in analysis.columns]
    if missing:
        raise ValueError(f"analysis frame is missing grouping columns {missing}")
    for key, sub in analysis.sort(list(by)).group_by(list(by), maintain_order=True):
        yield dict(zip(by, key)), sub


def _metrics(analysis: pl.DataFrame, metrics: Sequence[str] | str | None) -> list[str]:
    if metrics is None:
        return [c for c in analysis.columns if c.endswith("_score")]
    return [metrics] if isinstance(metrics, str) else list(metrics)


def fit_regressions(
    analysis: pl.DataFrame,
    metrics: Sequence[str] | str | None = None,
    *,
    by: Sequence[str] = ("problem", "method"),
) -> list[RegressionResult]:
    """:func:`fit_regression` for every (problem, method) group × metric (default: every ``*_score`` column).

    Runs under :func:`single_blas_thread` (statsmodels' pinv/SVD of a ~6000 × 18 design is ~20× slower on
    multithreaded OpenBLAS when the cores are shared).
    """
    out = []
    with single_blas_thread():
        for key, sub in _groups(analysis, by):
            for m in _metrics(analysis, metrics):
                out.append(fit_regression(sub, m, problem=key.get("problem"), method=key.get("method")))
    return out


_RESULT_SCHEMA = {
    "problem": pl.String, "method": pl.String, "metric": pl.String, "n": pl.Int64, "n_layers": pl.Int64,
    **{f"{s}_{m}": pl.Float64 for m in ("layer", "trace", "both") for s in ("r2", "rmse", "mae")},
    "r2_diff": pl.Float64, "f": pl.Float64, "df_diff": pl.Float64, "p": pl.Float64, "note": pl.String,
}


def results_frame(results: Sequence[RegressionResult]) -> pl.DataFrame:
    """One row per result: problem, method, metric, n, n_layers, r2_/rmse_/mae_{layer,trace,both}, r2_diff, f,
    df_diff, p, note."""
    rows = [r.row() for r in results]
    return pl.DataFrame(rows, schema=_RESULT_SCHEMA) if rows else pl.DataFrame(schema=_RESULT_SCHEMA)


def regression_table(
    analysis: pl.DataFrame,
    metrics: Sequence[str] | str | None = None,
    *,
    by: Sequence[str] = ("problem", "method"),
) -> pl.DataFrame:
    """Long results frame of all regressions (the numbers behind Tables 1, 3–8 and Fig. 6).

    For the App. B concentrated-effects analysis (Table 2) pass ``analysis.filter(pl.col("concentrated"))``
    (see :func:`stats.join.join_trace` with ``with_concentrated=True``).
    """
    return results_frame(fit_regressions(analysis, metrics, by=by))


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson ρ and two-sided p (scipy), with Spearman and both intervals beside it (:class:`Correlation`), NaN-safe:
    drops non-finite pairs; NaN with a note if n < 3 or either
    variable is constant."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    if n < 3:
        return Correlation(_NAN, _NAN, n, f"too few rows (n={n} < 3)")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return Correlation(_NAN, _NAN, n, "constant " + ("trace" if np.ptp(xa) == 0 else "score"))
    r = sps.pearsonr(xa, ya)
    rs = sps.spearmanr(xa, ya)
    rho, srho = float(r.statistic), float(rs.statistic)
    return Correlation(rho, float(r.pvalue), n, "", *fisher_interval(rho, n), srho, float(rs.pvalue),
                       *fisher_interval(srho, n, spearman=True))


def layer_correlations(
    analysis: pl.DataFrame,
    metrics: Sequence[str] | str | None = None,
    *,
    by: Sequence[str] = ("problem", "method"),
) -> pl.DataFrame:
    """Per edit layer Pearson ρ of score vs trace (Fig. 4: ρ = −0.13 at GPT-J layer 6; Figs. 15–18).

    Columns: problem, method, metric, layer, n, rho, p, ci_low, ci_high (Pearson, Fisher z), spearman, spearman_p,
    spearman_ci_low, spearman_ci_high, note (:class:`Correlation`).
    """
    rows = []
    for key, sub in _groups(analysis, by):
        for layer, lsub in sub.sort("layer").group_by("layer", maintain_order=True):
            for m in _metrics(analysis, metrics):
                c = pearson(lsub["trace"].to_numpy(), lsub[m].to_numpy())
                rows.append({"problem": key.get("problem"), "method": key.get("method"), "metric": m,
                             "layer": int(layer[0]), **asdict(c)})
    stats_cols = ["rho", "p", "ci_low", "ci_high", "spearman", "spearman_p", "spearman_ci_low", "spearman_ci_high"]
    schema = {"problem": pl.String, "method": pl.String, "metric": pl.String, "layer": pl.Int64,
              **{c: pl.Float64 for c in stats_cols}, "n": pl.Int64, "note": pl.String}
    cols = ["problem", "method", "metric", "layer", "n", *stats_cols, "note"]
    return (pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)).select(cols)
