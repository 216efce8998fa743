"""``locedit findings``: the generated tables of ``docs/FINDINGS.md`` -- a study's results in the paper's layout next
to the paper's own numbers (:mod:`stats.paper`), from a run directory's journals alone (no model, no recompute).

``docs/FINDINGS.md`` is prose written around generated blocks::

    <!-- findings:table3 -->
    ... replaced by :func:`findings_blocks`["table3"] ...
    <!-- /findings:table3 -->

``locedit findings studies/reference --doc docs/FINDINGS.md`` rewrites every block from the run's tables;
``--check`` only says whether the document is up to date (the test suite runs it on the shipped study). Blocks:
``status`` (facts and units done per stage, compute), ``headline`` (R² Layer / Trace / Both, ΔR² with its interval
and p per localization × problem × method), ``table1``, ``table3``, ``facts`` (how much of the score is the fact
itself: R² of layer, fact and layer + fact fixed effects), ``table2``, ``table7``, ``fig4``, ``fig7``,
``agreement`` (where each localization method peaks on every localized fact, and how well it agrees with
noise), ``localization`` (the per-method comparison incl. the concentrated subsets), ``reber`` (paired differences
against noise), ``tokens`` (the token × layer result) and ``cost`` (measured seconds per unit per stage and what the
unfinished stages would take).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from locedit.editors.methods import DEFAULT_METHOD
from locedit.rundir import RunDir, collect_tables
from locedit.tracer.atomic import write_atomic
from locedit.problems.variants import DEFAULT_PROBLEM
from locedit.stats.paper import (
    PAPER_FIG4,
    PAPER_FIG7,
    PAPER_N_FACTS,
    PAPER_TABLE2_N_FACTS,
    PAPER_TABLE2_ROME,
    PAPER_TABLE3,
    PAPER_TABLE7_ROME,
)
from locedit.stats.added_effect import pooled_partial_r2
from locedit.stats.tables import (format_num, format_p, mean_half_width, method_label, problem_label,
                                  sort_paper_order)
from locedit.editors.tokens import DEFAULT_EDIT_TOKEN

__all__ = ["FINDINGS_BLOCKS", "findings_blocks", "update_document", "write_findings"]

FINDINGS_BLOCKS = ("status", "primary", "headline", "table1", "table3", "facts", "table2", "table7", "fig4", "fig7",
                   "where_edited", "agreement", "localization", "reber", "tokens", "cost")
_N_BOOT = 1000


def _block_pattern(prefix: str) -> re.Pattern:
    """A generated block of a document: ``<!-- PREFIX:NAME -->`` … ``<!-- /PREFIX:NAME -->``."""
    return re.compile(rf"(<!-- {prefix}:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /{prefix}:(?P=name) -->)", re.S)


def _ci(lo, hi, digits: int = 3) -> str:
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _md(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    """A Markdown table of already formatted cells (columns from ``right_from`` on right-aligned)."""
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---" if i < right_from else "---:" for i in range(len(header))) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _labels(r) -> list[str]:
    """The paper's labels of a row's problem and method."""
    return [problem_label(r["problem"]), method_label(r["method"])]


# ---------------------------------------------------------------- stages and compute


def _stages(*run_dirs: RunDir) -> pl.DataFrame:
    """:attr:`locedit.progress.StudyProgress.stages` of each run, stacked; with several (companion) runs each stage
    is named after its study."""
    from locedit.progress import study_progress

    def prefix(d: RunDir) -> str:
        return f"{d.config().name}: " if len(run_dirs) > 1 else ""

    return pl.concat([study_progress(d, stage_prefix=prefix(d)).stages for d in run_dirs])


def _thread_label(stages: pl.DataFrame) -> str:
    """The torch thread counts the finished units ran with: ``"1"``, or a range ``"1–2"``."""
    counts = sorted({t for ts in stages["threads"].to_list() for t in ts}) or [1]
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _primary_block(run_dirs: Sequence[RunDir], tables: dict[str, pl.DataFrame], edits: pl.DataFrame) -> str:
    """The pre-registered within-fact analysis of ``run_dirs[0]`` (companions merged;
    :func:`locedit.report.preregistered_sections`): plan, primary test, sensitivity, secondary family."""
    from locedit.report import preregistered_sections

    if edits.height == 0 or tables["tracing"].height == 0:
        return "No edits yet.\n"
    md = preregistered_sections(list(run_dirs), edits, tables["tracing"])
    return "\n".join(f"{body}\n" if title == "Analysis plan" else f"**{title}**\n\n{body}\n"
                     for title, body in md.items())


def _status_block(st: pl.DataFrame, n_facts: int, tables: dict[str, pl.DataFrame]) -> str:
    rows = [[r["stage"], f"{r['done']} / {r['total']}",
             "complete" if r["done"] == r["total"] else ("not started" if r["done"] == 0 else "partial")]
            for r in st.iter_rows(named=True)]
    edits = tables["edits"]
    n_traced = tables["tracing"]["fact_id"].n_unique() if tables["tracing"].height else 0
    n_edited = edits["fact_id"].n_unique() if edits.height else 0
    return (f"{n_facts} facts selected; {n_traced} localized, {n_edited} edited. Units finished: "
            f"{st['done'].sum()} of {st['total'].sum()}; their own times sum to "
            f"{st['hours_spent'].sum():.2f} h of wall-clock on {_thread_label(st)} torch thread(s) "
            f"({st['cpu_hours_spent'].sum():.2f} CPU-hours).\n\n"
            + _md(["stage", "units done", "state"], rows, right_from=1))


def _cost_block(st: pl.DataFrame) -> str:
    rows = [[r["stage"], str(r["timed"]), format_num(r["seconds_mean"] if r["timed"] else float("nan"), 1),
             str(r["total"]), "n/a" if r["hours_left"] is None else f"{r['hours_left']:.1f}"]
            for r in st.iter_rows(named=True)]
    left = st["hours_left"].fill_null(0.0).sum()
    return (_md(["stage", "units timed", "mean s / unit", "units in design", "hours left at that rate"], rows)
            + f"\nStages not started have no measured rate; the measured ones leave ≈ {left:.1f} h of "
              f"wall-clock ({_thread_label(st)} threads).\n")


# ---------------------------------------------------------------- regressions


def _loc_rows(loc: pl.DataFrame, subset: str, localization: str) -> list[dict]:
    """The comparison table's rows of one localization method and subset, in the paper's order."""
    if loc.height == 0:
        return []
    sub = loc.filter((pl.col("localization") == localization) & (pl.col("subset") == subset))
    return list(sort_paper_order(sub).iter_rows(named=True))


def _localizations(loc: pl.DataFrame) -> list[str]:
    return loc["localization"].unique(maintain_order=True).to_list() if loc.height else []


def _headline_block(loc: pl.DataFrame) -> str:
    if loc.height == 0:
        return "No finished edits yet.\n"
    rows = []
    for name in _localizations(loc):
        for r in _loc_rows(loc, "all", name):
            paper = PAPER_TABLE3.get(tuple(_labels(r))) if name == "noise" else None
            rows.append([name, *_labels(r), str(r["n_facts"]), str(r["n"]), format_num(r["r2_layer"]),
                         format_num(r["r2_trace"]), format_num(r["r2_both"]), format_num(r["r2_diff"]),
                         format_num(pooled_partial_r2(r["r2_diff"], r["r2_layer"])),
                         format_num(r["r2_diff_adj"]), _ci(r["ci_low"], r["ci_high"]), format_p(r["p"]),
                         "—" if paper is None else f"{paper.layer:.3f} / {paper.trace:.3f} / {paper.diff:.3f} / "
                                                   f"{pooled_partial_r2(paper.diff, paper.layer):.3f}"])
    return _md(["localization", "problem", "method", "facts", "edits", "R² layer", "R² trace", "R² both", "ΔR²",
                "ΔR² / (1 − R² layer)", "adj. ΔR²", "adj. ΔR² 95% CI", "F-test p",
                "paper layer / trace / ΔR² / ΔR² ÷ (1 − layer)"], rows, right_from=3)


def _table3_block(loc: pl.DataFrame) -> str:
    rows = []
    for r in _loc_rows(loc, "all", "noise"):
        p = PAPER_TABLE3.get(tuple(_labels(r)))
        paper = ["—"] * 6 if p is None else [f"{p.layer:.3f}", f"{p.trace:.3f}", f"{p.both:.3f}", f"{p.diff:.3f}",
                                             f"{pooled_partial_r2(p.diff, p.layer):.3f}", p.p]
        rows.append([*_labels(r), format_num(r["r2_layer"]), format_num(r["r2_trace"]), format_num(r["r2_both"]),
                     format_num(r["r2_diff"]), format_num(pooled_partial_r2(r["r2_diff"], r["r2_layer"])),
                     format_p(r["p"]), str(r["n_facts"]), *paper])
    if not rows:
        return "No finished edits yet.\n"
    return _md(["Editing Problem", "Method", "Layer", "Trace", "Both", "Diff", "Diff / (1 − Layer)", "p-value",
                "facts", "paper Layer", "paper Trace", "paper Both", "paper Diff", "paper Diff / (1 − Layer)",
                "paper p"], rows, right_from=2)


def _table1_block(loc: pl.DataFrame) -> str:
    p = PAPER_TABLE3[(problem_label(DEFAULT_PROBLEM), method_label(DEFAULT_METHOD))]
    rows = [r for r in _loc_rows(loc, "all", "noise") if (r["problem"], r["method"]) == (DEFAULT_PROBLEM,
                                                                                         DEFAULT_METHOD)]
    if not rows:
        return "No finished ROME Error Injection edits yet.\n"
    r = rows[0]
    return _md(["", "Layer", "Tracing Effect", "Both", "facts"], [
        ["this study (SmolLM2-135M-Instruct, 4-bit GGUF)", format_num(r["r2_layer"]), format_num(r["r2_trace"]), format_num(r["r2_both"]),
         str(r["n_facts"])],
        ["paper (GPT-J 6B)", f"{p.layer:.3f}", f"{p.trace:.3f}", f"{p.both:.3f}", str(PAPER_N_FACTS)]])


def _groups(edits: pl.DataFrame):
    """(problem, method) groups of the edits in the paper's order: ``(row with problem and method, group)``."""
    for r in sort_paper_order(edits.select("problem", "method").unique()).iter_rows(named=True):
        yield r, edits.filter((pl.col("problem") == r["problem"]) & (pl.col("method") == r["method"]))


