"""Tables in the layout of Hase et al. 2023 (Tables 1–8), as polars frames and Markdown strings.

* Table 1 / Table 2 (concentrated subset): ``Method | Layer | Tracing Effect | Both`` R² for one method.
* Tables 3–6 (rewrite / paraphrase / neighborhood / overall): ``Editing Problem | Method | Layer | Trace | Both |
  Diff | p-value``, methods labelled as in the paper ("FT (1 layer)", "FT (5 layers)", "ROME (1 layer)",
  "MEMIT (5 layers)"), p-values below 1e-4 printed as "<1e-4".
* Tables 7–8: ``Edit Metric | Regression Metric | Predictor(s) | Value`` with R², RMSE, MAE.

Frames hold numbers (NaN where a model could not be fit); Markdown formats them (3 decimals, "n/a" for NaN) and
blanks repeated group labels like the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import polars as pl

from locedit.editors.methods import DEFAULT_METHOD, EDIT_METHODS
from locedit.problems.variants import DEFAULT_PROBLEM, PROBLEM_NAMES, PROBLEMS

__all__ = [
    "PROBLEM_ORDER",
    "PROBLEM_LABELS",
    "METHOD_ORDER",
    "METHOD_LABELS",
    "METRIC_LABELS",
    "TABLE_METRICS",
    "problem_label",
    "method_label",
    "format_p",
    "mean_half_width",
    "format_num",
    "table1",
    "r2_table",
    "error_table",
    "correlation_table",
    "to_markdown",
    "paper_tables",
    "score_summary",
    "with_reached",
    "CONVERGENCE_COLUMNS",
    "REACHED_P_TARGET",
    "sort_paper_order",
]

# Problem and method names, order and labels come from the registries (problems.PROBLEMS, editors.EDIT_METHODS).
PROBLEM_ORDER = PROBLEM_NAMES
PROBLEM_LABELS = {name: p.label for name, p in PROBLEMS.items()}
METHOD_ORDER = tuple(EDIT_METHODS)
METHOD_LABELS = {name: m.label for name, m in EDIT_METHODS.items()}
METRIC_LABELS = {
    "rewrite_score": "Rewrite Score",
    "paraphrase_score": "Paraphrase Score",
    "neighborhood_score": "Neighborhood Score",
    "overall_score": "Overall Score",
    "essence_score": "Essence Score",
}
#: paper table number → outcome metric (Tables 3–6).
TABLE_METRICS = {3: "rewrite_score", 4: "paraphrase_score", 5: "neighborhood_score", 6: "overall_score"}


def problem_label(problem: str | None) -> str:
    return PROBLEM_LABELS.get(problem, str(problem)) if problem is not None else ""


def method_label(method: str | None, *, short: bool = False) -> str:
    """Paper label: "FT (1 layer)", "ROME (1 layer)", ...; ``short=True`` drops the parenthesis (Table 1)."""
    if method is None:
        return ""
    lab = METHOD_LABELS.get(method, method.upper())
    return lab.split(" (")[0] if short else lab


def _order(value: str | None, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


def _isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def mean_half_width(sd: float | None, n: int, level: float = 0.95) -> float:
    """Half-width of the ``level`` t-interval of a mean of ``n`` values (facts) with sample standard deviation
    ``sd``: t_{(1+level)/2, n−1} · sd / √n (NaN for n < 2). Every "mean ± 95 %" over facts in locedit is this."""
    from scipy import stats as sps

    if n < 2 or _isnan(sd):
        return float("nan")
    return float(sps.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n))


def format_p(p: float | None) -> str:
    """p-values as in Tables 3–6: "<1e-4" below 1e-4, else 3 decimals; "n/a" when undefined."""
    if _isnan(p):
        return "n/a"
    return "<1e-4" if p < 1e-4 else f"{p:.3f}"


def format_num(x: float | None, digits: int = 3) -> str:
    return "n/a" if _isnan(x) else f"{x:.{digits}f}"


def sort_paper_order(results: pl.DataFrame) -> pl.DataFrame:
    """Rows in the paper's problem order, then method order (names outside the registries last)."""
    po = {v: i for i, v in enumerate(PROBLEM_ORDER)}
    mo = {v: i for i, v in enumerate(METHOD_ORDER)}
    return results.with_columns(
        pl.col("problem").replace_strict(po, default=len(po), return_dtype=pl.Int64).alias("_po"),
        pl.col("method").replace_strict(mo, default=len(mo), return_dtype=pl.Int64).alias("_mo"),
    ).sort(["_po", "problem", "_mo", "method"]).drop("_po", "_mo")


