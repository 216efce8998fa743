"""``locedit report``: the study's tables (paper layout) and figures in one self-contained ``report.html``."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from locedit.editors.tokens import DEFAULT_EDIT_TOKEN
from locedit.progress import incomplete_cells, sittings_line, study_progress
from locedit.rundir import RunDir, collect_tables
from locedit.tracer.atomic import write_atomic

__all__ = ["localization_analysis", "preregistered_sections", "study_analysis", "token_analysis", "write_report"]

_FEW_FACTS = 30  # below this many facts the report says, above the table, that the statistics carry little weight


def own_token_edits(edits: pl.DataFrame) -> pl.DataFrame:
    """The edits at ROME's and MEMIT's own position (the default token rule; FT's rows record it too)."""
    if edits.is_empty():
        return edits
    return edits.filter(pl.col("token") == DEFAULT_EDIT_TOKEN)


def _declared(run_dir: RunDir) -> bool:
    """Whether the run declared its ``[analysis]`` in its config before its data (the pre-registered analysis)."""
    return "analysis" in run_dir.raw_config()


def _units_line(dirs: list[RunDir]) -> str:
    """"D of T" units of the recorded plans, and what an unfinished run's tables are."""
    planned = [d for d in dirs if "plan" in d.provenance()]
    if not planned:
        return "? (no recorded plan)"
    done = total = 0
    for d in planned:
        p = study_progress(d)
        done, total = done + p.done + int(p.stages["failed"].sum()), total + p.total
    if done >= total:
        return f"{done:,} of {total:,} (complete)"
    withheld = "; the pre-registered cells not finished are withheld" if _declared(dirs[0]) else ""
    return f"{done:,} of {total:,}: unfinished — the tables describe the units finished so far{withheld}"


def preregistered_sections(run_dirs: list[RunDir], edits: pl.DataFrame, trace: pl.DataFrame) -> dict[str, str]:
    """The pre-registered analysis of ``run_dirs[0]`` (its config's ``[analysis]``; companions' units merged in
    ``edits`` / ``trace``, edits at each method's own token) as report sections (title → Markdown).

    When the run declared ``[analysis]`` before its data, cells whose planned units have not all finished are
    withheld (:func:`locedit.progress.incomplete_cells`): the primary test runs once, on its planned facts. A run
    that did not declare it gets every result labelled exploratory and nothing withheld."""
    from locedit.stats.preregistered import preregistered_analysis, preregistered_markdown

    declared = _declared(run_dirs[0])
    pre = preregistered_analysis(edits, trace, **run_dirs[0].config().analysis.model_dump(),
                                 incomplete=incomplete_cells(*run_dirs) if declared else None)
    return preregistered_markdown(pre, declared=declared)


def localization_analysis(tables: dict[str, pl.DataFrame], *, kind: str = "mlp", window: int = 5,
                          n_boot: int = 1000) -> dict:
    """The localization-method comparison (:mod:`stats.localization`) when the study localized with more than one
    method: the comparison table (collapses max and last_subject, all and concentrated facts), Reber's paired
    differences against noise, and the per-method analysis frames (None / [] otherwise)."""
    from locedit.stats import localization_frames, localization_table, paired_differences

    trace, edits = tables["tracing"], tables["edits"]
    out: dict = {"table": None, "paired": [], "frames": None}
    edits = own_token_edits(edits)
    if edits.height == 0 or trace.height == 0 or "localization" not in trace.columns:
        return out
    if trace["localization"].n_unique() < 2 or window not in trace.filter(pl.col("kind") == kind)["window"].to_list():
        return out
    out["frames"] = localization_frames(edits, trace, kind=kind, window=window)
    out["table"] = localization_table(edits, trace, kind=kind, window=window, n_boot=n_boot)
    out["paired"] = paired_differences(edits, trace, kind=kind, window=window, n_boot=n_boot)
    return out


def token_analysis(tables: dict[str, pl.DataFrame], *, kind: str = "mlp", window: int = 5, n_boot: int = 500) -> dict:
    """The token × layer analysis (:mod:`stats.tokens`) when the study edited at more than one token rule: the
    cell-level frame, the token-level regressions and the best-cell rate (None entries otherwise)."""
    from locedit.stats import best_cell_table, join_cells, token_regression_table

    trace, edits = tables["tracing"], tables["edits"]
    out: dict = {"cells": None, "regressions": None, "best_cell": None}
    if edits.height == 0 or trace.height == 0 or "token" not in edits.columns or edits["token"].n_unique() < 2:
        return out
    traced = trace.filter(pl.col("kind") == kind)["window"].unique().to_list()
    if window not in traced:
        return out
    cells = join_cells(edits, trace, kind=kind, window=window)
    out.update(cells=cells, regressions=token_regression_table(cells, n_boot=n_boot), best_cell=best_cell_table(cells))
    return out


def study_analysis(tables: dict[str, pl.DataFrame], *, kind: str = "mlp", window: int | None = None) -> dict:
    """Regressions and correlations of a study's tables: the analysis frame joined at ``kind``/``window``
    (default: window 5 if traced, else the largest traced window), regression results on all facts and on the
    concentrated-effects subset, and per-layer correlations."""
    from locedit.stats import join_trace, layer_correlations, regression_table

    trace, edits = tables["tracing"], tables["edits"]
    edits = own_token_edits(edits)  # the paper's analysis: ROME/MEMIT at their own position (the token study is apart)
    out: dict = {"analysis": None, "results": None, "concentrated": None, "concentrated_top": None,
                 "correlations": None, "window": None}
    if trace.height == 0 or edits.height == 0:
        return out
    windows = sorted(trace.filter(pl.col("kind") == kind)["window"].unique().to_list())
    if not windows:
        return out
    window = window if window is not None else (5 if 5 in windows else windows[-1])
    analysis = join_trace(edits, trace, kind=kind, window=window, with_concentrated=True)
    out.update(
        analysis=analysis,
        window=window,
        results=regression_table(analysis),
        concentrated=regression_table(analysis.filter(pl.col("concentrated"))),
        concentrated_top=regression_table(analysis.filter(pl.col("concentrated_top"))),
        correlations=layer_correlations(analysis),
    )
    return out


def write_report(*run_dirs: str | Path, out: str | Path | None = None) -> Path:
    """Merge the run directories (shards) and write ``report.html`` (default: in the first directory) with
    Tables 1–7, Figs. 1, 4/15, 6, 7, 10 and one tracing heatmap; also writes ``tables.md`` beside it."""
    from locedit.stats import (
        CONVERGENCE_COLUMNS,
        REACHED_P_TARGET,
        correlation_table,
        edit_layer_agreement,
        fig_peak_layers,
        fig_r2_bars,
        fig_score_vs_trace,
        fig_scores_by_layer,
        fig_scores_by_token_layer,
        fig_localization_correlations,
        fig_localization_r2,
        fig_trace_heatmap,
        fig_window_effects,
        paper_tables,
        score_summary,
        to_markdown,
        with_reached,
    )
    from locedit.stats.report import write_report as write_html

    dirs = [RunDir(d).require() for d in run_dirs]
    tables = collect_tables(*dirs)
    trace, edits, failures = tables["tracing"], tables["edits"], tables["failures"]
    if trace.is_empty() and edits.is_empty():
        raise ValueError(f"no finished units in {', '.join(str(d.path) for d in dirs)}: nothing to report yet")
    config = dirs[0].config()
    an = study_analysis(tables)
    md: dict[str, str] = {}
    figs = {}
    names = [d.config().name for d in dirs]
    if len(set(names)) > 1:  # companion studies (rundir.companion_conflicts): say what was merged, and whose plan leads
        runs = ", ".join(f"{n} ({d.path})" for n, d in zip(names, dirs))
        md["Studies merged"] = (f"The tables below merge the companion runs {runs} (the union of their units); the "
                                f"pre-registered analysis is {names[0]}'s.")
    if edits.height and trace.height:  # the pre-registered analysis leads; the paper's pooled tables follow
        md.update(preregistered_sections(dirs, own_token_edits(edits), trace))
    if an["results"] is not None and an["results"].height:
        md.update({f"The paper's pooled analysis: {k}": v for k, v in
                   paper_tables(an["results"], concentrated_results=an["concentrated"],
                                concentrated_top_results=an["concentrated_top"]).items()})
        for (problem, method), _ in an["analysis"].group_by(["problem", "method"], maintain_order=True):
            try:
                md[f"Per-layer correlation, {problem} / {method}"] = to_markdown(
                    correlation_table(an["correlations"], problem=problem, method=method)
                )
            except ValueError:
                pass
    n_edit_facts = edits["fact_id"].n_unique() if edits.height else 0
    if 0 < n_edit_facts < _FEW_FACTS:
        md["Statistical weight"] = (
            f"This study edited {n_edit_facts} facts. Below ~{_FEW_FACTS} facts the regressions, correlations and "
            "intervals in this report carry little statistical weight: read them as a check that the pipeline runs, "
            "not as findings.")
    loc = localization_analysis(tables)
    if loc["table"] is not None and loc["table"].height:
        n_facts = int(loc["table"]["n_facts"].max())
        caveat = (f"Only {n_facts} facts: the intervals are wide and these statistics carry little weight "
                  f"(say n ≥ {_FEW_FACTS}).\n\n" if n_facts < _FEW_FACTS else "")
        md["Localization methods compared: ΔR² of adding each method's tracing effect to the edit layer"] = (
            caveat + to_markdown(loc["table"].drop("note"), p_columns=("p",)))
        if loc["paired"]:
            md["Localization methods compared: Reber's question (paired bootstrap over facts)"] = caveat + "\n".join(
                f"- {d.sentence}" for d in loc["paired"])
        figs["Localization methods compared: ΔR² with 95% intervals"] = fig_localization_r2(loc["table"])
        where = edit_layer_agreement(loc["frames"])
        if where.height:
            md["Is a fact best edited where it traces? (per-fact tracing vs rewrite curves over the edited layers, "
               "same fact vs other-fact pairs; p: facts permuted)"] = to_markdown(where, p_columns=("p_r", "p_close"))
        for (problem, method), _ in next(iter(loc["frames"].values())).group_by(["problem", "method"],
                                                                                 maintain_order=True):
            figs[f"Fig. 15 analog by localization method ({problem}, {method})"] = fig_localization_correlations(
                loc["frames"], problem=problem, method=method)
    tok = token_analysis(tables)
    if tok["cells"] is not None and tok["cells"].height:
        n_facts = tok["cells"]["fact_id"].n_unique()
        caveat = (f"Only {n_facts} facts: the intervals are wide and these statistics carry little weight "
                  f"(say n ≥ {_FEW_FACTS}).\n\n" if n_facts < _FEW_FACTS else "")
        md["Token × layer: regressions (score ~ layer × token [+ cell tracing effect])"] = caveat + to_markdown(
            tok["regressions"].drop("note"), p_columns=("p",))
        md["Token × layer: is the peak-tracing cell a best-editing cell?"] = caveat + to_markdown(tok["best_cell"].rename({"p": "p_uniform"}), p_columns=("p_uniform", "p_cross_fact"))
        for (problem, method), _ in tok["cells"].group_by(["problem", "method"], maintain_order=True):
            figs[f"Fig. 5 analog: scores by token and layer ({problem}, {method})"] = fig_scores_by_token_layer(
                edits, problem=problem, method=method)
    if edits.height:
        means = (
            edits.group_by(["problem", "method", "token", "layer"])
            .agg(pl.len().alias("n"), pl.col("^.*_score$").mean())
            .sort(["problem", "method", "token", "layer"])
        )
        md["Mean scores by edit layer"] = to_markdown(means)
        if "opt_steps" in edits.columns:  # studies run before edits recorded their convergence lack the columns
            md[f"Optimisation convergence by method × problem × layer (means; opt_reached: share whose optimisation "
               f"ended at mean p(target) ≥ {REACHED_P_TARGET} on its own prompts; opt_clamped: share at the clamp "
               "bound)"] = to_markdown(score_summary(with_reached(own_token_edits(edits)),
                                                     columns=CONVERGENCE_COLUMNS))
    if failures.height:
        md["Failures"] = to_markdown(failures.select("key", "error_type", "error"))
    if trace.height:
        kinds = trace["kind"].unique().to_list()
        kind = "mlp" if "mlp" in kinds else kinds[0]
        figs["Fig. 1: peak tracing layers"] = fig_peak_layers(trace, kind=kind)
        if trace.filter(pl.col("kind") == kind)["window"].n_unique() > 1:
            figs["Fig. 10: tracing effect vs window size"] = fig_window_effects(trace, kind=kind)
        first = trace["fact_id"][0]
        w = an["window"] or int(trace.filter(pl.col("kind") == kind)["window"].max())
        figs[f"Causal tracing heatmap: {first}"] = fig_trace_heatmap(trace, first, kind=kind, window=w)
    if an["analysis"] is not None and an["analysis"].height:
        for (problem, method), _ in an["analysis"].group_by(["problem", "method"], maintain_order=True):
            figs[f"Fig. 4/15: rewrite score vs tracing effect ({problem}, {method})"] = fig_score_vs_trace(
                an["analysis"], problem=problem, method=method
            )
        figs["Fig. 6: R² of Layer vs Layer + Tracing"] = fig_r2_bars(an["results"])
    if edits.height:
        own = own_token_edits(edits)
        for problem in own["problem"].unique(maintain_order=True).to_list():
            figs[f"Fig. 7: scores by edit layer ({problem})"] = fig_scores_by_layer(own, problem=problem)
    plan = dirs[0].provenance().get("plan", {})
    sigma = plan.get("noise", {}).get("sigma")
    meta = {
        "run directories": ", ".join(str(d.path) for d in dirs),
        "model": config.model,
        "noise σ (resolved once, provenance.json)": "?" if sigma is None else (
            f"{sigma:.4f} ({plan['noise']['scale']} × the {plan['noise']['rule']} rule's std)"
            if plan["noise"].get("scale") is not None else f"{sigma:.4f} (absolute)"),
        "units finished": _units_line(dirs),
        "facts traced": trace["fact_id"].n_unique() if trace.height else 0,
        "edits": edits.height,
        "failed units": failures.height,
        "tracing window joined": an["window"],
        "sittings (sittings.jsonl: where each ran, with how many threads)": sittings_line(
            [s for d in dirs for s in d.sittings()]),
    }
    out = Path(out) if out else dirs[0].path / "report.html"
    write_html(out, md, figs, title=f"Does localization inform editing? — {config.name}", meta=meta)
    write_atomic(out.parent / "tables.md", "\n\n".join(f"## {k}\n\n{v}" for k, v in md.items()))
    return out
