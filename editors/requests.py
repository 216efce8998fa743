"""Edit requests and their validation.

An :class:`EditRequest` is one fact to edit: a *template* with ``{}`` for the subject, the subject and the target
continuation (with its leading space, e.g. ``" English"``). Its ``text`` is the filled-in prompt. (Across locedit a
*template* has the ``{}`` and a *prompt* is filled-in text.)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from transformer_lens import HookedTransformer

from locedit.tracer.tokens import EmptyTargetError, SubjectNotFoundError, check_template, locate_subject, target_tokens

__all__ = [
    "EditRequest",
    "LayerOutOfRangeError",
    "UnsupportedArchitectureError",
    "validate_layers",
    "validate_request",
]


class LayerOutOfRangeError(ValueError):
    """An edit layer is not in ``range(n_layers)``."""


class UnsupportedArchitectureError(ValueError):
    """The edit method's update rule does not hold for this model's blocks (e.g. MEMIT with a post-MLP norm)."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit.

    Attributes:
        template: the prompt with one ``{}`` where the subject goes, e.g. ``"The mother tongue of {} is"``.
        subject: the subject, e.g. ``"Danielle Darrieux"``.
        target: the continuation to maximize/minimize, with its leading space, e.g. ``" English"``.
    """

    template: str
    subject: str
    target: str

    def __post_init__(self) -> None:
        check_template(self.template, "edit template")

    @property
    def text(self) -> str:
        """The prompt: the template with the subject filled in."""
        return self.template.format(self.subject)


def validate_request(model: HookedTransformer, request: EditRequest) -> None:
    """Raise a clear error for an unusable request.

    Raises:
        EmptyTargetError: empty target (or one that tokenizes to nothing).
        SubjectNotFoundError: the template has no ``{}`` or the subject is not in ``template.format(subject)``.
    """
    if not isinstance(request, EditRequest):
        raise TypeError(f"expected an EditRequest, got {type(request).__name__}")
    target_tokens(model, request.target)  # raises EmptyTargetError
    if "{}" not in request.template:
        raise SubjectNotFoundError(f"template {request.template!r} has no '{{}}' placeholder for the subject")
    locate_subject(model, request.text, request.subject)  # raises SubjectNotFoundError


def validate_layers(model: HookedTransformer, layers: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique layers, each in ``range(n_layers)``.

    Raises:
        LayerOutOfRangeError: a layer is outside ``[0, n_layers)`` (the message names it and n_layers).
        ValueError: no layers.
    """
    n = model.cfg.n_layers
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, numbers.Integral)]
    if bad:
        raise LayerOutOfRangeError(f"edit layers must be integers in 0..{n - 1}, got {bad[0]!r}")
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise ValueError("at least one edit layer is needed")
    for layer in layers:
        if not 0 <= layer < n:
            raise LayerOutOfRangeError(f"edit layer {layer} is out of range: the model has n_layers={n} (0..{n - 1})")
    return tuple(sorted(set(layers)))


# re-exported for convenience
EmptyTargetError = EmptyTargetError
SubjectNotFoundError = SubjectNotFoundError
