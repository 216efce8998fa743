"""Pictures of a :class:`~tracer.result.TraceResult`: circuitsvis (Jupyter) and plotly heatmaps, saveable as HTML."""

from __future__ import annotations

from pathlib import Path

from locedit.tracer.atomic import write_atomic
from locedit.tracer.vocab import CORRUPTIONS, TRACING_KINDS

__all__ = ["circuitsvis_heatmap", "plotly_heatmap", "save_html"]



def _values(res, values: str):
    if values == "fractional":
        return res.fractional().detach().float().cpu()
    if values == "prob":
        return res.grid.detach().float().cpu()
    raise ValueError(f"values must be 'fractional' or 'prob', got {values!r}")


def _title(res) -> str:
    corruption = CORRUPTIONS[res.corrupt].label
    if res.corrupt == "flip":
        corruption += f" → {res.flip_subject!r}"
    what = "zeroing" if res.corrupt == "zero" else "restoring"
    p_corrupt = "" if res.p_noised is None else f", p_corrupt={res.p_noised:.4f}"
    return (
        f"{what} {TRACING_KINDS[res.kind].label} (window {res.window}, {res.algorithm}, {corruption}) — "
        f"p_clean={res.p_clean:.4f}{p_corrupt}"
    )


def circuitsvis_heatmap(res, values: str = "fractional"):
    """``circuitsvis.tokens.colored_tokens_multi``: the T tokens (subject marked ``*``) coloured by the effect,
    with one selectable value series per layer ("layer 0" ... "layer L-1"). Returns a ``RenderedHTML``."""
    import circuitsvis as cv

    vals = _values(res, values)
    return cv.tokens.colored_tokens_multi(
        tokens=res.labels(), values=vals, labels=[f"layer {l}" for l in range(res.n_layers)]
    )


def plotly_heatmap(res, values: str = "prob"):
    """A plotly ``Figure``: heatmap with tokens on y (top to bottom), layers on x, subject tokens marked ``*``."""
    import plotly.graph_objects as go

    vals = _values(res, values).numpy()
    labels = [f"{i}: {tok!r}" for i, tok in enumerate(res.labels())]
    fig = go.Figure(
        go.Heatmap(
            z=vals,
            x=list(range(res.n_layers)),
            y=labels,
            colorscale="Purples" if res.kind == "mlp" else ("Greens" if res.kind == "attn" else "Blues"),
            colorbar={"title": "p(target)" if values == "prob" else "fractional"},
            hovertemplate="token %{y}<br>layer %{x}<br>value %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=_title(res),
        xaxis_title=f"center layer of the {res.window}-layer window",
        yaxis={"autorange": "reversed", "type": "category"},
        height=max(300, 28 * res.n_tokens + 140),
    )
    return fig


def save_html(res, path, which: str = "plotly") -> None:
    """Write the plotly figure (``which="plotly"``) or the circuitsvis view (``"circuitsvis"``) to ``path``."""
    path = Path(path)
    if which == "plotly":
        write_atomic(path, plotly_heatmap(res).to_html(include_plotlyjs=True, full_html=True))  # works offline
    elif which == "circuitsvis":
        write_atomic(path, str(circuitsvis_heatmap(res)))
    else:
        raise ValueError(f"which must be 'plotly' or 'circuitsvis', got {which!r}")
