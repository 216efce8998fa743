"""Plotly figures of Hase et al. 2023: Figs. 1/11 (peak layers), 2 (tracing heatmap), 4/15–18 (score vs tracing
effect per edit layer), 6 (R² bars), 7 (scores by edit layer), 10 (effect vs tracing window).

Every builder is a pure function of polars frames returning a ``go.Figure``. :func:`save_html` writes a figure;
:func:`save_png` needs kaleido and degrades (returns False with a message) when it is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from locedit.stats.collapse import Collapse, peak_layers, per_layer_effects, select_localization, with_fractional
from locedit.stats.regressions import layer_correlations, pearson
from locedit.stats.report import report_html  # re-exported: the report is the figures' consumer
from locedit.editors.methods import DEFAULT_METHOD
from locedit.problems.variants import DEFAULT_PROBLEM
from locedit.tracer.vocab import LOCALIZATIONS
from locedit.editors.tokens import EDIT_TOKENS, token_label
from locedit.stats.tables import (METHOD_ORDER, METRIC_LABELS, PROBLEM_ORDER, mean_half_width, method_label,
                                  problem_label)
from locedit.tracer.atomic import write_atomic

__all__ = [
    "fig_peak_layers",
    "fig_trace_heatmap",
    "fig_score_vs_trace",
    "fig_r2_bars",
    "fig_scores_by_layer",
    "fig_scores_by_token_layer",
    "fig_window_effects",
    "fig_localization_r2",
    "fig_localization_correlations",
    "save_html",
    "save_png",
    "png_available",
    "report_html",
]

LAYER_COLOR, BOTH_COLOR = "#1f77b4", "#ff7f0e"  # Fig. 6: blue = Layer, orange = Layer + Tracing


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), v))


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return max(1, math.ceil(n / cols)), cols


def fig_peak_layers(
    trace: pl.DataFrame,
    *,
    kind: str = "mlp",
    windows: Sequence[int] | None = None,
    n_layers: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Fig. 1 (one window; paper: MLP, window 10) / Fig. 11 (one panel per window): histogram of each fact's peak
    tracing layer (argmax over (token, layer)). ``windows=None`` uses every window in the table (the paper's Fig. 1
    is window 10: pass ``windows=(10,)``)."""
    peaks = peak_layers(trace, kind=kind)
    wins = sorted(peaks["window"].unique().to_list()) if windows is None else list(windows)
    if n_layers is None:
        n_layers = int(trace["layer"].max()) + 1
    rows, cols = _grid(len(wins), 2)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"window {w}" for w in wins])
    for i, w in enumerate(wins):
        sub = peaks.filter(pl.col("window") == w)
        counts = sub.group_by("peak_layer").len()
        cmap = dict(zip(counts["peak_layer"].to_list(), counts["len"].to_list()))
        fig.add_trace(
            go.Bar(x=list(range(n_layers)), y=[cmap.get(layer, 0) for layer in range(n_layers)], name=f"window {w}",
                   marker_color=LAYER_COLOR, showlegend=False),
            row=i // cols + 1, col=i % cols + 1,
        )
    fig.update_xaxes(title_text="peak tracing layer")
    fig.update_yaxes(title_text="number of facts")
    n = peaks.filter(pl.col("window").is_in(wins))["fact_id"].n_unique()
    fig.update_layout(title=title or f"Where facts peak under causal tracing ({kind}, n = {n} facts)", bargap=0.1)
    return fig


def fig_trace_heatmap(
    trace: pl.DataFrame,
    fact_id: str,
    *,
    kind: str = "mlp",
    window: int = 10,
    value: str = "prob",
    title: str | None = None,
    localization: str | None = None,
) -> go.Figure:
    """Fig. 2: one fact's tracing grid, tokens (rows, subject tokens marked with *) × layers.

    ``value="prob"`` shows the restored p(o_true) (paper), ``"fractional"`` the fractional effect;
    ``localization``: which method's grid (default noise, see :func:`stats.collapse.select_localization`).
    """
    if value not in ("prob", "fractional"):
        raise ValueError("value must be 'prob' or 'fractional'")
    sub = select_localization(trace, localization).filter((pl.col("fact_id") == fact_id) & (pl.col("kind") == kind) & (pl.col("window") == window))
    if sub.height == 0:
        raise ValueError(f"no tracing rows for fact_id={fact_id!r}, kind={kind!r}, window={window}")
    if value == "fractional":
        sub = with_fractional(sub)
    toks = (sub.group_by("token_index").agg(pl.col("token").first(), pl.col("is_subject").first())
            .sort("token_index"))
    layers = sorted(sub["layer"].unique().to_list())
    cell = {(t, lay): v for t, lay, v in sub.select("token_index", "layer", value).iter_rows()}
    z = [[cell.get((t, lay)) for lay in layers] for t in toks["token_index"].to_list()]
    labels = [f"{tok}*" if subj else tok for tok, subj in zip(toks["token"].to_list(), toks["is_subject"].to_list())]
    # make labels unique so plotly does not merge rows with the same token text
    ylab = [f"{lab} ({i})" if labels.count(lab) > 1 else lab for i, lab in zip(toks["token_index"].to_list(), labels)]
    fig = go.Figure(go.Heatmap(z=z, x=layers, y=ylab, colorscale="Purples",
                               colorbar=dict(title="p(o_true)" if value == "prob" else "fractional")))
    fig.update_yaxes(autorange="reversed", type="category")
    p_clean = sub["p_clean"].first() if "p_clean" in sub.columns else None
    p_noised = sub["p_noised"].first() if "p_noised" in sub.columns else None
    extra = ""
    if p_clean is not None and p_noised is not None:
        extra = f" — p_clean = {p_clean:.3f}, p_noised = {p_noised:.3f}"
    fig.update_layout(title=title or f"Causal tracing, {kind} window {window}: {fact_id}{extra}",
                      xaxis_title="layer")
    return fig


