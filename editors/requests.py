"""Edit requests and their validation.

An :class:`EditRequest` is one fact to edit: a prompt template with ``{}`` for the subject, the subject and the
target continuation (with its leading space, e.g. ``" English"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformer_lens import HookedTransformer

from tracer.tokens import EmptyTargetError, SubjectNotFoundError, locate_subject, target_tokens

__all__ = [
    "METHODS",
    "EditRequest",
    "LayerOutOfRangeError",
    "validate_layers",
    "validate_method",
    "validate_request",
    "window_layers",
]

METHODS = ("rome", "memit", "ft")


class LayerOutOfRangeError(ValueError):
    """An edit layer is not in ``range(n_layers)``."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit.

    Attributes:
        prompt: template with one ``{}`` where the subject goes, e.g. ``"The mother tongue of {} is"``.
        subject: the subject, e.g. ``"Danielle Darrieux"``.
        target: the continuation to maximize/minimize, with its leading space, e.g. ``" English"``.
    """

    prompt: str
    subject: str
    target: str

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)


def validate_request(model: HookedTransformer, request: EditRequest) -> None:
    """Raise a clear error for an unusable request.

    Raises:
        EmptyTargetError: empty target (or one that tokenizes to nothing).
        SubjectNotFoundError: the prompt has no ``{}`` or the subject is not in ``prompt.format(subject)``.
    """
    if not isinstance(request, EditRequest):
        raise TypeError(f"expected an EditRequest, got {type(request).__name__}")
    target_tokens(model, request.target)  # raises EmptyTargetError
    if "{}" not in request.prompt:
        raise SubjectNotFoundError(f"prompt {request.prompt!r} has no '{{}}' placeholder for the subject")
    locate_subject(model, request.text, request.subject)  # raises SubjectNotFoundError


def validate_layers(model: HookedTransformer, layers: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique layers, each in ``range(n_layers)``.

    Raises:
        LayerOutOfRangeError: a layer is outside ``[0, n_layers)`` (the message names it and n_layers).
        ValueError: no layers.
    """
    n = model.cfg.n_layers
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise ValueError("at least one edit layer is needed")
    for layer in layers:
        if not 0 <= layer < n:
            raise LayerOutOfRangeError(f"edit layer {layer} is out of range: the model has n_layers={n} (0..{n - 1})")
    return tuple(sorted(set(layers)))


def validate_method(method: str) -> str:
    """Lower-cased method name; ``ValueError`` for an unknown one."""
    m = str(method).lower()
    if m not in METHODS:
        raise ValueError(f"unknown edit method {method!r}; choose one of {METHODS}")
    return m


def window_layers(n_layers: int, center: int, size: int = 5) -> tuple[int, ...]:
    """The tracer's window of ``size`` layers centred on ``center``: ``range(max(0, c - size//2),
    min(L, c - (-size//2)))`` (size 5 → c-2..c+2, clipped at the ends)."""
    if not 0 <= center < n_layers:
        raise LayerOutOfRangeError(f"layer {center} is out of range: n_layers={n_layers}")
    return tuple(range(max(0, center - size // 2), min(n_layers, center - (-size // 2))))


# re-exported for convenience
EmptyTargetError = EmptyTargetError
SubjectNotFoundError = SubjectNotFoundError
