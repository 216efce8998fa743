"""Collapse causal-tracing grids to per-layer effects (Hase et al. 2023 §4.1, App. B; Figs. 1, 10, 11).

The tracer produces a T × L grid of restored probabilities per (fact, kind, window). The paper turns it into one
number per layer:

* the *fractional* effect of each cell (§4.1), :func:`tracer.effects.fractional_effect` — the one formula,
  ``max(0, (p_restored − p_noised) / |p_clean − p_noised|)`` with the reference code's absolute denominator;
* per layer, the **max over tokens** (the paper's default, ``collapse="max"``) or the value at the **last subject
  token** (App. C, Fig. 16, ``collapse="last_subject"``);
* the **peak layer** of a fact = the layer of argmax over (token, layer) of the fractional grid (Figs. 1, 11);
* **concentrated effects** (App. B, Table 2): no more than 3 layers *besides the peak layer* whose per-layer
  (max-over-tokens) effect is ≥ 50% of the maximum per-layer effect.

The pure functions on one ``[T, L]`` grid live in :mod:`tracer.effects` (re-exported here); this module adds the
polars functions over the long tracing table (``docs/CONTRACTS.md``). Peak tie-breaking matches
``TraceResult.peak``: the first maximum of the row-major ``[T, L]`` grid (smallest token, then smallest layer).

Undefined effects (one convention, :mod:`tracer.effects`): when the denominator is < 1e-12 the effect is NaN (null
in frames) and such cells are ignored by the collapses; null traces are dropped by the regressions rather than
counted as "no effect". Zeroing rows (``corruption == "zero"``) get the deleted share of p_clean, recomputed or not.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from jaxtyping import Float
from torch import Tensor

from locedit.tracer.effects import fractional_effect, peak_cell, per_layer_effect

__all__ = [
    "Collapse",
    "COLLAPSES",
    "CONCENTRATION_MAX_OTHERS",
    "CONCENTRATION_THRESHOLD",
    "fractional_effect",
    "per_layer_effect",
    "peak_cell",
    "is_concentrated",
    "with_fractional",
    "per_layer_effects",
    "peak_layers",
    "concentrated_facts",
]

Collapse = Literal["max", "last_subject"]
COLLAPSES: tuple[str, ...] = ("max", "last_subject")
CONCENTRATION_THRESHOLD = 0.5
CONCENTRATION_MAX_OTHERS = 3
CONCENTRATION_TOP_SHARE = 0.10
"""The paper's "10 % most concentrated" facts (§5.3), by rank of ``peak_share`` (:func:`concentrated_facts`)."""


def _check_collapse(collapse: str) -> None:
    if collapse not in COLLAPSES:
        raise ValueError(f"collapse must be one of {COLLAPSES}, got {collapse!r}")


# ----------------------------------------------------------------------------------------------------------------
# Pure functions on one grid (fractional_effect, per_layer_effect, peak_cell: tracer.effects, re-exported)
# ----------------------------------------------------------------------------------------------------------------


def is_concentrated(
    effects: Float[Tensor | np.ndarray, " L"],
    threshold: float = CONCENTRATION_THRESHOLD,
    max_others: int = CONCENTRATION_MAX_OTHERS,
) -> bool:
    """App. B "concentrated effects" rule on one per-layer (max-over-tokens) curve.

    True iff at most ``max_others`` layers *besides the peak layer* have an effect ≥ ``threshold`` × max effect.
    A curve whose max is ≤ 0 or undefined (all NaN) is not concentrated (every layer ties with a zero peak).
    """
    e = effects.detach().cpu().double().numpy() if isinstance(effects, Tensor) else np.asarray(effects, float)
    if e.size == 0 or np.all(np.isnan(e)):
        return False
    m = np.nanmax(e)
    if not m > 0:
        return False
    n_near = int(np.sum(np.nan_to_num(e, nan=-np.inf) >= threshold * m)) - 1
    return n_near <= max_others