def _pick(results: pl.DataFrame, metric: str) -> pl.DataFrame:
    sub = results.filter(pl.col("metric") == metric)
    if sub.height == 0:
        raise ValueError(f"no regression results for metric {metric!r}; have {results['metric'].unique().to_list()}")
    return sort_paper_order(sub)


def table1(
    results: pl.DataFrame, *, problem: str = DEFAULT_PROBLEM, method: str = DEFAULT_METHOD, metric: str = "rewrite_score"
) -> pl.DataFrame:
    """Table 1 (and Table 2 on the concentrated subset): R² of Layer / Tracing Effect / Both for one method.

    ``results`` is :func:`stats.regressions.regression_table` output.
    """
    sub = _pick(results, metric).filter((pl.col("problem") == problem) & (pl.col("method") == method))
    if sub.height == 0:
        raise ValueError(f"no results for problem={problem!r}, method={method!r}")
    return sub.select(
        pl.lit(method_label(method, short=True)).alias("Method"),
        pl.col("r2_layer").alias("Layer"),
        pl.col("r2_trace").alias("Tracing Effect"),
        pl.col("r2_both").alias("Both"),
    )


def r2_table(results: pl.DataFrame, metric: str = "rewrite_score") -> pl.DataFrame:
    """Tables 3–6: Editing Problem | Method | Layer | Trace | Both | Diff | Diff / (1 − Layer) | p-value (R² values,
    the added effect as a share of what the layer leaves (:func:`stats.added_effect.pooled_partial_r2`), F-test p)."""
    from locedit.stats.added_effect import pooled_partial_r2

    sub = _pick(results, metric)
    return pl.DataFrame(
        {
            "Editing Problem": [problem_label(v) for v in sub["problem"]],
            "Method": [method_label(v) for v in sub["method"]],
            "Layer": sub["r2_layer"],
            "Trace": sub["r2_trace"],
            "Both": sub["r2_both"],
            "Diff": sub["r2_diff"],
            "Diff / (1 − Layer)": [pooled_partial_r2(d, lay) for d, lay in zip(sub["r2_diff"], sub["r2_layer"])],
            "p-value": sub["p"],
        },
        schema_overrides={"Diff / (1 − Layer)": pl.Float64},
    )


def error_table(
    results: pl.DataFrame,
    *,
    problem: str = DEFAULT_PROBLEM,
    method: str = DEFAULT_METHOD,
    metrics: Sequence[str] = ("rewrite_score", "overall_score"),
    predictors: Sequence[str] = ("layer", "trace"),
) -> pl.DataFrame:
    """Tables 7–8: Edit Metric | Regression Metric | Predictor(s) | Value (R², RMSE, MAE per model)."""
    names = {"layer": "Layer", "trace": "Tracing Effect", "both": "Both"}
    rows = []
    for metric in metrics:
        sub = _pick(results, metric).filter((pl.col("problem") == problem) & (pl.col("method") == method))
        if sub.height == 0:
            raise ValueError(f"no results for problem={problem!r}, method={method!r}, metric={metric!r}")
        r = sub.row(0, named=True)
        for stat, stat_label in (("r2", "R^2"), ("rmse", "RMSE"), ("mae", "MAE")):
            for pred in predictors:
                rows.append((METRIC_LABELS.get(metric, metric), stat_label, names[pred], r[f"{stat}_{pred}"]))
    return pl.DataFrame(rows, schema=["Edit Metric", "Regression Metric", "Predictor(s)", "Value"], orient="row")