def _fact_block(edits: pl.DataFrame, n_layers: int | None = None) -> str:
    """How much of the rewrite score's variance is the fact itself: R² of ``score ~ C(layer)``, ``score ~ C(fact)``
    and ``score ~ C(layer) + C(fact)`` per problem × method (statsmodels OLS on the edits).

    A method that optimises a target vector at the edit token (``EditMethod.target_hook``: ROME, r-ROME, MEMIT) has
    no path from that token to the prediction at the model's last layer (no attention layer follows), so its edits
    there are structurally null; when the study edited the last layer (``n_layers``, from provenance) such a group
    gets a second row without it, so that the layer's share is not read as localization."""
    import statsmodels.formula.api as smf

    from locedit.editors.methods import resolve_method

    if edits.height == 0:
        return "No finished edits yet.\n"
    rows = []
    for r, sub in _groups(edits):
        g = sub.select("fact_id", "layer", pl.col("rewrite_score").cast(pl.Float64).fill_nan(None)).drop_nulls()
        g = g.to_pandas()
        subsets = [("", g)]
        last = None if n_layers is None else n_layers - 1
        if last is not None and resolve_method(r["method"]).target_hook is not None and (g["layer"] == last).any():
            subsets.append((f", without layer {last} (the last)", g[g["layer"] != last]))
        for suffix, d in subsets:
            if d["fact_id"].nunique() < 2 or d["layer"].nunique() < 2:
                continue
            fits = {f: smf.ols(f"rewrite_score ~ {f}", d).fit().rsquared
                    for f in ("C(layer)", "C(fact_id)", "C(layer) + C(fact_id)")}
            problem, method = _labels(r)
            rows.append([problem, method + suffix, str(d["fact_id"].nunique()),
                         *(format_num(v) for v in fits.values())])
    return _md(["problem", "method", "facts", "R² layer", "R² fact", "R² layer + fact"], rows, right_from=2)


