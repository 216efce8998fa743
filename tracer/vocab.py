"""The tracer's vocabulary, declared once: tracing kinds, tracing algorithms, corruption kinds, and the layer-window
rule. Everything else (``trace``, ``zero``, the study config, the CLI's choices, the stats labels test) reads these.

* **tracing kind** — which output a cell restores (or zeroes): ``"mlp"`` (``blocks.{l}.hook_mlp_out``), ``"attn"``
  (``hook_attn_out``), ``"resid"`` (``hook_resid_post``; window 1).
* **tracing algorithm** — how a grid is computed: ``"exact"`` (fast, equal to naive), ``"naive"`` (one forward per
  cell), ``"attribution"`` (first-order estimate). Not to be confused with an *edit method* (:mod:`editors.methods`).
* **corruption kind** — what the corrupted run does to the subject: ``"noise"`` (Gaussian noise at its embeddings),
  ``"flip"`` (another subject), ``"zero"`` (no corruption: zero the kind's outputs on the clean run). Its ``effect``
  says which fractional effect applies (:func:`tracer.effects.fractional_effect`).

Edit token rules (where ROME/MEMIT read k*) are the editors' vocabulary: :mod:`editors.tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "CORRUPTIONS",
    "TRACING_ALGORITHMS",
    "TRACING_KINDS",
    "LOCALIZATIONS",
    "LocalizationName",
    "LocalizationSpec",
    "CorruptionKind",
    "CorruptionSpec",
    "Effect",
    "TracingAlgorithm",
    "TracingKind",
    "TracingKindSpec",
    "UnknownAlgorithmError",
    "UnknownKindError",
    "check_choice",
    "window_layers",
]

TracingKind = Literal["mlp", "attn", "resid"]
TracingAlgorithm = Literal["exact", "naive", "attribution"]
CorruptionKind = Literal["noise", "flip", "zero"]
LocalizationName = Literal["noise", "flip", "zero", "attribution"]
Effect = Literal["restored", "deleted"]


class UnknownKindError(ValueError):
    """``kind`` is not a tracing kind (:data:`TRACING_KINDS`)."""


class UnknownAlgorithmError(ValueError):
    """``algorithm`` is not a tracing algorithm (:data:`TRACING_ALGORITHMS`)."""


@dataclass(frozen=True)
class TracingKindSpec:
    """One tracing kind: its hook (per block), default window and display label."""

    name: str
    hook: str
    default_window: int
    label: str


@dataclass(frozen=True)
class CorruptionSpec:
    """One corruption kind.

    Attributes:
        effect: "restored" — the share of (p_clean − p_corrupt) a restoration recovers (noise, flip); "deleted" —
            the share of p_clean that zeroing deletes (zero).
    """

    name: str
    label: str
    effect: Effect


TRACING_KINDS: Mapping[str, TracingKindSpec] = {
    "mlp": TracingKindSpec("mlp", "hook_mlp_out", 5, "MLP"),
    "attn": TracingKindSpec("attn", "hook_attn_out", 5, "Attention"),
    "resid": TracingKindSpec("resid", "hook_resid_post", 1, "Residual stream"),
}
TRACING_ALGORITHMS: tuple[str, ...] = get_args(TracingAlgorithm)
CORRUPTIONS: Mapping[str, CorruptionSpec] = {
    "noise": CorruptionSpec("noise", "Gaussian noise", "restored"),
    "flip": CorruptionSpec("flip", "subject flip", "restored"),
    "zero": CorruptionSpec("zero", "zeroing", "deleted"),
}
assert tuple(TRACING_KINDS) == get_args(TracingKind) and tuple(CORRUPTIONS) == get_args(CorruptionKind)


@dataclass(frozen=True)
class LocalizationSpec:
    """A localization method of the study: which corruption the grid uses and how it is computed.

    Attributes:
        name, label: the registry key and display label.
        corruption: a :data:`CORRUPTIONS` kind ("noise", "flip", "zero").
        algorithm: "exact" (a fast path equal to the naive one) or "attribution" (first-order estimate).
        source: where the method comes from (for the report).
    """

    name: str
    label: str
    corruption: str
    algorithm: str
    source: str


LOCALIZATIONS: Mapping[str, LocalizationSpec] = {
    "noise": LocalizationSpec("noise", "causal tracing (noise)", "noise", "exact", "Meng et al. 2022; Hase et al. §3.2"),
    "flip": LocalizationSpec("flip", "input flipping", "flip", "exact", "Reber, Redeeming the Localization Hypothesis"),
    "zero": LocalizationSpec("zero", "representation zeroing", "zero", "exact", "Hase et al. App. B"),
    "attribution": LocalizationSpec("attribution", "attribution patching (noise)", "noise", "attribution",
                                    "first-order estimate of causal tracing (Nanda 2023; Syed et al. 2023)"),
}
assert tuple(LOCALIZATIONS) == get_args(LocalizationName)


def check_choice(value: object, choices, what: str, error: type[Exception] = ValueError) -> str:
    """``value`` if it is one of ``choices`` (a registry or a tuple of names), else ``error`` naming ``what`` and
    the choices. The one validation every registry name goes through."""
    names = tuple(choices)
    if not isinstance(value, str) or value not in names:
        raise error(f"unknown {what} {value!r}; choose one of {names}")
    return value


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layer window centred on ``layer`` — the reference code's rule, the one rule for tracing windows, MEMIT's
    and FT-5's edited layers: ``range(max(0, l − w//2), min(L, l − (−w//2)))`` (w = 5 → l−2..l+2, w = 10 → l−5..l+4,
    clipped at the model's ends)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