def fig_score_vs_trace(
    analysis: pl.DataFrame,
    *,
    problem: str = DEFAULT_PROBLEM,
    method: str = DEFAULT_METHOD,
    metric: str = "rewrite_score",
    layers: Sequence[int] | None = None,
    cols: int = 3,
    title: str | None = None,
) -> go.Figure:
    """Fig. 4 (one layer) / Figs. 15–18 (all edit layers): score vs tracing effect, one panel per edit layer,
    dashed red y = x line, per-panel Pearson ρ in the subplot title."""
    sub = analysis.filter((pl.col("problem") == problem) & (pl.col("method") == method))
    if sub.height == 0:
        raise ValueError(f"no analysis rows for problem={problem!r}, method={method!r}")
    lays = sorted(sub["layer"].unique().to_list()) if layers is None else list(layers)
    rows, cols = _grid(len(lays), cols)
    titles, data = [], []
    for lay in lays:
        lsub = sub.filter(pl.col("layer") == lay)
        c = pearson(lsub["trace"].to_numpy(), lsub[metric].to_numpy())
        rho = "n/a" if math.isnan(c.rho) else f"{c.rho:.2f}"
        titles.append(f"Layer {lay} (ρ = {rho}, n = {c.n})")
        data.append(lsub)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True)
    for i, lsub in enumerate(data):
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(go.Scatter(x=lsub["trace"].to_list(), y=lsub[metric].to_list(), mode="markers",
                                 marker=dict(size=5, opacity=0.5, color=LAYER_COLOR), name="edits",
                                 showlegend=i == 0, text=lsub["fact_id"].to_list()), row=r, col=c)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="red", dash="dash"),
                                 name="y = x", showlegend=i == 0, hoverinfo="skip"), row=r, col=c)
    fig.update_xaxes(title_text="tracing effect", range=[-0.05, 1.05])
    fig.update_yaxes(range=[-0.05, 1.05])
    fig.update_yaxes(title_text=METRIC_LABELS.get(metric, metric), col=1)
    fig.update_layout(title=title or f"{METRIC_LABELS.get(metric, metric)} vs tracing effect: "
                                     f"{problem_label(problem)}, {method_label(method)}",
                      height=max(350, 280 * rows))
    return fig


def fig_r2_bars(results: pl.DataFrame, *, metric: str = "rewrite_score", title: str | None = None) -> go.Figure:
    """Fig. 6: R² of Layer (blue) vs Layer + Tracing (orange) per editing problem × method, values above bars.

    ``results`` is :func:`stats.regressions.regression_table` output; x is a two-level (problem, method) axis.
    """
    sub = results.filter(pl.col("metric") == metric)
    if sub.height == 0:
        raise ValueError(f"no regression results for metric {metric!r}")
    probs = _ordered(sub["problem"].to_list(), PROBLEM_ORDER)
    meths = _ordered(sub["method"].to_list(), METHOD_ORDER)
    xs: list[list[str]] = [[], []]
    y_layer, y_both = [], []
    for pr in probs:
        for me in meths:
            row = sub.filter((pl.col("problem") == pr) & (pl.col("method") == me))
            if row.height == 0:
                continue
            r = row.row(0, named=True)
            xs[0].append(problem_label(pr))
            xs[1].append(method_label(me))
            y_layer.append(r["r2_layer"])
            y_both.append(r["r2_both"])

    def txt(v):
        return [("n/a" if v_ is None or math.isnan(v_) else f"{v_:.3f}") for v_ in v]

    fig = go.Figure([
        go.Bar(x=xs, y=y_layer, name="Layer", marker_color=LAYER_COLOR, text=txt(y_layer), textposition="outside"),
        go.Bar(x=xs, y=y_both, name="Layer + Tracing", marker_color=BOTH_COLOR, text=txt(y_both),
               textposition="outside"),
    ])
    fig.update_layout(barmode="group", yaxis=dict(title="R²", range=[0, 1.1]),
                      title=title or f"R² for predicting {METRIC_LABELS.get(metric, metric).lower()}")
    return fig