def correlation_table(
    correlations: pl.DataFrame, *, problem: str = DEFAULT_PROBLEM, method: str = DEFAULT_METHOD,
    metric: str = "rewrite_score",
) -> pl.DataFrame:
    """Per-layer correlations (the numbers in the Fig. 4 / 15–18 panel titles): Layer | n | Pearson rho | 95% CI |
    p-value | Spearman rho | 95% CI (Spearman) — Spearman's beside Pearson's, as the tracing covariate has extreme
    values."""
    sub = correlations.filter(
        (pl.col("problem") == problem) & (pl.col("method") == method) & (pl.col("metric") == metric)
    ).sort("layer")

    def ci(lo: str, hi: str) -> pl.Expr:
        return pl.format("[{}, {}]", pl.col(lo).round(2), pl.col(hi).round(2))

    return sub.select(pl.col("layer").alias("Layer"), "n", pl.col("rho").alias("Pearson rho"),
                      ci("ci_low", "ci_high").alias("95% CI"), pl.col("p").alias("p-value"),
                      pl.col("spearman").alias("Spearman rho"),
                      ci("spearman_ci_low", "spearman_ci_high").alias("95% CI (Spearman)"))


def to_markdown(
    df: pl.DataFrame,
    *,
    digits: int = 3,
    p_columns: Sequence[str] = ("p-value",),
    blank_repeats: Sequence[str] = (),
    title: str | None = None,
    formatters: Mapping[str, Callable[[object], str]] | None = None,
) -> str:
    """GitHub-flavoured Markdown table. Floats → ``digits`` decimals ("n/a" for NaN/null), ``p_columns`` via
    :func:`format_p`; consecutive repeated labels in ``blank_repeats`` (hierarchically, left to right) are blanked
    like the paper's tables. Pipes in cells are escaped."""
    formatters = dict(formatters or {})
    cols = df.columns

    def fmt(col: str, v) -> str:
        if col in formatters:
            return formatters[col](v)
        if col in p_columns:
            return format_p(v)
        if isinstance(v, float) or v is None:
            return format_num(v, digits) if not (v is None and df.schema[col] == pl.String) else ""
        return str(v)

    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("| " + " | ".join("---" if df.schema[c] == pl.String else "---:" for c in cols) + " |")
    prev: tuple | None = None
    for row in df.iter_rows():
        cells = [fmt(c, v).replace("|", "\\|") for c, v in zip(cols, row)]
        if prev is not None:
            same = True
            for i, c in enumerate(cols):
                if c not in blank_repeats:
                    continue
                same = same and row[i] == prev[i]
                if same:
                    cells[i] = ""
        prev = row
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = (
    "rewrite_score", "paraphrase_score", "neighborhood_score", "overall_score", "essence_score",
    "p_rewrite_pre", "p_rewrite_post", "edit_seconds",
)
REACHED_P_TARGET = 0.9
"""An edit's optimisation *reached its target* when the mean p(target) over its own optimisation prompts ended at or
above this (ROME's early stop, NLL < 0.05, is p ≈ 0.95; 0.9 leaves room for the last step's noise)."""

CONVERGENCE_COLUMNS = ("opt_reached", "opt_steps", "opt_final_loss", "opt_p_target", "opt_delta_ratio",
                       "opt_clamped", "opt_bound_share")
"""The edits table's record of how each edit's optimisation ended (``problems.run.EditOutcome``), plus
``opt_reached`` (:func:`with_reached`): their means per group are the report's convergence panel (mean of
``opt_reached`` = share of edits that reached their target; of ``opt_clamped`` = share whose ‖δ‖ ended at the clamp
bound; of ``opt_bound_share`` = mean share of FT entries at the L∞ bound)."""


