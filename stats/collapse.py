"""Collapse causal-tracing grids to per-layer effects (Hase et al. 2023 §4.1, App. B; Figs. 1, 10, 11).

The tracer produces a T × L grid of restored probabilities per (fact, kind, window). The paper turns it into one
number per layer:

* the *fractional* effect of each cell (§4.1, the equation under "Tracing Effect at layer ℓ")::

      frac(t, ℓ) = max(0, (p_restored − p_noised) / |p_clean − p_noised|)

  The paper prints the denominator as ``p_clean − p_noised``; the reference code (google/belief-localization) uses
  the absolute value, which only differs when noising *raised* p(o_true). We follow the reference (see
  ``REFERENCE_NOTES.md``, "Collapse"), then clip at 0. A zero denominator gives an undefined (null/NaN) effect.
* per layer, the **max over tokens** (the paper's default, ``collapse="max"``) or the value at the **last subject
  token** (App. C, Fig. 16, ``collapse="last_subject"``);
* the **peak layer** of a fact = the layer of argmax over (token, layer) of the fractional grid (Figs. 1, 11);
* **concentrated effects** (App. B, Table 2): no more than 3 layers *besides the peak layer* whose per-layer
  (max-over-tokens) effect is ≥ 50% of the maximum per-layer effect.

Two faces of the same logic: pure array/tensor functions for one ``[T, L]`` grid (so the tracer's TraceResult can
share them) and polars functions over the long tracing table (``docs/CONTRACTS.md``). Peak tie-breaking matches
``TraceResult.peak``: the first maximum of the row-major ``[T, L]`` grid (smallest token, then smallest layer).

Undefined effects: when ``|p_clean − p_noised| < 1e-12`` the fractional effect is NaN here (null in frames) and such
cells are ignored by the collapses; ``TraceResult.fractional`` returns zeros instead. Null traces are dropped by
the regressions rather than counted as "no effect".

Zeroing tables (App. B, ``tracer.zero``; ``p_noised`` = 0, ``fractional`` = the *deleted* share of p_clean) must be
collapsed with ``recompute=False``: recomputing with the tracing formula would give the *kept* share.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
import torch
from jaxtyping import Float
from torch import Tensor

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
_EPS = 1e-12  # same threshold as tracer.result



def _check_collapse(collapse: str) -> None:
    if collapse not in COLLAPSES:
        raise ValueError(f"collapse must be one of {COLLAPSES}, got {collapse!r}")


# ----------------------------------------------------------------------------------------------------------------
# Pure functions on one grid
# ----------------------------------------------------------------------------------------------------------------


def fractional_effect(
    prob: Float[Tensor | np.ndarray, "*shape"],
    p_clean: float | Float[Tensor | np.ndarray, "*shape"],
    p_noised: float | Float[Tensor | np.ndarray, "*shape"],
) -> Float[Tensor | np.ndarray, "*shape"]:
    """Fractional tracing effect (§4.1 equation): ``clip((prob − p_noised) / |p_clean − p_noised|, 0)``.

    Works on numpy arrays and torch tensors (returns the type of ``prob``). Where ``p_clean == p_noised`` the effect
    is undefined (``|p_clean − p_noised| < 1e-12``) and NaN is returned.
    """
    if isinstance(prob, Tensor):
        pc = torch.as_tensor(p_clean, dtype=prob.dtype, device=prob.device)
        pn = torch.as_tensor(p_noised, dtype=prob.dtype, device=prob.device)
        denom = (pc - pn).abs()
        out = (prob - pn) / denom
        out = torch.where(denom >= _EPS, out.clamp_min(0.0), torch.full_like(out, float("nan")))
        return out
    prob_a = np.asarray(prob, dtype=np.float64)
    denom = np.abs(np.asarray(p_clean, dtype=np.float64) - np.asarray(p_noised, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (prob_a - np.asarray(p_noised, dtype=np.float64)) / denom
    return np.where(denom >= _EPS, np.maximum(out, 0.0), np.nan)


def per_layer_effect(
    grid_frac: Float[Tensor | np.ndarray, "T L"], collapse: Collapse = "max", last_subject_index: int | None = None
) -> Float[Tensor | np.ndarray, " L"]:
    """Collapse one fractional ``[T, L]`` grid to a per-layer curve ``[L]`` (§4.1; App. C / Fig. 16).

    ``collapse="max"``: max over tokens, NaN cells ignored (a layer that is all NaN stays NaN).
    ``collapse="last_subject"``: the row ``last_subject_index`` (required).
    Returns a tensor for a tensor input (same dtype/device), else a float64 numpy array.
    """
    _check_collapse(collapse)
    if grid_frac.ndim != 2:
        raise ValueError(f"grid must be [T, L], got shape {tuple(grid_frac.shape)}")
    if collapse == "last_subject":
        if last_subject_index is None:
            raise ValueError("collapse='last_subject' needs last_subject_index")
        if not -grid_frac.shape[0] <= last_subject_index < grid_frac.shape[0]:
            raise IndexError(f"last_subject_index {last_subject_index} out of range for T={grid_frac.shape[0]}")
        return grid_frac[last_subject_index].clone() if isinstance(grid_frac, Tensor) else np.array(
            grid_frac[last_subject_index], dtype=np.float64
        )
    if isinstance(grid_frac, Tensor):
        masked = grid_frac.masked_fill(grid_frac.isnan(), float("-inf"))
        out = masked.amax(dim=0)
        return out.masked_fill(out == float("-inf"), float("nan"))
    g = np.asarray(grid_frac, dtype=np.float64)
    out = np.where(np.isnan(g), -np.inf, g).max(axis=0)
    return np.where(np.isneginf(out), np.nan, out)


def peak_cell(grid_frac: Float[Tensor | np.ndarray, "T L"]) -> tuple[int, int] | None:
    """``(token_index, layer)`` of the argmax over (token, layer) of a fractional grid (Figs. 1, 11).

    Ties: the first maximum in row-major order (smallest token, then layer), as ``TraceResult.peak``. NaN cells
    are ignored; an all-NaN grid gives None.
    """
    g = grid_frac.detach().cpu().double().numpy() if isinstance(grid_frac, Tensor) else np.asarray(grid_frac, float)
    if g.ndim != 2:
        raise ValueError(f"grid must be [T, L], got shape {g.shape}")
    if np.all(np.isnan(g)):
        return None
    token, layer = np.unravel_index(int(np.argmax(np.where(np.isnan(g), -np.inf, g))), g.shape)
    return int(token), int(layer)


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

    ``recompute=True`` (default) recomputes it from ``prob``/``p_clean``/``p_noised`` with the reference's rule
    ``clip((prob − p_noised)/|p_clean − p_noised|, 0)``; ``recompute=False`` keeps the tracer's column (NaN → null).
    """
    if recompute:
        _check_columns(trace, ("prob", "p_clean", "p_noised"), "tracing table")
        denom = (pl.col("p_clean") - pl.col("p_noised")).abs()
        frac = (
            pl.when(denom >= _EPS)
            .then(((pl.col("prob") - pl.col("p_noised")) / denom).clip(lower_bound=0.0))
            .otherwise(None)
        )
    else:
        _check_columns(trace, ("fractional",), "tracing table")
        frac = pl.col("fractional")
    return trace.with_columns(frac.cast(pl.Float64).fill_nan(None).alias("fractional"))


