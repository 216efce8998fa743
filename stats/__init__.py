"""locedit.stats: does localization inform editing? — the analysis of Hase et al. 2023 (§4, §5.3, App. B–C).

Pipeline (all on polars frames, see ``docs/CONTRACTS.md``)::

    analysis = join_trace(edits, trace, kind="mlp", window=5, with_concentrated=True)   # §4.1
    results = regression_table(analysis)                                               # Tables 1, 3–8
    conc = regression_table(analysis.filter(pl.col("concentrated")))                   # Table 2
    corr = layer_correlations(analysis)                                                # Figs. 4, 15–18
    tables = paper_tables(results, concentrated_results=conc)                          # Markdown
    html = report_html(tables, {"Fig. 6": fig_r2_bars(results)}, title="...")

Modules: ``collapse`` (grid → per-layer effects, peak layer, concentrated rule), ``join`` (edits × tracing),
``regressions`` (OLS / F-test / Pearson), ``tables`` (paper layouts, Markdown), ``figures`` (plotly), ``report``.
"""

from stats.collapse import (
    COLLAPSES,
    CONCENTRATION_MAX_OTHERS,
    CONCENTRATION_THRESHOLD,
    Collapse,
    concentrated_facts,
    fractional_effect,
    is_concentrated,
    peak_cell,
    peak_layers,
    per_layer_effect,
    per_layer_effects,
    with_fractional,
)
from stats.figures import (
    fig_peak_layers,
    fig_r2_bars,
    fig_score_vs_trace,
    fig_scores_by_layer,
    fig_trace_heatmap,
    fig_window_effects,
    png_available,
    save_html,
    save_png,
)
from stats.join import ANALYSIS_KEYS, DEFAULT_KIND, DEFAULT_WINDOW, join_trace, score_columns
from stats.regressions import (
    FORMULAS,
    Correlation,
    FitStats,
    RegressionResult,
    fit_regression,
    fit_regressions,
    layer_correlations,
    pearson,
    regression_table,
    results_frame,
)
from stats.report import frame_to_html, markdown_to_html, report_html, write_report
from stats.tables import (
    METHOD_LABELS,
    METHOD_ORDER,
    METRIC_LABELS,
    PROBLEM_LABELS,
    PROBLEM_ORDER,
    TABLE_METRICS,
    correlation_table,
    error_table,
    format_num,
    format_p,
    method_label,
    paper_tables,
    problem_label,
    r2_table,
    table1,
    to_markdown,
)

__all__ = [
    "ANALYSIS_KEYS",
    "COLLAPSES",
    "CONCENTRATION_MAX_OTHERS",
    "CONCENTRATION_THRESHOLD",
    "Collapse",
    "Correlation",
    "DEFAULT_KIND",
    "DEFAULT_WINDOW",
    "FORMULAS",
    "FitStats",
    "METHOD_LABELS",
    "METHOD_ORDER",
    "METRIC_LABELS",
    "PROBLEM_LABELS",
    "PROBLEM_ORDER",
    "RegressionResult",
    "TABLE_METRICS",
    "concentrated_facts",
    "correlation_table",
    "error_table",
    "fig_peak_layers",
    "fig_r2_bars",
    "fig_score_vs_trace",
    "fig_scores_by_layer",
    "fig_trace_heatmap",
    "fig_window_effects",
    "fit_regression",
    "fit_regressions",
    "format_num",
    "format_p",
    "fractional_effect",
    "frame_to_html",
    "is_concentrated",
    "join_trace",
    "layer_correlations",
    "markdown_to_html",
    "method_label",
    "paper_tables",
    "peak_cell",
    "peak_layers",
    "pearson",
    "per_layer_effect",
    "per_layer_effects",
    "png_available",
    "problem_label",
    "r2_table",
    "regression_table",
    "report_html",
    "results_frame",
    "save_html",
    "save_png",
    "score_columns",
    "table1",
    "to_markdown",
    "with_fractional",
    "write_report",
]
