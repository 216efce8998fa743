"""The editing entry points: ``apply`` (permanent), ``edit`` (context manager, exact undo) and re-exports of
``restore`` / ``apply_deltas``.

    with edit(model, request, method="rome", layers=[6]) as result:
        ...   # model edited
    # weights bit-identical to before (also when the body raises)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from transformer_lens import HookedTransformer

from locedit.editors.deltas import EditResult, apply_deltas, load_snapshot, restore, snapshot, weights_hash
from locedit.editors.hparams import HyperParams
from locedit.editors.methods import EditMethod, default_hparams, resolve_method
from locedit.editors.requests import EditRequest, validate_layers, validate_request
from locedit.tracer.corruption import GaussianNoise, as_gaussian_noise
from locedit.tracer.tokens import locate_subject
from locedit.editors.tokens import token_position

__all__ = ["apply", "edit", "restore", "apply_deltas", "edited_parameter_names"]

def edited_parameter_names(method: str, layers: Sequence[int]) -> list[str]:
    """The parameters ``method`` changes: ``blocks.{l}.mlp.W_out`` (+ ``b_out`` for FT)."""
    return resolve_method(method).parameter_names(layers)


def _resolve_hparams(model: HookedTransformer, entry: EditMethod, hparams: HyperParams | None) -> HyperParams:
    if hparams is None:
        return default_hparams(entry.name, model)
    if not isinstance(hparams, entry.hparams):
        raise TypeError(f"method {entry.name!r} needs {entry.hparams.__name__}, got {type(hparams).__name__}")
    return hparams


def apply(
    model: HookedTransformer,
    request: EditRequest,
    method: str,
    layers: Sequence[int],
    hparams: HyperParams | None = None,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
    *,
    covariance=None,
    fast: bool = True,
    token: str | int = "subject_last",
) -> EditResult:
    """Edit ``model`` in place (permanently) and return the :class:`EditResult` (exact float64 deltas).

    Args:
        method: an :data:`editors.methods.EDIT_METHODS` name — "rome" (exactly one layer), "memit" (the window,
            e.g. 5 layers), "ft-1"/"ft-5" (or "ft": constrained finetuning of the given layers).
        layers: layers whose MLP ``W_out`` (and ``b_out`` for FT) are edited.
        hparams: method's hyper-parameters (default: :func:`editors.methods.default_hparams` for the model).
        objective: "maximize" p(target) (inject/amplify/force) or "minimize" it (erase).
        noise: Fact Forcing — optimise on the noised-subject input; every prompt the editor builds gets
            ``noise.samples`` rows with the noise at its own subject tokens.
        covariance: optional callable ``(model, layer) -> C`` (default: cached WikiText key statistics).
        fast: cache the frozen lower layers and run only from the edit layer per step (default); False runs the
            whole model every step (reference path, for parity checks and benchmarks).
        token: ROME/MEMIT: the position of every prompt where k* is read and v* optimised — "subject_first",
            "subject_last" (default, the reference's rule), "after_subject", "prompt_last"
            (:data:`editors.tokens.EDIT_TOKENS`) or an int offset from the last subject token. Constrained finetuning
            has no key position (:meth:`EditMethod.edit_token` gives None): it descends the NLL through the whole
            prompt.

    Raises:
        ValueError: unknown method/objective/token rule; ROME with ≠ 1 layer. LayerOutOfRangeError,
        EmptyTargetError, SubjectNotFoundError: see :mod:`editors.requests`; TokenPositionError: ``token`` names a
        position outside a prompt (:func:`editors.tokens.token_position`).
    """
    entry = resolve_method(method)
    if objective not in ("maximize", "minimize"):
        raise ValueError(f"objective must be 'maximize' or 'minimize', got {objective!r}")
    layers = validate_layers(model, layers)
    validate_request(model, request)
    token = entry.edit_token(token)
    if token is not None:  # fail before editing
        token_position(locate_subject(model, request.text, request.subject), token, request.text)
    if entry.single_layer and len(layers) != 1:
        raise ValueError(f"{entry.label} edits exactly one layer, got {layers}")
    hp = _resolve_hparams(model, entry, hparams)
    if noise is not None:
        noise = as_gaussian_noise(noise, model, what="editing (Fact Forcing)")
    snap = snapshot(model, entry.parameter_names(layers))
    try:
        result = entry.execute(
            model, request, layers, hp, objective, noise, covariance=covariance, fast=fast, token=token
        )
        return dataclasses.replace(result, edited_hashes={n: weights_hash(model, n) for n in result.deltas})
    except BaseException:
        load_snapshot(model, snap)  # a failed edit leaves the model untouched
        raise


@contextmanager
def edit(
    model: HookedTransformer,
    request: EditRequest,
    method: str,
    layers: Sequence[int],
    hparams: HyperParams | None = None,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
    **kwargs,
) -> Iterator[EditResult]:
    """Context manager: the model is edited inside the block (``as result``: the :class:`EditResult`); on exit
    — normal or by exception — the edited parameters are restored bit-identically from a snapshot."""
    snap = snapshot(model, edited_parameter_names(method, validate_layers(model, layers)))
    try:
        yield apply(model, request, method, layers, hparams, objective, noise, **kwargs)
    finally:
        load_snapshot(model, snap)


def with_hparams(hp: HyperParams, **changes) -> HyperParams:
    """``dataclasses.replace`` shortcut, e.g. ``with_hparams(default_hparams("ft"), num_steps=50)``."""
    return dataclasses.replace(hp, **changes)