def _select(trace: pl.DataFrame, kind: str | None, window: int | None) -> pl.DataFrame:
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


def per_layer_effects(
    trace: pl.DataFrame,
    *,
    collapse: Collapse = "max",
    kind: str | None = None,
    window: int | None = None,
    recompute: bool = True,
) -> pl.DataFrame:
    """Per-layer tracing effect per (fact_id, kind, window, layer) → column ``effect`` (§4.1; Fig. 16 for
    ``collapse="last_subject"``). Optionally restricted to one ``kind`` / ``window``.

    Max over tokens ignores null cells; a layer with no defined cell (or no last-subject row) gets a null effect.
    """
    _check_collapse(collapse)
    _check_columns(trace, _TRACE_REQUIRED, "tracing table")
    t = with_fractional(_select(trace, kind, window), recompute=recompute)
    keys = ["fact_id", "kind", "window", "layer"]
    if collapse == "max":
        agg = pl.col("fractional").max().alias("effect")
    else:
        _check_columns(trace, ("is_last_subject",), "tracing table")
        agg = pl.col("fractional").filter(pl.col("is_last_subject")).first().alias("effect")
    return t.group_by(keys).agg(agg).sort(keys)


def peak_layers(
    trace: pl.DataFrame, *, kind: str | None = None, window: int | None = None, recompute: bool = True
) -> pl.DataFrame:
    """Peak cell of each fact's grid (Figs. 1, 11): argmax over (token, layer) of the fractional effect.

    Returns one row per (fact_id, kind, window): ``peak_layer``, ``peak_token_index``, ``peak_effect``. Ties → the
    smallest token, then the smallest layer (same rule as :func:`peak_cell` and ``TraceResult.peak``). Facts with no
    defined cell are dropped.
    """
    _check_columns(trace, _TRACE_REQUIRED, "tracing table")
    t = with_fractional(_select(trace, kind, window), recompute=recompute).drop_nulls("fractional")
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
) -> pl.DataFrame:
    """App. B concentrated-effects flag from a :func:`per_layer_effects` frame (use ``collapse="max"``, window 5).

    One row per (fact_id, kind, window): ``max_effect``, ``n_near_peak`` (layers besides the peak with effect
    ≥ threshold × max) and ``concentrated`` (``n_near_peak ≤ max_others`` and ``max_effect > 0``).
    """
    _check_columns(effects, ("fact_id", "kind", "window", "layer", "effect"), "per-layer effects")
    keys = ["fact_id", "kind", "window"]
    m = pl.col("effect").max()
    return (
        effects.group_by(keys)
        .agg(
            m.alias("max_effect"),
            ((pl.col("effect") >= threshold * m).sum().cast(pl.Int64) - 1).alias("n_near_peak"),
        )
        .with_columns(
            ((pl.col("max_effect") > 0) & (pl.col("n_near_peak") <= max_others)).fill_null(False).alias("concentrated")
        )
        .sort(keys)
    )
