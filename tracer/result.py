"""The result of a causal trace / zeroing run: :class:`TraceResult`.

Fractional effect (Hase et al. 2023 §3.2, Meng et al. 2022 causal tracing) of restoring cell (t, l)::

    frac(t, l) = max(0, (p_restored(t, l) − p_noised) / |p_clean − p_noised|)

(the reference code divides by the *absolute* difference). When ``p_clean == p_noised`` (to 1e-12) the
denominator vanishes and :meth:`TraceResult.fractional` returns all zeros instead of NaN/inf.

For representation zeroing (``method == "zero"``, paper App. B) the effect is the share of the clean probability
that zeroing deletes: ``clip((p_clean − p_zeroed) / p_clean, 0, 1)`` (zeros when ``p_clean == 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["TraceResult", "TRACING_COLUMNS"]

TRACING_COLUMNS = (
    "fact_id",
    "kind",
    "window",
    "token_index",
    "token",
    "is_subject",
    "is_last_subject",
    "layer",
    "prob",
    "p_clean",
    "p_noised",
    "fractional",
)

_EPS = 1e-12


@dataclass(frozen=True, eq=False)
class TraceResult:
    """A [T, L] grid of restored (or zeroed) target probabilities for one fact.

    Attributes:
        tokens: the ``T`` string tokens of the (clean) prompt.
        subject_span: ``(start, end)`` token indices of the subject, end exclusive.
        grid: ``[T, L]`` probability of the target when cell (t, l) is restored (trace) / zeroed (zero).
            Rows of tokens before the subject (and untraced rows, see ``traced``) hold ``p_noised`` for traces
            and ``p_clean`` for zeroing: nothing was run for them.
        p_clean: p(target | prompt) on the clean run.
        p_noised: p(target) on the corrupted run (mean over noise samples); for ``method="zero"`` 0.0
            (not used by :meth:`fractional`).
        kind: "mlp" | "attn" | "resid".
        window: number of layers restored per cell (clipped at the model's ends).
        method: "exact" | "naive" | "attribution" | "zero".
        sigma: absolute noise std (None for flip corruption and zeroing; the empirical std for explicit noise).
        samples: number of noise samples (1 for flip / zeroing).
        corrupt: "noise" | "flip" | "zero".
        traced: ``[T]`` bool, rows that were actually computed.
        prompt, subject, target: the inputs; flip_subject: the replacement subject for ``corrupt="flip"``.
    """

    tokens: tuple[str, ...]
    subject_span: tuple[int, int]
    grid: Float[Tensor, "T L"]
    p_clean: float
    p_noised: float
    kind: str
    window: int
    method: str
    sigma: float | None
    samples: int = 1
    corrupt: str = "noise"
    traced: Bool[Tensor, "T"] | None = None
    prompt: str = ""
    subject: str = ""
    target: str = ""
    flip_subject: str | None = None
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ shapes
    @property
    def n_tokens(self) -> int:
        return int(self.grid.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.grid.shape[1])

    @property
    def last_subject_index(self) -> int:
        return self.subject_span[1] - 1

    # ------------------------------------------------------------------ effects
    def fractional(self) -> Float[Tensor, "T L"]:
        """``[T, L]`` fractional effect.

        Traces: ``max(0, (grid − p_noised) / |p_clean − p_noised|)`` (Hase §3.2); all zeros when
        ``|p_clean − p_noised| < 1e-12``. Not clipped above: a restoration may overshoot p_clean.
        Zeroing: deleted share of the clean probability, ``clip((p_clean − grid) / p_clean, 0, 1)``.
        """
        g = self.grid.double()
        if self.method == "zero":
            if self.p_clean < _EPS:
                return torch.zeros_like(self.grid)
            return ((self.p_clean - g) / self.p_clean).clamp(0.0, 1.0).to(self.grid.dtype)
        denom = abs(self.p_clean - self.p_noised)
        if denom < _EPS:
            return torch.zeros_like(self.grid)
        return ((g - self.p_noised) / denom).clamp(min=0.0).to(self.grid.dtype)

    def per_layer(self, collapse: Literal["max", "last_subject"] = "max") -> Float[Tensor, "L"]:
        """``[L]`` per-layer effect: max over the traced tokens (default) or the value at the last subject token."""
        frac = self.fractional()
        if collapse == "max":
            rows = self._traced_mask()
            return frac[rows].max(dim=0).values
        if collapse == "last_subject":
            return frac[self.last_subject_index]
        raise ValueError(f"collapse must be 'max' or 'last_subject', got {collapse!r}")

    def peak(self) -> tuple[int, int]:
        """``(token, layer)`` of the largest fractional effect (first in row-major order on ties)."""
        frac = self.fractional()
        idx = int(torch.argmax(frac.flatten()))
        return idx // self.n_layers, idx % self.n_layers

    def peak_layer(self) -> int:
        """Layer of the argmax over (token, layer) of :meth:`fractional` (the paper's "peak layer")."""
        return self.peak()[1]

    def _traced_mask(self) -> Bool[Tensor, "T"]:
        if self.traced is not None:
            return self.traced
        mask = torch.zeros(self.n_tokens, dtype=torch.bool)
        mask[self.subject_span[0] :] = True
        return mask

    # ------------------------------------------------------------------ tables
    def to_frame(self, fact_id: str | int = ""):
        """Long polars frame, one row per (token, layer) cell, with the tracing-table columns of CONTRACTS.md."""
        import polars as pl

        T, L = self.n_tokens, self.n_layers
        s, e = self.subject_span
        frac = self.fractional().flatten().tolist()
        t_idx = [t for t in range(T) for _ in range(L)]
        return pl.DataFrame(
            {
                "fact_id": [str(fact_id)] * (T * L),
                "kind": [self.kind] * (T * L),
                "window": [int(self.window)] * (T * L),
                "token_index": t_idx,
                "token": [self.tokens[t] for t in t_idx],
                "is_subject": [s <= t < e for t in t_idx],
                "is_last_subject": [t == e - 1 for t in t_idx],
                "layer": [l for _ in range(T) for l in range(L)],
                "prob": self.grid.double().flatten().tolist(),
                "p_clean": [float(self.p_clean)] * (T * L),
                "p_noised": [float(self.p_noised)] * (T * L),
                "fractional": frac,
            },
            schema={
                "fact_id": pl.String,
                "kind": pl.String,
                "window": pl.Int64,
                "token_index": pl.Int64,
                "token": pl.String,
                "is_subject": pl.Boolean,
                "is_last_subject": pl.Boolean,
                "layer": pl.Int64,
                "prob": pl.Float64,
                "p_clean": pl.Float64,
                "p_noised": pl.Float64,
                "fractional": pl.Float64,
            },
        )

    # ------------------------------------------------------------------ pictures
    def labels(self) -> list[str]:
        """Token labels with subject tokens marked by ``*`` (paper Fig. 2)."""
        s, e = self.subject_span
        return [f"{tok}*" if s <= i < e else tok for i, tok in enumerate(self.tokens)]

    def heatmap(self, values: Literal["fractional", "prob"] = "fractional"):
        """circuitsvis rendering (Jupyter): tokens colored by the effect, one button per layer.
        ``str()`` of the returned ``RenderedHTML`` is a standalone HTML page."""
        from tracer.plots import circuitsvis_heatmap

        return circuitsvis_heatmap(self, values=values)

    def plot(self, values: Literal["fractional", "prob"] = "prob"):
        """plotly heatmap (tokens on y, layers on x, subject tokens marked ``*``)."""
        from tracer.plots import plotly_heatmap

        return plotly_heatmap(self, values=values)

    def save_html(self, path, *, which: Literal["plotly", "circuitsvis"] = "plotly") -> None:
        """Write :meth:`plot` (default) or :meth:`heatmap` to ``path`` as a standalone HTML file."""
        from tracer.plots import save_html

        save_html(self, path, which=which)

    def __repr__(self) -> str:
        return (
            f"TraceResult(kind={self.kind!r}, window={self.window}, method={self.method!r}, "
            f"corrupt={self.corrupt!r}, T={self.n_tokens}, L={self.n_layers}, subject_span={self.subject_span}, "
            f"p_clean={self.p_clean:.4g}, p_noised={self.p_noised:.4g})"
        )
