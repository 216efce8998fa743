"""A study's pre-registered analysis: the primary within-fact test, its sensitivity analyses and the secondary family.

The settings come from the study config's ``[analysis]`` section (:class:`locedit.config.AnalysisConfig`, declared
in ``config.json`` before any unit ran); this module takes them as keyword arguments and declares no default of
its own. Steps, in this order:

1. **Exclusions, decided before looking**: per localization method, facts whose clean probability is below
   ``min_p_clean``, and, for the noise-based methods (noise, attribution), facts the noise did not corrupt
   (``p_noised > max_noised_ratio · p_clean``) are left out; how many, per method, is reported.
2. **Primary test**: :func:`locedit.stats.added_effect.added_effect` on the declared localization × problem × method
   × metric with the declared ``bound``.
3. **Sensitivity**: the same test under the other bounds (``sensitivity``), reported beside it, not tested as
   confirmatory.
4. **Secondary family**: the same test for every other (localization, problem, method) of the study, its p-values
   adjusted together for multiplicity (``multiplicity``: Holm or Benjamini–Hochberg, statsmodels'
   ``multipletests``).

A test is defined on its planned facts. A cell (localization × problem × method) whose planned units have not all
finished (``incomplete``: :func:`locedit.progress.incomplete_cells`) is not tested: the primary result is withheld
and the cell left out of the secondary family and the paired comparisons until it is complete, so no sitting shows an
interim look the plan does not declare (the family's adjustment is over the complete design's cells once it is).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl
from statsmodels.stats.multitest import multipletests

from locedit.stats.added_effect import AddedEffect, PairedAddedEffect, added_effect, paired_added_effect
from locedit.stats.localization import localization_frames

__all__ = ["PreregisteredAnalysis", "exclusions", "preregistered_analysis", "preregistered_markdown"]

_NOISE_BASED = ("noise", "attribution")


@dataclass(frozen=True)
class PreregisteredAnalysis:
    """The primary result, the sensitivity results (bound → result), the secondary family (one row per
    localization × problem × method, with ``p_adjusted``) and the exclusions (localization → excluded fact ids)."""

    primary: AddedEffect | None
    primary_group: tuple[str, str, str]
    sensitivity: dict[str, AddedEffect]
    secondary: pl.DataFrame
    excluded: dict[str, list[str]]
    settings: dict
    paired: tuple[tuple[str, str, PairedAddedEffect], ...] = ()  # (problem, method, other localization − primary's)
    withheld: dict[tuple[str, str, str], str] = field(default_factory=dict)  # incomplete cells not tested → why


def exclusions(trace: pl.DataFrame, *, min_p_clean: float, max_noised_ratio: float | None) -> dict[str, list[str]]:
    """Per localization method, the fact ids excluded by the declared rules (clean p too low; noise that did not
    corrupt)."""
    facts = trace.group_by("localization", "fact_id", maintain_order=True).agg(pl.col("p_clean").first(),
                                                                               pl.col("p_noised").first())
    out: dict[str, list[str]] = {}
    for (loc,), g in facts.group_by(["localization"], maintain_order=True):
        bad = g["p_clean"] < min_p_clean
        if max_noised_ratio is not None and loc in _NOISE_BASED:
            bad = bad | (g["p_noised"] > max_noised_ratio * g["p_clean"])
        out[str(loc)] = sorted(g.filter(bad.fill_null(False))["fact_id"].to_list())
    return out


def preregistered_analysis(
    edits: pl.DataFrame,
    trace: pl.DataFrame,
    *,
    localization: str,
    problem: str,
    method: str,
    metric: str,
    min_p_clean: float,
    max_noised_ratio: float | None,
    bound: str,
    sensitivity: tuple[str, ...],
    sesoi: float,
    alpha: float,
    multiplicity: str,
    n_permutations: int,
    n_boot: int,
    seed: int,
    kind: str = "mlp",
    window: int = 5,
    incomplete: Mapping[tuple[str, str, str], str] | None = None,
) -> PreregisteredAnalysis:
    """Run the pre-registered analysis on a study's tables (edits at their methods' own token, see the module
    docstring). ``edits``/``trace``: the edit-outcome and tracing tables; ``incomplete``: cells (localization,
    problem, method) whose planned units have not all finished, each with a sentence saying how far it is -- they
    are withheld, not tested."""
    settings = dict(localization=localization, problem=problem, method=method, metric=metric, min_p_clean=min_p_clean,
                    max_noised_ratio=max_noised_ratio, bound=bound, sensitivity=tuple(sensitivity), sesoi=sesoi,
                    alpha=alpha, multiplicity=multiplicity, n_permutations=n_permutations, n_boot=n_boot, seed=seed,
                    kind=kind, window=window)
    common = dict(metric=metric, n_permutations=n_permutations, n_boot=n_boot, seed=seed, alpha=alpha, sesoi=sesoi)
    excluded = exclusions(trace, min_p_clean=min_p_clean, max_noised_ratio=max_noised_ratio) if trace.height else {}
    frames = localization_frames(edits, trace, kind=kind, window=window) if edits.height and trace.height else {}

    def group(loc: str, prob: str, meth: str) -> pl.DataFrame:
        f = frames[loc]
        return f.filter((pl.col("problem") == prob) & (pl.col("method") == meth)
                        & ~pl.col("fact_id").is_in(excluded.get(loc, [])))

    incomplete = dict(incomplete or {})
    primary, sens = None, {}
    if ((localization, problem, method) not in incomplete and localization in frames
            and group(localization, problem, method).height):
        frame = group(localization, problem, method)
        primary = added_effect(frame, bound=bound, **common)
        sens = {b: added_effect(frame, bound=b, mixed=False, **common) for b in sensitivity if b != bound}
    rows = []
    for loc, f in frames.items():
        for (prob, meth), _ in f.group_by(["problem", "method"], maintain_order=True):
            if (loc, prob, meth) == (localization, problem, method) or (loc, prob, meth) in incomplete:
                continue
            res = added_effect(group(loc, prob, meth), bound=bound, mixed=False, **common)
            rows.append({"localization": loc, "problem": prob, "method": meth, "n_facts": res.n_facts,
                         "partial_r2": res.partial_r2, "ci_low": res.ci[0], "ci_high": res.ci[1],
                         "p": res.p_value, "mde": res.mde, "delta_r2": res.delta_r2, "note": res.note})
    secondary = pl.DataFrame(rows, schema={"localization": pl.String, "problem": pl.String, "method": pl.String,
                                           "n_facts": pl.Int64, "partial_r2": pl.Float64, "ci_low": pl.Float64,
                                           "ci_high": pl.Float64, "p": pl.Float64, "mde": pl.Float64,
                                           "delta_r2": pl.Float64, "note": pl.String})
    ok = secondary["p"].is_not_nan() & secondary["p"].is_not_null() if secondary.height else pl.Series([], dtype=bool)
    adjusted = [float("nan")] * secondary.height
    # the family is the plan's: a cell not complete yet enters at p = 1, so each adjusted p shown is an upper bound on
    # its final value (Holm's and Benjamini-Hochberg's adjusted p-values never fall as any raw p rises)
    n_open = sum(cell != (localization, problem, method) for cell in incomplete)
    if secondary.height and ok.any():
        idx = [i for i, v in enumerate(ok.to_list()) if v]
        padj = multipletests([secondary["p"][i] for i in idx] + [1.0] * n_open, alpha=alpha,
                             method=multiplicity)[1]
        for i, v in zip(idx, padj):
            adjusted[i] = float(v)
    secondary = secondary.with_columns(pl.Series("p_adjusted", adjusted, dtype=pl.Float64))
    paired = []  # Reber's question: every other localization against the primary one, per problem × method
    if localization in frames:
        for (prob, meth), _ in frames[localization].group_by(["problem", "method"], maintain_order=True):
            for loc in frames:
                if loc != localization and not {(loc, prob, meth), (localization, prob, meth)} & set(incomplete):
                    paired.append((prob, meth, paired_added_effect(
                        group(loc, prob, meth), group(localization, prob, meth), a=loc, b=localization,
                        metric=metric, bound=bound, n_boot=n_boot, seed=seed)))
    return PreregisteredAnalysis(primary, (localization, problem, method), sens, secondary, excluded, settings,
                                 tuple(paired), incomplete)


def preregistered_markdown(pre: PreregisteredAnalysis, declared: bool) -> dict[str, str]:
    """Report sections (title → Markdown): the declared settings, the primary result with its sentence, the
    sensitivity analyses and the secondary family. ``declared``: whether ``[analysis]`` was in the run's config
    before its data (else the analysis is labelled exploratory)."""
    from locedit.stats.tables import to_markdown

    s = pre.settings
    loc, prob, meth = pre.primary_group
    status = ("declared in config.json [analysis] at the run's first start, before any unit ran" if declared else
              "NOT pre-registered: this run's config.json has no [analysis] section (it was started before the "
              "section existed); the defaults below were applied afterwards, so read every result as exploratory")
    excl = ", ".join(f"{k}: {len(v)}" for k, v in pre.excluded.items()) or "none"
    head = (f"Analysis plan ({status}): primary = {loc} localization × {prob} × {meth}, {s['metric']}; tracing "
            f"covariate bound '{s['bound']}' (sensitivity: {', '.join(s['sensitivity']) or 'none'}); exclusions: "
            + (f"p_clean < {s['min_p_clean']:g}" if s['min_p_clean'] > 0 else "none on p_clean")
            + (f", noise that left p_noised > {s['max_noised_ratio']:g} · p_clean" if s['max_noised_ratio'] else "")
            + f" (facts excluded per localization: {excl}); SESOI {s['sesoi']:g} partial R²; α = {s['alpha']:g}; "
            f"secondary family adjusted by {s['multiplicity']}; {s['n_permutations']} curve permutations, "
            f"{s['n_boot']} cluster-bootstrap replicates, seed {s['seed']}.")
    out = {"Analysis plan": head}
    by_reason: dict[str, list[str]] = {}
    for c, w in pre.withheld.items():
        if c != pre.primary_group:
            by_reason.setdefault(w, []).append(c[0])
    pending = ("Cells not tested until their planned units have all finished (an interim look is not part of the "
               "plan): " + "; ".join(f"{w} (localization: {', '.join(locs)})" for w, locs in by_reason.items())
               + f". Each adjusted p above counts them in the family at p = 1: an upper bound on its final value "
                 f"({s['multiplicity']}'s adjusted p-values never fall as any raw p rises)." if by_reason else "")
    r = pre.primary
    if r is None and pre.primary_group in pre.withheld:
        out["Primary test: withheld until its cell is complete"] = (
            f"{pre.withheld[pre.primary_group]}. The test is defined on the planned facts and runs once, when the "
            "last of them is in; no interim result is shown.")
    elif r is None:
        out["Primary test"] = f"No edits of {loc} × {prob} × {meth} yet."
    else:
        row = pl.DataFrame([{"partial R²": r.partial_r2, "95% CI low": r.ci[0], "95% CI high": r.ci[1],
                             "permutation p": r.p_value, "MDE (80% power)": r.mde, "verdict": r.verdict,
                             "facts": r.n_facts, "edits": r.n_edits, "pooled ΔR² (paper)": r.delta_r2,
                             "pooled partial R²": r.pooled_partial_r2,
                             "mixed-model LR p": r.mixed.p_value if r.mixed else float("nan")}])
        out["Primary test: does the tracing effect add to fact and layer?"] = (
            f"{r.sentence}\n\n" + to_markdown(row, p_columns=("permutation p", "mixed-model LR p"))
            + ("\n\n" + f"Note: {r.note}" if r.note else ""))
    if pre.sensitivity:
        srows = [{"bound": b, "partial R²": x.partial_r2, "95% CI low": x.ci[0], "95% CI high": x.ci[1],
                  "permutation p": x.p_value, "verdict": x.verdict} for b, x in pre.sensitivity.items()]
        out["Sensitivity of the primary test to the covariate's bound (not confirmatory)"] = to_markdown(
            pl.DataFrame(srows), p_columns=("permutation p",))
    if pre.paired:
        prows = [{"localization": d.a, "minus": d.b, "problem": prob, "method": meth, "facts": d.n_facts,
                  "difference": d.difference, "95% CI low": d.ci[0], "95% CI high": d.ci[1],
                  "excludes 0": "yes" if d.excludes_zero else "no"}
                 for prob, meth, d in pre.paired]
        out["Localization methods compared within facts (Reber's question: paired cluster intervals)"] = to_markdown(
            pl.DataFrame(prows))
    if pre.secondary.height or pending:
        out[f"Secondary family (within-fact test, {s['multiplicity']}-adjusted p)"] = (
            (to_markdown(pre.secondary.drop("note"), p_columns=("p", "p_adjusted")) if pre.secondary.height else "")
            + ("\n\n" if pre.secondary.height and pending else "") + pending)
    return out

