"""The result of a causal trace / zeroing run (:class:`TraceResult`), its flat record and the long tracing table.

Effects (restoration fraction for noise/flip, deleted share for zeroing, NaN where undefined) come from the one
formula in :mod:`tracer.effects`; the corruption kind's registry entry (:data:`tracer.vocab.CORRUPTIONS`) says
which applies.

``to_record()`` / ``from_record()`` give the JSON-able record the study journals store (one per grid);
:func:`tracing_frame` expands records to the long tracing table (columns :data:`TRACING_COLUMNS`,
docs/CONTRACTS.md) — the one builder used by :meth:`TraceResult.to_frame` and the study.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from locedit.tracer.effects import fractional_effect, peak_cell, per_layer_effect
from locedit.tracer.vocab import CORRUPTIONS

__all__ = ["TraceResult", "TRACING_COLUMNS", "UndefinedEffectError", "tracing_frame"]


class UndefinedEffectError(ValueError):
    """Every cell's effect is undefined (p_clean == p_corrupt, or p_clean == 0 for zeroing): there is no peak."""


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
        p_noised: p(target) on the corrupted run (mean over noise samples; the flipped prompt for flip); ``None``
            for zeroing, which has no corrupted run.
        kind: a tracing kind ("mlp" | "attn" | "resid").
        window: number of layers restored per cell (clipped at the model's ends).
        algorithm: "exact" | "naive" | "attribution" (a tracing algorithm), or "zero" for zeroing.
        sigma: absolute noise std (None for flip corruption and zeroing; the empirical std for explicit noise).
        samples: number of noise samples (1 for flip / zeroing).
        corrupt: the corruption kind, "noise" | "flip" | "zero".
        traced: ``[T]`` bool, rows that were actually computed.
        prompt, subject, target: the inputs; flip_subject: the replacement subject for ``corrupt="flip"``.
    """

    tokens: tuple[str, ...]
    subject_span: tuple[int, int]
    grid: Float[Tensor, "T L"]
    p_clean: float
    p_noised: float | None
    kind: str
    window: int
    algorithm: str
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
        """``[T, L]`` effect per cell (:func:`tracer.effects.fractional_effect`): for traces
        ``max(0, (grid − p_noised) / |p_clean − p_noised|)`` (Hase §4.1; not clipped above), for zeroing the
        deleted share ``clip((p_clean − grid) / p_clean, 0, 1)``; NaN everywhere when the denominator is < 1e-12."""
        effect = CORRUPTIONS[self.corrupt].effect
        return fractional_effect(self.grid.double(), self.p_clean, self.p_noised, effect).to(self.grid.dtype)

    def per_layer(self, collapse: Literal["max", "last_subject"] = "max") -> Float[Tensor, "L"]:
        """``[L]`` per-layer effect: max over the traced tokens (default) or the value at the last subject token."""
        frac = self.fractional()
        if collapse == "max":
            return per_layer_effect(frac[self._traced_mask()], "max")
        return per_layer_effect(frac, collapse, self.last_subject_index)

    def peak(self) -> tuple[int, int]:
        """``(token, layer)`` of the largest fractional effect (first in row-major order on ties; NaN ignored).

        Raises:
            UndefinedEffectError: every effect is undefined (see :meth:`fractional`).
        """
        cell = peak_cell(self.fractional())
        if cell is None:
            raise UndefinedEffectError(
                f"no peak: the effect is undefined everywhere (p_clean={self.p_clean:.4g}, p_noised={self.p_noised})"
            )
        return cell

    def peak_layer(self) -> int:
        """Layer of the argmax over (token, layer) of :meth:`fractional` (the paper's "peak layer")."""
        return self.peak()[1]

    def _traced_mask(self) -> Bool[Tensor, "T"]:
        if self.traced is not None:
            return self.traced
        mask = torch.zeros(self.n_tokens, dtype=torch.bool)
        mask[self.subject_span[0] :] = True
        return mask

    # ------------------------------------------------------------------ records and tables
    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict with everything :meth:`from_record` needs (what the study journals store)."""
        return {
            "tokens": list(self.tokens), "subject_span": list(self.subject_span), "grid": self.grid.tolist(),
            "p_clean": float(self.p_clean), "p_noised": None if self.p_noised is None else float(self.p_noised),
            "kind": self.kind, "window": int(self.window), "algorithm": self.algorithm,
            "sigma": None if self.sigma is None else float(self.sigma), "samples": int(self.samples),
            "corrupt": self.corrupt, "traced": None if self.traced is None else self.traced.tolist(),
            "prompt": self.prompt, "subject": self.subject, "target": self.target, "flip_subject": self.flip_subject,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TraceResult:
        """Inverse of :meth:`to_record` (``KeyError`` for a record that lacks a field :meth:`to_record` writes)."""
        traced = record["traced"]
        return cls(
            tokens=tuple(record["tokens"]), subject_span=tuple(record["subject_span"]),
            grid=torch.tensor(record["grid"], dtype=torch.float64), p_clean=float(record["p_clean"]),
            p_noised=None if record["p_noised"] is None else float(record["p_noised"]),
            kind=record["kind"], window=int(record["window"]), algorithm=record["algorithm"],
            sigma=record["sigma"], samples=int(record["samples"]), corrupt=record["corrupt"],
            traced=None if traced is None else torch.tensor(traced, dtype=torch.bool),
            prompt=record["prompt"], subject=record["subject"], target=record["target"],
            flip_subject=record["flip_subject"], extra=dict(record["extra"] or {}),
        )

    def to_frame(self, fact_id: str | int = ""):
        """Long polars frame, one row per (token, layer) cell (:data:`TRACING_COLUMNS`)."""
        return tracing_frame([{**self.to_record(), "fact_id": str(fact_id)}])

    # ------------------------------------------------------------------ pictures
    def labels(self) -> list[str]:
        """Token labels with subject tokens marked by ``*`` (paper Fig. 2)."""
        s, e = self.subject_span
        return [f"{tok}*" if s <= i < e else tok for i, tok in enumerate(self.tokens)]

    def heatmap(self, values: Literal["fractional", "prob"] = "fractional"):
        """circuitsvis rendering (Jupyter): tokens colored by the effect, one button per layer.
        ``str()`` of the returned ``RenderedHTML`` is a standalone HTML page."""
        from locedit.tracer.plots import circuitsvis_heatmap

        return circuitsvis_heatmap(self, values=values)

    def plot(self, values: Literal["fractional", "prob"] = "prob"):
        """plotly heatmap (tokens on y, layers on x, subject tokens marked ``*``)."""
        from locedit.tracer.plots import plotly_heatmap

        return plotly_heatmap(self, values=values)

    def save_html(self, path, *, which: Literal["plotly", "circuitsvis"] = "plotly") -> None:
        """Write :meth:`plot` (default) or :meth:`heatmap` to ``path`` as a standalone HTML file."""
        from locedit.tracer.plots import save_html

        save_html(self, path, which=which)

    def __repr__(self) -> str:
        return (
            f"TraceResult(kind={self.kind!r}, window={self.window}, algorithm={self.algorithm!r}, "
            f"corrupt={self.corrupt!r}, T={self.n_tokens}, L={self.n_layers}, subject_span={self.subject_span}, "
            f"p_clean={self.p_clean:.4g}, p_noised={self.p_noised})"
        )


# ---------------------------------------------------------------------------------------------- the long table
def _tracing_schema():
    import polars as pl

    return {
        "fact_id": pl.String, "localization": pl.String, "kind": pl.String, "window": pl.Int64,
        "corruption": pl.String, "sigma": pl.Float64, "flip_partner": pl.String, "token_index": pl.Int64,
        "token": pl.String, "is_subject": pl.Boolean, "is_last_subject": pl.Boolean, "layer": pl.Int64,
        "prob": pl.Float64, "p_clean": pl.Float64, "p_noised": pl.Float64, "fractional": pl.Float64,
        "logit_diff": pl.Float64,
    }


TRACING_COLUMNS = (
    "fact_id", "localization", "kind", "window", "corruption", "sigma", "flip_partner", "token_index", "token",
    "is_subject", "is_last_subject", "layer", "prob", "p_clean", "p_noised", "fractional", "logit_diff",
)


def record_localization(rec: dict[str, Any]) -> str:
    """The localization method of a tracing record: its ``localization`` field (study records), else read from
    its corruption and algorithm (a result traced outside a study: attribution of noise → "attribution")."""
    if rec.get("localization"):
        return str(rec["localization"])
    return "attribution" if rec["algorithm"] == "attribution" else rec["corrupt"]


def tracing_frame(records: Sequence[dict[str, Any]]):
    """The long tracing table (one row per fact × grid cell; columns :data:`TRACING_COLUMNS`) from
    :meth:`TraceResult.to_record` dicts carrying a ``fact_id``. ``fractional`` is :meth:`TraceResult.fractional`
    (NaN → null); ``p_noised`` is null for zeroing."""
    import polars as pl

    cols: dict[str, list] = {c: [] for c in TRACING_COLUMNS}
    for rec in records:
        res = TraceResult.from_record(rec)
        T, L = res.n_tokens, res.n_layers
        s, e = res.subject_span
        t_idx = [t for t in range(T) for _ in range(L)]
        n = T * L
        cols["fact_id"] += [str(rec.get("fact_id", ""))] * n
        cols["localization"] += [record_localization(rec)] * n
        cols["kind"] += [res.kind] * n
        cols["window"] += [int(res.window)] * n
        cols["corruption"] += [res.corrupt] * n
        cols["sigma"] += [None if res.sigma is None else float(res.sigma)] * n
        partners = res.extra.get("flip_partners")
        cols["flip_partner"] += [";".join(partners) if partners else res.flip_subject] * n
        ld = res.extra.get("logit_diff")
        cols["logit_diff"] += [float(v) for row in ld["grid"] for v in row] if ld else [None] * n
        cols["token_index"] += t_idx
        cols["token"] += [res.tokens[t] for t in t_idx]
        cols["is_subject"] += [s <= t < e for t in t_idx]
        cols["is_last_subject"] += [t == e - 1 for t in t_idx]
        cols["layer"] += [layer for _ in range(T) for layer in range(L)]
        cols["prob"] += res.grid.double().flatten().tolist()
        cols["p_clean"] += [float(res.p_clean)] * (T * L)
        cols["p_noised"] += [res.p_noised] * (T * L)
        cols["fractional"] += res.fractional().double().flatten().tolist()
    df = pl.DataFrame(cols, schema=_tracing_schema())
    return df.with_columns(pl.col("fractional").fill_nan(None))