# ----------------------------------------------------------------------------------------------------------------
# Polars functions on the long tracing table
# ----------------------------------------------------------------------------------------------------------------

_TRACE_REQUIRED = ("fact_id", "kind", "window", "token_index", "layer")


def _check_columns(df: pl.DataFrame, cols: tuple[str, ...] | list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; has {df.columns}")


def with_fractional(trace: pl.DataFrame, *, recompute: bool = True) -> pl.DataFrame:
    """The tracing table with a ``fractional`` column (Float64, null where undefined).

    ``recompute=True`` (default) recomputes it from ``prob``/``p_clean``/``p_noised`` with
    :func:`tracer.effects.fractional_effect` (the deleted share for rows whose ``corruption`` is "zero");
    ``recompute=False`` keeps the stored column (NaN → null).
    """
    if recompute:
        _check_columns(trace, ("prob", "p_clean", "p_noised"), "tracing table")
        prob, p_clean = trace["prob"].to_numpy(), trace["p_clean"].to_numpy()
        p_noised = trace["p_noised"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        frac = fractional_effect(prob, p_clean, p_noised, "restored")
        if "corruption" in trace.columns:
            zero = (trace["corruption"] == "zero").to_numpy()
            if zero.any():
                frac = np.where(zero, fractional_effect(prob, p_clean, None, "deleted"), frac)
        col = pl.Series("fractional", frac, dtype=pl.Float64)
    else:
        _check_columns(trace, ("fractional",), "tracing table")
        col = trace["fractional"].cast(pl.Float64)
    return trace.with_columns(col.fill_nan(None).alias("fractional"))


def _select(trace: pl.DataFrame, kind: str | None, window: int | None, localization: str | None = None) -> pl.DataFrame:
    trace = select_localization(trace, localization)
    if kind is not None:
        out = trace.filter(pl.col("kind") == kind)
        if out.height == 0:
            raise ValueError(f"no tracing rows with kind={kind!r}; kinds present: {trace['kind'].unique().to_list()}")
        trace = out
    if window is not None:
        out = trace.filter(pl.col("window") == window)
        if out.height == 0:
            raise ValueError(
                f"no tracing rows with window={window}; windows present: {sorted(trace['window'].unique().to_list())}"
            )
        trace = out
    return trace


def select_localization(trace: pl.DataFrame, localization: str | None = None) -> pl.DataFrame:
    """The rows of one localization method (``localization`` column, :data:`tracer.vocab.LOCALIZATIONS`). None:
    "noise" when present (the paper's method), else the table's only method; a table without the column (older
    runs) is all noise tracing."""
    if "localization" not in trace.columns:
        if localization not in (None, "noise"):
            raise ValueError(f"this tracing table has no localization column (noise tracing only), asked {localization!r}")
        return trace
    present = trace["localization"].unique().to_list()
    if localization is None:
        if "noise" in present or not present:
            localization = "noise"
        elif len(present) == 1:
            localization = present[0]
        else:
            raise ValueError(f"the tracing table holds several localization methods {sorted(present)}: name one")
    out = trace.filter(pl.col("localization") == localization)
    if out.height == 0 and trace.height:
        raise ValueError(f"no tracing rows with localization={localization!r}; present: {sorted(present)}")
    return out


def per_layer_effects(
    trace: pl.DataFrame,
    *,
    collapse: Collapse = "max",
    kind: str | None = None,
    window: int | None = None,
    recompute: bool = True,
    localization: str | None = None,
) -> pl.DataFrame:
    """Per-layer tracing effect per (fact_id, kind, window, layer) → column ``effect`` (§4.1; Fig. 16 for
    ``collapse="last_subject"``). Optionally restricted to one ``kind`` / ``window``.

    Max over tokens ignores null cells; a layer with no defined cell (or no last-subject row) gets a null effect.
    """
    _check_collapse(collapse)
    _check_columns(trace, _TRACE_REQUIRED, "tracing table")
    t = with_fractional(_select(trace, kind, window, localization), recompute=recompute)
    keys = ["fact_id", "kind", "window", "layer"]
    if collapse == "max":
        agg = pl.col("fractional").max().alias("effect")
    else:
        _check_columns(trace, ("is_last_subject",), "tracing table")
        agg = pl.col("fractional").filter(pl.col("is_last_subject")).first().alias("effect")
    return t.group_by(keys).agg(agg).sort(keys)


def peak_layers(
    trace: pl.DataFrame, *, kind: str | None = None, window: int | None = None, recompute: bool = True,
    localization: str | None = None,
) -> pl.DataFrame:
    """Peak cell of each fact's grid (Figs. 1, 11): argmax over (token, layer) of the fractional effect.

    Returns one row per (fact_id, kind, window): ``peak_layer``, ``peak_token_index``, ``peak_effect``. Ties → the
    smallest token, then the smallest layer (same rule as :func:`peak_cell` and ``TraceResult.peak``). Facts with no
    defined cell are dropped.
    """
    _check_columns(trace, _TRACE_REQUIRED, "tracing table")
    t = with_fractional(_select(trace, kind, window, localization), recompute=recompute).drop_nulls("fractional")
    keys = ["fact_id", "kind", "window"]
    return (
        t.sort(["fractional", "token_index", "layer"], descending=[True, False, False])
        .group_by(keys, maintain_order=True)
        .first()
        .select(
            *keys,
            pl.col("layer").alias("peak_layer"),
            pl.col("token_index").alias("peak_token_index"),
            pl.col("fractional").alias("peak_effect"),
        )
        .sort(keys)
    )


def concentrated_facts(
    effects: pl.DataFrame,
    *,
    threshold: float = CONCENTRATION_THRESHOLD,
    max_others: int = CONCENTRATION_MAX_OTHERS,
    top_share: float = CONCENTRATION_TOP_SHARE,
) -> pl.DataFrame:
    """Concentrated-effects flags from a :func:`per_layer_effects` frame (use ``collapse="max"``, window 5).

    One row per (fact_id, kind, window): ``max_effect``, ``n_near_peak`` (layers besides the peak with effect
    ≥ threshold × max), ``concentrated`` (App. B's rule: ``n_near_peak ≤ max_others`` and ``max_effect > 0``),
    ``peak_share`` (the peak's share of the curve's positive effect, max / Σ max(effect, 0): 1 when one layer holds it
    all) and ``concentrated_top`` (the paper's §5.3 wording: the ``top_share`` (10 %) of facts with the largest
    ``peak_share`` within their kind × window, at least one; ties at the cut are all in; ``max_effect ≤ 0``
    never is).
    """
    _check_columns(effects, ("fact_id", "kind", "window", "layer", "effect"), "per-layer effects")
    keys = ["fact_id", "kind", "window"]
    m = pl.col("effect").max()
    out = (
        effects.group_by(keys)
        .agg(
            m.alias("max_effect"),
            ((pl.col("effect") >= threshold * m).sum().cast(pl.Int64) - 1).alias("n_near_peak"),
            (m / pl.col("effect").clip(lower_bound=0).sum()).alias("peak_share"),
        )
        .with_columns(
            ((pl.col("max_effect") > 0) & (pl.col("n_near_peak") <= max_others)).fill_null(False).alias("concentrated"),
            pl.when(pl.col("max_effect") > 0).then(pl.col("peak_share")).otherwise(None).alias("peak_share"),
        )
    )
    n_top = pl.max_horizontal(pl.lit(1), (pl.col("peak_share").count() * top_share).ceil().cast(pl.Int64))
    cut = pl.col("peak_share").sort(descending=True, nulls_last=True).gather(n_top - 1).first()
    return (
        out.with_columns(
            ((pl.col("peak_share") >= cut.over(["kind", "window"])) & pl.col("peak_share").is_not_null())
            .fill_null(False).alias("concentrated_top")
        )
        .sort(keys)
    )
