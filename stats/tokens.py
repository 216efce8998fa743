"""Localization vs editing at the grain tracing answers: token × layer (Meng et al. 2022 Fig. 5; Hase et al. 2023
§6, footnote 3: only a datapoint-level analysis can ask whether tracing effects predict *which token* to edit).

* :func:`join_cells` pairs each edit (fact, problem, method, token rule, layer) with the tracing grid's cell at the
  *position the rule named in that fact's prompt* (``token_index``) and the edit layer — not the per-layer max;
* :func:`token_regressions` fits, per (problem, method), OLS models of the score on layer, token, layer × token and
  layer × token + the cell's tracing effect (statsmodels formulas, :data:`TOKEN_FORMULAS`): R² of each, ΔR² of
  adding the effect, its nested-model F-test, and a bootstrap 95 % interval over facts of the *adjusted* ΔR² (the
  plain one is ≥ 0 on any data);
* :func:`best_cell_rate` asks directly: for each fact, is the edited (token, layer) cell with the largest tracing
  effect among its best-editing cells? It reports that rate next to two chance rates and their p-values: the
  *cross-fact* rate (the hit rate when each fact's edits are paired with *another* fact's tracing grid: what tracing
  predicts about editing in general — e.g. "the last subject token at a middle layer" — rather than about this fact)
  with a permutation p-value (tracing grids permuted across facts), which is the test of the question; and the
  uniform rate (the mean share of a fact's cells that are best) with a Poisson-binomial p-value, which assumes the
  peak cell is picked at random and so credits tracing with every regularity shared by all facts.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import polars as pl
import statsmodels.formula.api as smf

from locedit.stats.collapse import select_localization, with_fractional
from locedit.stats.join import DEFAULT_KIND, DEFAULT_WINDOW, score_columns
from locedit.stats.regressions import single_blas_thread

__all__ = [
    "CELL_KEYS",
    "TOKEN_FORMULAS",
    "BestCellRate",
    "TokenRegression",
    "best_cell_rate",
    "best_cell_table",
    "join_cells",
    "poisson_binomial_sf",
    "token_regression_table",
    "token_regressions",
]

CELL_KEYS = ("fact_id", "problem", "method", "token", "layer")
TOKEN_FORMULAS = {
    "layer": "score ~ C(layer)",
    "token": "score ~ C(token)",
    "layer_token": "score ~ C(layer) * C(token)",
    "with_effect": "score ~ C(layer) * C(token) + effect",
}
_NAN = float("nan")


def join_cells(
    edits: pl.DataFrame,
    trace: pl.DataFrame,
    *,
    kind: str = DEFAULT_KIND,
    window: int = DEFAULT_WINDOW,
    scores: Sequence[str] | None = None,
    recompute: bool = True,
    localization: str | None = None,
) -> pl.DataFrame:
    """Frame ``fact_id, problem, method, token, token_index, layer, effect, <scores>``: each edit with the fractional
    tracing effect of grid cell (``token_index``, ``layer``) of its fact (``kind``/``window``).

    Inner join: edits of an untraced fact or cell are dropped; a null (undefined) effect is kept as null.
    """
    scores = list(scores) if scores is not None else score_columns(edits)
    t = select_localization(trace, localization)
    t = with_fractional(t.filter((pl.col("kind") == kind) & (pl.col("window") == window)), recompute=recompute)
    cells = t.select(
        pl.col("fact_id").cast(pl.String), pl.col("token_index").cast(pl.Int64), pl.col("layer").cast(pl.Int64),
        pl.col("fractional").alias("effect"),
    )
    e = edits.select(
        pl.col("fact_id").cast(pl.String), pl.col("problem").cast(pl.String), pl.col("method").cast(pl.String),
        pl.col("token").cast(pl.String), pl.col("token_index").cast(pl.Int64),
        pl.col("layer").cast(pl.Int64), *[pl.col(s).cast(pl.Float64) for s in scores],
    )
    out = e.join(cells, on=["fact_id", "token_index", "layer"], how="inner")
    return out.select(*CELL_KEYS[:4], "token_index", "layer", "effect", *scores).sort(list(CELL_KEYS))


@dataclass(frozen=True)
class TokenRegression:
    """Token-level models for one (problem, method, metric)."""

    problem: str
    method: str
    metric: str
    n: int
    n_facts: int
    n_tokens: int
    n_layers: int
    r2_layer: float
    r2_token: float
    r2_layer_token: float
    r2_with_effect: float
    r2_diff: float  # R²(layer × token + effect) − R²(layer × token)
    r2_diff_adj: float  # the same with adjusted R²; the interval is this one's
    f: float
    p: float
    ci_low: float  # bootstrap 95 % interval of r2_diff_adj over facts
    ci_high: float
    note: str = ""


def _frame(df: pl.DataFrame, metric: str) -> pd.DataFrame:
    sub = df.select(
        pl.col("fact_id"), pl.col(metric).cast(pl.Float64).fill_nan(None).alias("score"), pl.col("layer"),
        pl.col("token"), pl.col("effect").cast(pl.Float64).fill_nan(None),
    ).drop_nulls()
    return pd.DataFrame({c: sub[c].to_numpy() for c in sub.columns})


def _r2(formula: str, data: pd.DataFrame):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smf.ols(formula, data=data).fit()


def _delta_r2(data: pd.DataFrame) -> float:
    """Adjusted-R² gain of adding the cell effect (can be < 0: its interval can contain 0, unlike the plain gain)."""
    if data["score"].var() == 0:
        return _NAN
    return float(_r2(TOKEN_FORMULAS["with_effect"], data).rsquared_adj
                 - _r2(TOKEN_FORMULAS["layer_token"], data).rsquared_adj)


def _bootstrap(data: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % interval of ΔR² over facts resampled with replacement (all of a fact's cells together)."""
    rng = np.random.default_rng(seed)
    groups = {f: g for f, g in data.groupby("fact_id", sort=True)}
    facts = list(groups)
    vals = []
    for _ in range(n_boot):
        pick = rng.choice(len(facts), size=len(facts), replace=True)
        sample = pd.concat([groups[facts[i]] for i in pick], ignore_index=True)
        try:
            v = _delta_r2(sample)
        except (ValueError, np.linalg.LinAlgError):
            continue
        if np.isfinite(v):
            vals.append(v)
    if len(vals) < max(10, n_boot // 2):
        return _NAN, _NAN
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def token_regressions(
    cells: pl.DataFrame,
    metrics: Sequence[str] | str = "rewrite_score",
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> list[TokenRegression]:
    """The :data:`TOKEN_FORMULAS` models per (problem, method) × metric on a :func:`join_cells` frame. Degenerate
    groups (one token rule or one layer, constant score or effect, too few rows) get NaN and a note, never raise."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    out = []
    with single_blas_thread():
        for (problem, method), sub in cells.sort(["problem", "method"]).group_by(["problem", "method"], maintain_order=True):
            for metric in metrics:
                data = _frame(sub, metric)
                n, nf = len(data), int(data["fact_id"].nunique()) if len(data) else 0
                nt = int(data["token"].nunique()) if n else 0
                nl = int(data["layer"].nunique()) if n else 0
                r2 = dict.fromkeys(TOKEN_FORMULAS, _NAN)
                f = p = lo = hi = adj = _NAN
                note = ""
                if nt < 2 or nl < 2:
                    note = f"needs ≥ 2 token rules and ≥ 2 layers (has {nt} and {nl})"
                elif n <= nt * nl + 1:
                    note = f"too few rows (n={n}) for the layer × token model ({nt * nl + 1} parameters)"
                elif data["score"].var() == 0 or data["effect"].var() == 0:
                    note = "constant score or tracing effect: R² or ΔR² undefined"
                else:
                    fits = {k: _r2(v, data) for k, v in TOKEN_FORMULAS.items()}
                    r2 = {k: float(v.rsquared) for k, v in fits.items()}
                    adj = float(fits["with_effect"].rsquared_adj - fits["layer_token"].rsquared_adj)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        f, p, _ = (float(x) for x in fits["with_effect"].compare_f_test(fits["layer_token"]))
                    lo, hi = _bootstrap(data, n_boot, seed) if n_boot else (_NAN, _NAN)
                out.append(TokenRegression(
                    str(problem), str(method), metric, n, nf, nt, nl, r2["layer"], r2["token"], r2["layer_token"],
                    r2["with_effect"], r2["with_effect"] - r2["layer_token"], adj, f, p, lo, hi, note,
                ))
    return out


def token_regression_table(cells: pl.DataFrame, metrics: Sequence[str] | str = "rewrite_score", **kw) -> pl.DataFrame:
    """:func:`token_regressions` as a polars frame (one row per problem × method × metric)."""
    rows = [asdict(r) for r in token_regressions(cells, metrics, **kw)]
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def poisson_binomial_sf(k: int, probs: Sequence[float]) -> float:
    """P(X ≥ k) for X = Σ Bernoulli(p_i), independent (exact dynamic programme)."""
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for q in probs:
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] *= 1 - q
    return float(dist[k:].sum()) if k <= len(probs) else 0.0


@dataclass(frozen=True)
class BestCellRate:
    """For one (problem, method, metric): how often each fact's peak-tracing cell is a best-editing cell."""

    problem: str
    method: str
    metric: str
    n_facts: int
    cells_per_fact: float
    hits: int
    rate: float  # share of facts whose peak-effect cell is among their best-editing cells
    chance: float  # mean over facts of |best cells| / |cells|: the rate if the peak cell were picked at random
    p: float  # one-sided: P(hits ≥ observed) if each fact's hit were Bernoulli(its chance share)
    cross_fact_chance: float = _NAN  # mean over fact pairs i ≠ j: is j's peak cell among i's best cells?
    p_cross_fact: float = _NAN  # one-sided permutation p: tracing grids permuted across facts (the primary null)
    n_permutations: int = 0


def best_cell_rate(
    cells: pl.DataFrame, metric: str = "rewrite_score", *, tol: float = 1e-9, n_permutations: int = 9999,
    seed: int = 0,
) -> list[BestCellRate]:
    """Per (problem, method): for each fact with ≥ 2 edited cells and a defined effect everywhere, its best-editing
    cells are those within ``tol`` of its largest ``metric``; its peak cell is the edited cell with the largest
    tracing effect (ties: every tied cell must be best for a hit). Chance = |best| / |cells| per fact.

    Cross-fact null: with H[i, j] = "fact j's peak cell (by its (token rule, layer)) is among fact i's best cells",
    observed hits = Σ H[i, i]; the null pairs each fact's edits with another fact's tracing: ``cross_fact_chance`` is
    the mean of H off the diagonal, ``p_cross_fact`` = (1 + #{π: Σ H[i, π(i)] ≥ observed}) / (1 + n_permutations)
    over uniform random permutations π of the facts whose edited cells are the group's most common set."""
    rng = np.random.default_rng(seed)
    out = []
    for (problem, method), sub in cells.sort(["problem", "method"]).group_by(["problem", "method"], maintain_order=True):
        hits, chances, sizes = 0, [], []
        best_sets, peak_sets, layouts = [], [], []
        for _, fact in sub.sort(["fact_id", "token", "layer"]).group_by("fact_id", maintain_order=True):
            s = fact[metric].cast(pl.Float64).fill_nan(None).to_numpy()
            e = fact["effect"].cast(pl.Float64).fill_nan(None).to_numpy()
            if len(s) < 2 or np.isnan(s.astype(float)).any() or np.isnan(e.astype(float)).any():
                continue
            s, e = s.astype(float), e.astype(float)
            best = s >= s.max() - tol
            peak = e >= e.max() - tol
            hits += int(best[peak].all())
            chances.append(float(best.mean()))
            sizes.append(len(s))
            best_sets.append(best)
            peak_sets.append(peak)
            layouts.append(tuple(zip(fact["token"].to_list(), fact["layer"].to_list())))
        n = len(chances)
        cross, p_cross = _cross_fact_null(best_sets, peak_sets, layouts, n_permutations, rng)
        out.append(BestCellRate(
            str(problem), str(method), metric, n, float(np.mean(sizes)) if n else _NAN, hits,
            hits / n if n else _NAN, float(np.mean(chances)) if n else _NAN,
            poisson_binomial_sf(hits, chances) if n else _NAN, cross, p_cross, n_permutations if n > 1 else 0,
        ))
    return out


def _cross_fact_null(best_sets, peak_sets, layouts, n_permutations: int, rng) -> tuple[float, float]:
    """(cross-fact chance, permutation p) over the facts sharing the most common cell layout (module docstring)."""
    if not layouts:
        return _NAN, _NAN
    values, counts = np.unique(np.array([hash(x) for x in layouts]), return_counts=True)
    common = values[counts.argmax()]
    keep = [i for i, x in enumerate(layouts) if hash(x) == common]
    if len(keep) < 2:
        return _NAN, _NAN
    B = np.stack([best_sets[i] for i in keep]).astype(float)  # [facts, cells]
    P = np.stack([peak_sets[i] for i in keep]).astype(float)
    # H[i, j] = all of j's peak cells are best for i  <=>  (peak_j · not-best_i) == 0
    H = ((1.0 - B) @ P.T == 0).astype(float)
    m = len(keep)
    observed = float(np.trace(H))
    cross = float((H.sum() - observed) / (m * (m - 1)))
    if n_permutations < 1:
        return cross, _NAN
    perms = np.argsort(rng.random((n_permutations, m)), axis=1)
    null = H[np.arange(m)[None, :], perms].sum(axis=1)
    return cross, float((1 + np.sum(null >= observed - 1e-9)) / (1 + n_permutations))


def best_cell_table(cells: pl.DataFrame, metric: str = "rewrite_score", **kw) -> pl.DataFrame:
    """:func:`best_cell_rate` as a polars frame."""
    rows = [asdict(r) for r in best_cell_rate(cells, metric, **kw)]
    return pl.DataFrame(rows) if rows else pl.DataFrame()