def _score_lines_by_layer(
    sub: pl.DataFrame, by: str, groups: Sequence[str], label, metrics: Sequence[str]
) -> go.Figure:
    """Mean score by edit layer, one line per value of ``by`` (in ``groups`` order, named by ``label``), one panel
    per metric, error bars = the 95 % t-interval of the mean over facts (:func:`stats.tables.mean_half_width`;
    Figs. 5 and 7)."""
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics])
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for j, m in enumerate(metrics):
        agg = (sub.group_by(by, "layer")
               .agg(pl.col(m).mean().alias("mean"), pl.col(m).std().alias("sd"), pl.col(m).count().alias("n"))
               .sort("layer"))
        for k, g in enumerate(groups):
            a = agg.filter(pl.col(by) == g)
            ci = [0.0 if n < 2 else mean_half_width(sd or 0.0, n) for sd, n in zip(a["sd"].to_list(), a["n"].to_list())]
            fig.add_trace(go.Scatter(x=a["layer"].to_list(), y=a["mean"].to_list(), mode="lines+markers",
                                     error_y=dict(type="data", array=ci, visible=True), name=label(g),
                                     legendgroup=g, showlegend=j == 0,
                                     line=dict(color=palette[k % len(palette)])), row=1, col=j + 1)
    fig.update_xaxes(title_text="edit layer")
    fig.update_yaxes(range=[-0.05, 1.05])
    fig.update_yaxes(title_text="mean score", col=1)
    return fig


def fig_scores_by_layer(
    edits: pl.DataFrame,
    *,
    problem: str = DEFAULT_PROBLEM,
    metrics: Sequence[str] = ("rewrite_score", "paraphrase_score", "neighborhood_score"),
    title: str | None = None,
) -> go.Figure:
    """Fig. 7 (Figs. 8–9 with other metrics): mean score by edit layer, one line per method, one panel per metric,
    error bars = 95% normal CI of the mean."""
    sub = edits.filter(pl.col("problem") == problem)
    if sub.height == 0:
        raise ValueError(f"no edit rows for problem={problem!r}")
    meths = _ordered(sub["method"].to_list(), METHOD_ORDER)
    fig = _score_lines_by_layer(sub, "method", meths, method_label, metrics)
    fig.update_layout(title=title or f"Edit success by layer: {problem_label(problem)}")
    return fig


def fig_scores_by_token_layer(
    edits: pl.DataFrame,
    *,
    problem: str = DEFAULT_PROBLEM,
    method: str = DEFAULT_METHOD,
    metrics: Sequence[str] = ("rewrite_score", "paraphrase_score", "neighborhood_score", "overall_score"),
    title: str | None = None,
) -> go.Figure:
    """Meng et al. 2022 Fig. 5 analog: mean score by edit layer, one line per edit token rule, one panel per metric,
    error bars = 95% normal CI of the mean over facts."""
    sub = edits.filter((pl.col("problem") == problem) & (pl.col("method") == method))
    if sub.height == 0 or "token" not in sub.columns:
        raise ValueError(f"no edit rows with a token column for problem={problem!r}, method={method!r}")
    sub = sub.with_columns(pl.col("token").cast(pl.String))
    tokens = _ordered(sub["token"].to_list(), list(EDIT_TOKENS))
    metrics = [m for m in metrics if m in sub.columns]
    fig = _score_lines_by_layer(sub, "token", tokens, token_label, metrics)
    fig.update_layout(title=title or f"Edit success by token and layer (Meng et al. Fig. 5): "
                                     f"{method_label(method)}, {problem_label(problem)}")
    return fig