def _table2_block(loc: pl.DataFrame) -> str:
    p = PAPER_TABLE2_ROME
    if loc.height == 0:
        return "No finished edits yet.\n"
    rows = []
    for name in _localizations(loc):
        allf = {(r["problem"], r["method"]): r["n_facts"] for r in _loc_rows(loc, "all", name)}
        for r in _loc_rows(loc, "concentrated", name):
            rows.append([name, *_labels(r), f"{r['n_facts']} of {allf.get((r['problem'], r['method']), '?')}",
                         format_num(r["r2_layer"]), format_num(r["r2_trace"]), format_num(r["r2_both"]),
                         format_num(r["r2_diff"]), format_p(r["p"])])
    rows.append(["noise (paper)", "Error Injection", "ROME", f"{PAPER_TABLE2_N_FACTS} of {PAPER_N_FACTS}",
                 f"{p.layer:.3f}", f"{p.trace:.3f}", f"{p.both:.3f}", f"{p.diff:.3f}", "—"])
    return _md(["localization", "problem", "method", "concentrated facts", "Layer", "Trace", "Both", "Diff",
                "p-value"], rows, right_from=3)


def _table7_block(frames: dict[str, pl.DataFrame]) -> str:
    from locedit.stats import fit_regression

    p = PAPER_TABLE7_ROME
    a = frames.get("noise")
    if a is None:
        return "No finished edits yet.\n"
    g = a.filter((pl.col("problem") == DEFAULT_PROBLEM) & (pl.col("method") == DEFAULT_METHOD))
    if g.height == 0:
        return "No finished ROME Error Injection edits yet.\n"
    r = fit_regression(g, "rewrite_score", problem=DEFAULT_PROBLEM, method=DEFAULT_METHOD)
    return _md(["ROME rewrite score, Error Injection", "this study", "paper"], [
        ["RMSE, Layer", format_num(r.layer.rmse), f"{p['rmse_layer']:.3f}"],
        ["RMSE, Tracing Effect", format_num(r.trace.rmse), f"{p['rmse_trace']:.3f}"],
        ["MAE, Layer", format_num(r.layer.mae), f"{p['mae_layer']:.3f}"],
        ["MAE, Tracing Effect", format_num(r.trace.mae), f"{p['mae_trace']:.3f}"]])