def with_reached(edits: pl.DataFrame, threshold: float = REACHED_P_TARGET) -> pl.DataFrame:
    """``edits`` with ``opt_reached`` = 1.0 when the optimisation's final mean p(target) ≥ ``threshold``, 0.0 below,
    null where the edit recorded none (studies run before convergence was recorded have no ``opt_p_target``)."""
    if "opt_p_target" not in edits.columns:
        return edits
    p = pl.col("opt_p_target").cast(pl.Float64).fill_nan(None)
    return edits.with_columns((p >= threshold).cast(pl.Float64).alias("opt_reached"))


def score_summary(
    edits: pl.DataFrame, by: Sequence[str] = ("problem", "method", "layer"), columns: Sequence[str] = SUMMARY_COLUMNS
) -> pl.DataFrame:
    """Means of ``columns`` (those present; NaN ignored) per group of ``by``, with ``n`` edits per group, in the
    paper's problem and method order — e.g. mean rewrite/paraphrase/neighborhood/essence per problem × layer."""
    missing = [c for c in by if c not in edits.columns]
    if missing:
        raise ValueError(f"edits table has no column(s) {missing}; columns: {edits.columns}")
    cols = [c for c in columns if c in edits.columns]
    out = edits.group_by(list(by)).agg(
        pl.len().alias("n"), *[pl.col(c).fill_nan(None).mean().alias(c) for c in cols]
    )
    orders = {"problem": PROBLEM_ORDER, "method": METHOD_ORDER}
    keys = [f"_o_{c}" for c in by]
    out = out.with_columns(
        pl.col(c).map_elements(lambda v, o=orders[c]: _order(v, o), return_dtype=pl.Int64).alias(k)
        if c in orders else pl.col(c).alias(k)
        for c, k in zip(by, keys)
    )
    return out.sort(keys).drop(keys)


def paper_tables(
    results: pl.DataFrame,
    *,
    concentrated_results: pl.DataFrame | None = None,
    concentrated_top_results: pl.DataFrame | None = None,
    problem: str = DEFAULT_PROBLEM,
    method: str = DEFAULT_METHOD,
) -> dict[str, str]:
    """All tables that ``results`` can fill, as Markdown, keyed "Table 1", "Table 3 (rewrite)", ...

    Tables needing a missing metric / method are skipped. ``concentrated_results`` (regressions on the App. B
    concentrated-effects subset) adds "Table 2"; ``concentrated_top_results`` (the 10 % most concentrated facts by
    rank, the paper's §5.3 wording) adds "Table 2 (top 10 % by rank)".
    """
    out: dict[str, str] = {}
    have = set(results["metric"].unique().to_list()) if results.height else set()

    def _try(name: str, fn: Callable[[], str]) -> None:
        try:
            out[name] = fn()
        except ValueError:
            pass

    _try("Table 1", lambda: to_markdown(table1(results, problem=problem, method=method),
                                        title="R² for predicting rewrite score"))
    if concentrated_results is not None and concentrated_results.height:
        _try("Table 2", lambda: to_markdown(table1(concentrated_results, problem=problem, method=method),
                                            title="R² on the concentrated-effects subset"))
    if concentrated_top_results is not None and concentrated_top_results.height:
        _try("Table 2 (top 10 % by rank)", lambda: to_markdown(
            table1(concentrated_top_results, problem=problem, method=method),
            title="R² on the 10 % of facts with the most concentrated effects (by the peak's share of the curve)"))
    for num, metric in TABLE_METRICS.items():
        if metric in have:
            short = metric.removesuffix("_score")
            _try(f"Table {num} ({short})", lambda m=metric: to_markdown(
                r2_table(results, m), blank_repeats=("Editing Problem",),
                title=f"{METRIC_LABELS[m]} Table: R² values and F-test (Both vs Layer)"))
    err_metrics = [m for m in ("rewrite_score", "overall_score") if m in have]
    if err_metrics:
        _try("Table 7", lambda: to_markdown(
            error_table(results, problem=problem, method=method, metrics=err_metrics),
            blank_repeats=("Edit Metric", "Regression Metric"), title="Regression error metrics"))
    return out
