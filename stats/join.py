"""Join edit outcomes to tracing effects: the analysis frame of Hase et al. 2023 §4.1 / §5.2 (Tables 1–6,
Figs. 4–6).

Each edit (one row per fact × problem × method × edit layer; ``layer`` = the centre layer for 5-layer methods) is
paired with the fact's per-layer tracing effect *at that layer*: window-5 MLP tracing, fractional, max over tokens
by default (§4.1 "we use a tracing window size of 5"). Window 5 restores l−2..l+2, exactly the layers MEMIT/FT-5
edit around the same centre.
"""

from __future__ import annotations

import polars as pl

from locedit.stats.collapse import Collapse, concentrated_facts, per_layer_effects

__all__ = ["ANALYSIS_KEYS", "DEFAULT_KIND", "DEFAULT_WINDOW", "score_columns", "join_trace"]

ANALYSIS_KEYS = ("fact_id", "problem", "method", "layer")
DEFAULT_KIND = "mlp"
DEFAULT_WINDOW = 5


def score_columns(edits: pl.DataFrame) -> list[str]:
    """The numeric ``*_score`` columns of an edit outcomes table, in table order."""
    return [c for c in edits.columns if c.endswith("_score") and edits.schema[c].is_numeric()]


def join_trace(
    edits: pl.DataFrame,
    trace: pl.DataFrame,
    *,
    kind: str = DEFAULT_KIND,
    window: int = DEFAULT_WINDOW,
    collapse: Collapse = "max",
    scores: list[str] | tuple[str, ...] | None = None,
    with_concentrated: bool = False,
    recompute: bool = True,
    localization: str | None = None,
) -> pl.DataFrame:
    """Analysis frame ``fact_id, problem, method, layer, trace, <scores>`` (+ ``concentrated`` (App. B's rule) and
    ``concentrated_top`` (the 10 % most concentrated, by rank) if asked, :func:`stats.collapse.concentrated_facts`).

    Args:
        edits: edit outcomes table (``docs/CONTRACTS.md``).
        trace: long tracing table.
        kind, window: which tracing curve to use (paper: MLP, window 5; App. C Fig. 12 uses window 10).
        collapse: ``"max"`` over tokens (paper default) or ``"last_subject"`` (App. C, Fig. 16).
        scores: score columns to carry (default: every numeric ``*_score`` column).
        with_concentrated: add the App. B ``concentrated`` flag computed on the same kind/window with max-over-tokens
            (the paper's rule is defined on the max curve whatever ``collapse`` is).
        recompute: recompute fractional effects from probabilities (see :func:`stats.collapse.with_fractional`);
            pass False for a representation-zeroing table (App. B, Figs. 21–22), whose ``fractional`` column is
            the deleted share of p_clean.
        localization: which localization method's grids (:func:`stats.collapse.select_localization`; default
            "noise", the paper's causal tracing).

    Inner join on (fact_id, layer): edits without a tracing effect at their layer (untraced fact, or a layer
    outside the traced range) are dropped; rows with a null trace (undefined fractional effect) are kept as null
    and the regressions drop them.
    """
    missing = [c for c in ANALYSIS_KEYS if c not in edits.columns]
    if missing:
        raise ValueError(f"edit outcomes table is missing columns {missing}; has {edits.columns}")
    scores = list(scores) if scores is not None else score_columns(edits)
    bad = [s for s in scores if s not in edits.columns]
    if bad:
        raise ValueError(f"score columns {bad} not in edit outcomes table")
    effects = per_layer_effects(trace, collapse=collapse, kind=kind, window=window, recompute=recompute,
                                localization=localization)
    eff = effects.select(
        pl.col("fact_id").cast(pl.String), pl.col("layer").cast(pl.Int64), pl.col("effect").alias("trace")
    )
    left = edits.select(
        pl.col("fact_id").cast(pl.String),
        pl.col("problem").cast(pl.String),
        pl.col("method").cast(pl.String),
        pl.col("layer").cast(pl.Int64),
        *[pl.col(s).cast(pl.Float64) for s in scores],
    )
    out = left.join(eff, on=["fact_id", "layer"], how="inner").select(*ANALYSIS_KEYS, "trace", *scores)
    if with_concentrated:
        base = effects if collapse == "max" else per_layer_effects(
            trace, collapse="max", kind=kind, window=window, recompute=recompute, localization=localization
        )
        conc = concentrated_facts(base).select(pl.col("fact_id").cast(pl.String), "concentrated", "concentrated_top")
        out = out.join(conc, on="fact_id", how="left").with_columns(
            pl.col("concentrated").fill_null(False), pl.col("concentrated_top").fill_null(False))
    return out.sort(list(ANALYSIS_KEYS))