def _fig4_block(frames: dict[str, pl.DataFrame]) -> str:
    from locedit.stats import layer_correlations

    rows = []
    for name in ("noise", "flip", "zero"):
        if name not in frames:
            continue
        for r in layer_correlations(frames[name], "rewrite_score").iter_rows(named=True):
            rows.append([name, *_labels(r), str(r["layer"]), str(r["n"]), format_num(r["rho"], 2),
                         _ci(r["ci_low"], r["ci_high"], 2), format_p(r["p"]), format_num(r["spearman"], 2),
                         _ci(r["spearman_ci_low"], r["spearman_ci_high"], 2)])
    if not rows:
        return "No finished edits yet.\n"
    return (_md(["localization", "problem", "method", "edit layer", "facts", "Pearson ρ (rewrite vs effect)",
                 "95% CI (Fisher z)", "p", "Spearman ρ", "95% CI (Bonett–Wright)"], rows, right_from=3)
            + f"\nPaper (Fig. 4, GPT-J, ROME, Error Injection, noise): ρ = {PAPER_FIG4['rho']} at layer "
              f"{PAPER_FIG4['layer']} of 28.\n")


def _fig7_block(edits: pl.DataFrame) -> str:
    if edits.height == 0:
        return "No finished edits yet.\n"
    metrics = ("rewrite_score", "paraphrase_score", "neighborhood_score")

    def cell(v: pl.Series) -> str:
        x = v.cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()
        if len(x) < 2:
            return format_num(float(x[0]) if len(x) else None)
        return f"{x.mean():.3f} ± {mean_half_width(float(x.std(ddof=1)), len(x)):.3f}"

    rows = []
    for r, sub in _groups(edits):
        for layer in sorted(sub["layer"].unique().to_list()):
            g = sub.filter(pl.col("layer") == layer)
            rows.append([*_labels(r), str(layer), str(g.height), *(cell(g[m]) for m in metrics)])
    return (_md(["problem", "method", "edit layer", "facts", "rewrite (mean ± 95%)", "paraphrase", "neighborhood"],
                rows, right_from=2) + f"\nPaper (Fig. 7, GPT-J): {PAPER_FIG7}\n")