def fig_localization_r2(table: pl.DataFrame, *, collapse: str = "max", subset: str = "all",
                        title: str | None = None) -> go.Figure:
    """Adjusted ΔR² (adjusted R²(Layer × Trace) − adjusted R²(Layer)) per localization method with its bootstrap 95%
    interval, one panel per problem × edit method (:func:`stats.localization.localization_table` rows)."""
    sub = table.filter((pl.col("collapse") == collapse) & (pl.col("subset") == subset))
    if sub.height == 0:
        raise ValueError(f"no comparison rows for collapse={collapse!r}, subset={subset!r}")
    panels = sub.select("problem", "method").unique(maintain_order=True).rows()
    rows, cols = _grid(len(panels), 3)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{problem_label(p)} / {method_label(m)}"
                                                              for p, m in panels])
    locs = [l for l in LOCALIZATIONS if l in sub["localization"].to_list()]
    for k, (p, m) in enumerate(panels):
        a = sub.filter((pl.col("problem") == p) & (pl.col("method") == m))
        a = a.with_columns(pl.col("localization").replace_strict({l: i for i, l in enumerate(locs)}).alias("_o")).sort("_o")
        y = a["r2_diff_adj"].to_list()
        hi = [(h - v) if h is not None and v is not None and not math.isnan(h) else 0.0
              for h, v in zip(a["ci_high"].to_list(), y)]
        lo = [(v - l) if l is not None and v is not None and not math.isnan(l) else 0.0
              for l, v in zip(a["ci_low"].to_list(), y)]
        fig.add_trace(go.Bar(x=[LOCALIZATIONS[l].label for l in a["localization"].to_list()], y=y,
                             error_y=dict(type="data", array=hi, arrayminus=lo, visible=True),
                             marker_color=BOTH_COLOR, showlegend=False,
                             text=[f"n={n}" for n in a["n_facts"].to_list()], textposition="outside"),
                      row=k // cols + 1, col=k % cols + 1)
    fig.update_yaxes(title_text="adjusted ΔR² (95% CI)", col=1)
    fig.update_layout(title=title or f"Does localization predict editing? ΔR² by localization method "
                                     f"(collapse {collapse}, {subset} facts)")
    return fig


def fig_localization_correlations(frames: dict[str, pl.DataFrame], *, problem: str = DEFAULT_PROBLEM,
                                  method: str = DEFAULT_METHOD, metric: str = "rewrite_score",
                                  title: str | None = None) -> go.Figure:
    """Fig. 15 analog per localization method: Pearson ρ of ``metric`` vs the tracing effect at each edit layer,
    one line per method (``frames``: :func:`stats.localization.localization_frames`)."""
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for k, (loc, frame) in enumerate(frames.items()):
        f = frame.filter((pl.col("problem") == problem) & (pl.col("method") == method))
        if f.height == 0:
            continue
        c = layer_correlations(f, metric)
        fig.add_trace(go.Scatter(x=c["layer"].to_list(), y=c["rho"].to_list(), mode="lines+markers",
                                 name=LOCALIZATIONS[loc].label if loc in LOCALIZATIONS else loc,
                                 line=dict(color=palette[k % len(palette)])))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_xaxes(title_text="edit layer")
    fig.update_yaxes(title_text=f"Pearson ρ ({METRIC_LABELS.get(metric, metric)} vs tracing effect)", range=[-1, 1])
    fig.update_layout(title=title or f"Per-layer correlation by localization method: {method_label(method)}, "
                                     f"{problem_label(problem)}")
    return fig


def fig_window_effects(
    trace: pl.DataFrame,
    *,
    kind: str = "mlp",
    collapse: Collapse = "max",
    windows: Sequence[int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Fig. 10: mean per-layer (fractional, collapsed) tracing effect across facts, one line per window size."""
    eff = per_layer_effects(trace, collapse=collapse, kind=kind)
    wins = sorted(eff["window"].unique().to_list()) if windows is None else list(windows)
    agg = eff.group_by("window", "layer").agg(pl.col("effect").mean().alias("mean")).sort("layer")
    fig = go.Figure()
    for w in wins:
        a = agg.filter(pl.col("window") == w)
        fig.add_trace(go.Scatter(x=a["layer"].to_list(), y=a["mean"].to_list(), mode="lines+markers",
                                 name=f"window {w}"))
    fig.update_layout(title=title or f"Tracing effect by layer and window size ({kind}, {collapse} over tokens)",
                      xaxis_title="layer", yaxis_title="mean tracing effect", legend_title="window")
    return fig


def save_html(fig: go.Figure, path: str | Path, *, include_plotlyjs: bool | str = True) -> Path:
    """Write a standalone HTML file (plotly.js inlined by default, so it works offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True))
    return path


def png_available() -> bool:
    """Whether static image export (kaleido) is installed."""
    return importlib.util.find_spec("kaleido") is not None


def save_png(fig: go.Figure, path: str | Path, *, scale: float = 2.0) -> bool:
    """Write a PNG if kaleido is installed; otherwise warn and return False (use :func:`save_html` instead)."""
    if not png_available():
        warnings.warn(f"PNG export skipped for {path}: kaleido is not installed (pip install kaleido); "
                      "use save_html for an interactive figure", RuntimeWarning, stacklevel=2)
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, fig.to_image(format="png", scale=scale))
    except Exception as e:  # kaleido present but broken (e.g. no Chrome): degrade, do not crash a pipeline
        warnings.warn(f"PNG export failed for {path}: {e}", RuntimeWarning, stacklevel=2)
        return False
    return True
