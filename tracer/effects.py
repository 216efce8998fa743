"""The effect formulas on one ``[T, L]`` grid, declared once (the tracer's :class:`TraceResult` and the stats
package's table functions both call these).

Fractional effect of a restoration (Hase et al. 2023 §4.1; Meng et al. 2022), for noise and flip corruption::

    frac(t, l) = max(0, (p(t, l) − p_corrupt) / |p_clean − p_corrupt|)

(the paper prints ``p_clean − p_corrupt`` in the denominator; the reference code takes its absolute value, which
only differs when corrupting *raised* p; not clipped above: a restoration may overshoot p_clean). Zeroing (App. B)
measures the share of the clean probability deleted::

    deleted(t, l) = clip((p_clean − p(t, l)) / p_clean, 0, 1)

Degenerate cases, one convention: when the denominator is below 1e-12 (``p_clean == p_corrupt``, or ``p_clean == 0``
for zeroing) the effect is undefined and **NaN** is returned; collapses ignore NaN cells, an all-NaN grid has no
peak, and the regressions drop such facts instead of counting them as "no effect".
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["EPS", "fractional_effect", "per_layer_effect", "peak_cell"]

EPS = 1e-12


def fractional_effect(
    prob: Float[Tensor | np.ndarray, "*shape"],
    p_clean: float | Float[Tensor | np.ndarray, "*shape"],
    p_corrupt: float | None | Float[Tensor | np.ndarray, "*shape"],
    effect: Literal["restored", "deleted"] = "restored",
) -> Float[Tensor | np.ndarray, "*shape"]:
    """The effect of each cell (module docstring): ``effect="restored"`` (noise, flip) or ``"deleted"`` (zeroing,
    ``p_corrupt`` unused). Works on numpy arrays and torch tensors (returns the type of ``prob``); NaN where the
    denominator is < 1e-12."""
    if effect not in ("restored", "deleted"):
        raise ValueError(f"effect must be 'restored' or 'deleted', got {effect!r}")
    if isinstance(prob, Tensor):
        pc = torch.as_tensor(p_clean, dtype=prob.dtype, device=prob.device)
        if effect == "deleted":
            out = ((pc - prob) / pc).clamp(0.0, 1.0)
            denom = pc.abs()
        else:
            pn = torch.as_tensor(p_corrupt, dtype=prob.dtype, device=prob.device)
            denom = (pc - pn).abs()
            out = ((prob - pn) / denom).clamp_min(0.0)
        return torch.where(denom >= EPS, out, torch.full_like(out, float("nan")))
    prob_a = np.asarray(prob, dtype=np.float64)
    pc = np.asarray(p_clean, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if effect == "deleted":
            out, denom = np.clip((pc - prob_a) / pc, 0.0, 1.0), np.abs(pc)
        else:
            pn = np.asarray(np.nan if p_corrupt is None else p_corrupt, dtype=np.float64)
            denom = np.abs(pc - pn)
            out = np.maximum((prob_a - pn) / denom, 0.0)
    return np.where(denom >= EPS, out, np.nan)


def per_layer_effect(
    grid_frac: Float[Tensor | np.ndarray, "T L"],
    collapse: Literal["max", "last_subject"] = "max",
    last_subject_index: int | None = None,
) -> Float[Tensor | np.ndarray, " L"]:
    """Collapse one fractional ``[T, L]`` grid to a per-layer curve ``[L]`` (§4.1; App. C / Fig. 16).

    ``collapse="max"``: max over tokens, NaN cells ignored (a layer that is all NaN stays NaN).
    ``collapse="last_subject"``: the row ``last_subject_index`` (required).
    Returns a tensor for a tensor input (same dtype/device), else a float64 numpy array.
    """
    if collapse not in ("max", "last_subject"):
        raise ValueError(f"collapse must be one of ('max', 'last_subject'), got {collapse!r}")
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

    Ties: the first maximum in row-major order (smallest token, then layer). NaN cells are ignored; an all-NaN grid
    gives None.
    """
    g = grid_frac.detach().cpu().double().numpy() if isinstance(grid_frac, Tensor) else np.asarray(grid_frac, float)
    if g.ndim != 2:
        raise ValueError(f"grid must be [T, L], got shape {g.shape}")
    if np.all(np.isnan(g)):
        return None
    token, layer = np.unravel_index(int(np.argmax(np.where(np.isnan(g), -np.inf, g))), g.shape)
    return int(token), int(layer)