def _localization_block(loc: pl.DataFrame) -> str:
    if len(_localizations(loc)) < 2:
        return "Only one localization method has finished so far.\n"
    rows = []
    for subset in ("all", "concentrated"):
        for name in _localizations(loc):
            for r in _loc_rows(loc, subset, name):
                rows.append([subset, name, *_labels(r), str(r["n_facts"]), format_num(r["r2_trace"]),
                             format_num(r["r2_diff"]), format_num(r["r2_diff_adj"]), _ci(r["ci_low"], r["ci_high"]),
                             format_p(r["p"])])
    return _md(["facts", "localization", "problem", "method", "n facts", "R² trace alone", "ΔR²", "adj. ΔR²",
                "adj. ΔR² 95% CI", "F-test p"], rows, right_from=4)


def _where_edited_block(frames: dict[str, pl.DataFrame]) -> str:
    """Is a fact best edited where it traces? (:func:`locedit.stats.edit_layer_agreement`: each fact's tracing
    curve over the edited layers against its rewrite-score curve, same fact vs other-fact pairs.)"""
    from locedit.stats import edit_layer_agreement

    t = edit_layer_agreement(frames)
    if t.height == 0:
        return "No fact has been edited at enough layers yet.\n"
    rows = [[r["localization"], problem_label(r["problem"]), method_label(r["method"]), str(r["n_layers"]),
             str(r["n_facts"]), format_num(r["median_r"], 2), format_num(r["cross_median_r"], 2), format_p(r["p_r"]),
             format_num(r["close_share"], 2), format_num(r["cross_close_share"], 2), format_p(r["p_close"])]
            for r in sort_paper_order(t).iter_rows(named=True)]
    return (_md(["localization", "problem", "method", "edit layers", "facts", "median per-fact r (tracing vs rewrite)",
                 "other-fact pairs", "p (same > other)", "share best-edit layer ≤ 2 layers from peak",
                 "other-fact pairs", "p (same > other)"], rows, right_from=3)
            + "\nPer fact: Pearson r between the tracing effect and the rewrite score over the edited layers, and whether"
              " the best-editing layer is within 2 layers of the peak tracing layer; other-fact pairs pair one fact's"
              " tracing with another fact's edits (the layer profile all facts share). p: facts permuted (999),"
              " one-sided.\n")


