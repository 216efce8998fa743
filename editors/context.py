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

import torch
from transformer_lens import HookedTransformer

from locedit.editors.deltas import EditOrderError, EditResult, apply_deltas, load_snapshot, restore, snapshot, weights_hash
from locedit.editors.hparams import HyperParams
from locedit.editors.methods import EditMethod, default_hparams, resolve_method
from locedit.editors.requests import EditRequest, validate_layers, validate_request
from locedit.tracer.corruption import GaussianNoise, as_gaussian_noise
from locedit.tracer.tokens import locate_subject, warn_unspaced_target
from locedit.editors.tokens import token_position

__all__ = ["UnsupportedDtypeError", "apply", "edit", "restore", "apply_deltas", "edited_parameter_names"]

def edited_parameter_names(method: str, layers: Sequence[int]) -> list[str]:
    """The parameters ``method`` changes: ``blocks.{l}.mlp.W_out`` (+ ``b_out`` for FT)."""
    return resolve_method(method).parameter_names(layers)


class UnsupportedDtypeError(TypeError):
    """The model's weights are in a dtype the editors cannot optimise and solve in (half precision)."""


_EDIT_DTYPES = (torch.float32, torch.float64)


def _check_mode(model: HookedTransformer) -> None:
    """Fail before any work on what would fail late or silently: half-precision weights, inference mode."""
    dtype = model.cfg.dtype
    if dtype not in _EDIT_DTYPES:
        raise UnsupportedDtypeError(
            f"the model's weights are {dtype}: the editors optimise v*/z and solve their updates in float32/float64, "
            "and a half-precision W_out cannot hold the update exactly (it would be lost to rounding or NaN); load the "
            "model in float32 (load_model(name, dtype=torch.float32)) to edit it")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("editing needs gradients: call edit()/apply() outside torch.inference_mode() "
                           "(torch.no_grad() is fine: the editors turn gradients on for their own optimisation)")


def _edit_stack(model: HookedTransformer) -> list:
    """The model's active ``edit()`` contexts, innermost last (kept on the model itself: no global state)."""
    stack = getattr(model, "_locedit_edit_stack", None)
    if stack is None:
        stack = []
        model._locedit_edit_stack = stack
    return stack


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
    targets=None,
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
        targets: an :class:`editors.targets.TargetMemo` shared by edits of the same request
            on the same unedited model (a study's edits of one fact): the v*/z optimisation is taken from it or
            computed there together with its layer group (FT: the finetuning, with the memo group's other layer
            sets, :func:`editors.finetune.optimize_ft`). None (default): computed for this edit.

    Raises:
        ValueError: unknown method/objective/token rule; ROME with ≠ 1 layer. LayerOutOfRangeError,
        EmptyTargetError, SubjectNotFoundError: see :mod:`editors.requests`; TokenPositionError: ``token`` names a
        position outside a prompt (:func:`editors.tokens.token_position`).
    """
    entry = resolve_method(method)
    _check_mode(model)
    warn_unspaced_target(getattr(request, "target", None))
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
        with torch.enable_grad():  # a caller inside torch.no_grad() still gets its edit
            result = entry.execute(
                model, request, layers, hp, objective, noise, covariance=covariance, fast=fast, token=token,
                targets=targets,
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
    — normal or by exception — the edited parameters are restored bit-identically from a snapshot.

    Nested contexts must exit last-in-first-out (as ``with`` blocks do). One that exits while a later one is still
    active raises :class:`EditOrderError` and restores nothing: its snapshot predates the later edit, and loading it
    would silently undo that edit too. The weights are left as the later edit expects; exit it first, then undo
    this one with ``editors.restore(model, result)``."""
    snap = snapshot(model, edited_parameter_names(method, validate_layers(model, layers)))
    stack, me = _edit_stack(model), object()
    stack.append(me)
    try:
        yield apply(model, request, method, layers, hparams, objective, noise, **kwargs)
    finally:
        if stack and stack[-1] is me:
            stack.pop()
            load_snapshot(model, snap)
        else:
            stack.remove(me)
            raise EditOrderError(
                f"edit contexts must exit last-in-first-out: this {method} edit exited while a later edit is still "
                "active, so nothing was restored (the weights are as the later edit expects); exit the later edit "
                "first, then undo this one with editors.restore(model, result)")


def with_hparams(hp: HyperParams, **changes) -> HyperParams:
    """``dataclasses.replace`` shortcut, e.g. ``with_hparams(default_hparams("ft"), num_steps=50)``."""
    return dataclasses.replace(hp, **changes)