def _agreement_block(trace: pl.DataFrame) -> str:
    """Where each method localizes, on every localized fact (no edits needed): the per-layer effect curve (max over
    tokens, window 5), its peak layer, the concentrated share, and each method's agreement with noise."""
    from locedit.stats import concentrated_facts, per_layer_effects

    if trace.height == 0 or "localization" not in trace.columns:
        return "No localization has finished yet.\n"
    curves: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    for name in trace["localization"].unique(maintain_order=True).to_list():
        eff = per_layer_effects(trace, kind="mlp", window=5, localization=name)
        if eff.height == 0:
            continue
        conc = concentrated_facts(eff)
        curves[name] = {fid: g.sort("layer")["effect"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
                        for (fid,), g in eff.group_by(["fact_id"])}
        peaks = np.array([int(np.nanargmax(c)) for c in curves[name].values() if np.isfinite(c).any()])
        maxes = np.array([np.nanmax(c) for c in curves[name].values() if np.isfinite(c).any()])
        rows.append([name, str(len(curves[name])), f"{peaks.mean():.1f}", f"{np.median(peaks):.0f}",
                     f"{np.percentile(peaks, 25):.0f}–{np.percentile(peaks, 75):.0f}", format_num(float(np.median(maxes))),
                     f"{conc['concentrated'].mean():.2f}"])
    out = _md(["localization", "facts", "mean peak layer", "median", "IQR", "median peak effect",
               "concentrated share"], rows)
    if "noise" in curves and len(curves) > 1:
        from locedit.stats import agreement

        pair_rows = []
        for name, c in curves.items():
            if name == "noise":
                continue
            g = agreement(curves["noise"], c)
            pair_rows.append([f"noise vs {name}", str(g.n_facts), format_num(g.median_r, 2),
                              f"{g.r_q25:.2f}–{g.r_q75:.2f}" if g.n_facts >= 2 else "n/a", format_num(g.cross_median_r, 2),
                              format_p(g.p_r), format_num(g.close_share, 2), format_num(g.cross_close_share, 2),
                              format_p(g.p_close)])
        out += "\n" + _md(["pair", "facts", "median per-fact r of the per-layer curves", "IQR",
                           "other-fact pairs: median r", "p (same > other)", "share with peak layers ≤ 2 apart",
                           "other-fact pairs: share", "p (same > other)"], pair_rows) + (
            "\nOther-fact pairs compare method A on one fact with method B on another: the agreement the layer "
            "profile shared by all facts produces on its own. p: facts permuted (999), one-sided.\n")
    return out


def _reber_block(edits: pl.DataFrame, trace: pl.DataFrame, n_boot: int) -> str:
    from locedit.stats import paired_differences

    if edits.height == 0 or trace.height == 0:
        return "No finished edits yet.\n"
    diffs = paired_differences(edits, trace, n_boot=n_boot)
    if not diffs:
        return "Only one localization method has finished so far.\n"
    rows = [[d.localization, problem_label(d.problem), method_label(d.method), str(d.n_facts),
             f"{100 * d.difference:+.1f}", _ci(100 * d.ci_low, 100 * d.ci_high, 1),
             "yes" if math.isfinite(d.ci_low) and (d.ci_low > 0 or d.ci_high < 0) else "no"] for d in diffs]
    return _md(["method X", "problem", "edit method", "facts", "ΔR²(X) − ΔR²(noise), points", "95% CI (paired)",
                "excludes 0"], rows, right_from=3)


def _tokens_block(tables: dict[str, pl.DataFrame]) -> str:
    from locedit.report import token_analysis
    from locedit.stats.tables import score_summary, to_markdown

    edits = tables["edits"]
    if edits.height == 0 or "token" not in edits.columns or edits["token"].n_unique() < 2:
        return "The token rules have not run yet (they are the study's last stage).\n"
    facts = edits.filter(pl.col("token") != DEFAULT_EDIT_TOKEN)["fact_id"].unique()
    sub = {**tables, "edits": edits.filter(pl.col("fact_id").is_in(facts.implode()))}
    an = token_analysis(sub)
    means = score_summary(sub["edits"], by=("problem", "method", "token", "layer"),
                          columns=("rewrite_score", "neighborhood_score"))
    out = [f"Facts edited at every token rule: {facts.len()}.", "", to_markdown(means, title="Mean score by token rule × layer")]
    if an["regressions"] is not None and an["regressions"].height:
        cols = [c for c in ("problem", "method", "n", "n_facts", "r2_layer", "r2_token", "r2_layer_token",
                            "r2_with_effect", "r2_diff", "r2_diff_adj", "ci_low", "ci_high", "p") if
                c in an["regressions"].columns]
        out += [to_markdown(an["regressions"].select(cols), p_columns=("p",),
                            title="Token-level regressions: does the cell's tracing effect add to layer × token?")]
    if an["best_cell"] is not None and an["best_cell"].height:
        out += [to_markdown(an["best_cell"].rename({"p": "p_uniform"}), p_columns=("p_uniform", "p_cross_fact"),
                            title="Is a fact's peak-tracing cell among its best-editing cells? (test: `p_cross_fact`, "
                                  "each fact's edits paired with another fact's tracing; `p_uniform` assumes a "
                                  "uniformly random peak cell and credits tracing with what all facts share)")]
    return "\n".join(out)


def findings_blocks(run_dir: str | Path, *companions: str | Path, n_boot: int = _N_BOOT) -> dict[str, str]:
    """Every generated block of ``docs/FINDINGS.md`` (Markdown) from ``run_dir``'s journals, with those of its
    ``companions`` (:func:`locedit.rundir.companion_conflicts`: other runs of the same design) merged in; the
    pre-registered analysis is ``run_dir``'s."""
    from locedit.report import own_token_edits
    from locedit.stats import localization_frames, localization_table

    run_dir = RunDir(run_dir).require()
    others = [RunDir(d).require() for d in companions]
    tables = collect_tables(run_dir, *others)
    trace = tables["tracing"]
    edits = own_token_edits(tables["edits"])  # the paper's analysis: each method at its own token
    paired = edits.height > 0 and trace.height > 0
    loc = localization_table(edits, trace, collapses=("max",), n_boot=n_boot) if paired else pl.DataFrame()
    frames = localization_frames(edits, trace) if paired else {}
    n_facts = len({f for d in (run_dir, *others) for f in d.fact_ids() or []})
    stages = _stages(run_dir, *others)
    return {
        "status": _status_block(stages, n_facts, tables),
        "primary": _primary_block([run_dir, *others], tables, edits),
        "headline": _headline_block(loc),
        "table1": _table1_block(loc),
        "table3": _table3_block(loc),
        "facts": _fact_block(edits, run_dir.provenance().get("model", {}).get("n_layers")),
        "table2": _table2_block(loc),
        "table7": _table7_block(frames),
        "fig4": _fig4_block(frames),
        "fig7": _fig7_block(edits),
        "agreement": _agreement_block(trace),
        "where_edited": _where_edited_block(frames),
        "localization": _localization_block(loc),
        "reber": _reber_block(edits, trace, n_boot),
        "tokens": _tokens_block(tables),
        "cost": _cost_block(stages),
    }


def update_document(text: str, blocks: dict[str, str], prefix: str = "findings") -> str:
    """``text`` with the body of each ``<!-- PREFIX:NAME -->`` block replaced by ``blocks[NAME]`` (a block the
    text has but ``blocks`` lacks is a ``ValueError``)."""
    pattern = _block_pattern(prefix)
    unknown = sorted({m["name"] for m in pattern.finditer(text)} - set(blocks))
    if unknown:
        raise ValueError(f"unknown {prefix} block(s) {unknown}; known: {list(blocks)}")
    return pattern.sub(lambda m: m.group(1) + blocks[m["name"]].rstrip("\n") + "\n" + m.group(4), text)


def write_findings(run_dir: str | Path, doc: str | Path, *, companions: Sequence[str | Path] = (),
                   check: bool = False, n_boot: int = _N_BOOT) -> bool:
    """Regenerate ``doc``'s blocks from ``run_dir`` (and its ``companions``); with ``check`` write nothing. Returns
    whether ``doc`` was already up to date."""
    doc = Path(doc)
    if not doc.is_file():
        raise FileNotFoundError(f"no findings document {doc}")
    text = doc.read_text()
    new = update_document(text, findings_blocks(run_dir, *companions, n_boot=n_boot))
    if not check and new != text:
        write_atomic(doc, new)  # a full disk leaves the old document, never half of the new one
    return new == text
