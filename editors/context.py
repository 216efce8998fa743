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

from editors.deltas import EditResult, apply_deltas, load_snapshot, restore, snapshot
from editors.finetune import execute_ft
from editors.hparams import FTHyperParams, HyperParams, MEMITHyperParams, ROMEHyperParams, default_hparams
from editors.memit import execute_memit
from editors.requests import EditRequest, validate_layers, validate_method, validate_request
from editors.rome import execute_rome
from tracer.noise import SubjectNoise

__all__ = ["apply", "edit", "restore", "apply_deltas", "edited_parameter_names"]

_HP_TYPES = {"rome": ROMEHyperParams, "memit": MEMITHyperParams, "ft": FTHyperParams}


def edited_parameter_names(method: str, layers: Sequence[int]) -> list[str]:
    """The parameters ``method`` changes: ``blocks.{l}.mlp.W_out`` (+ ``b_out`` for FT)."""
    ws = ("W_out", "b_out") if validate_method(method) == "ft" else ("W_out",)
    return [f"blocks.{layer}.mlp.{w}" for layer in layers for w in ws]


def _resolve_hparams(model: HookedTransformer, method: str, hparams: HyperParams | None) -> HyperParams:
    if hparams is None:
        try:
            return default_hparams(method, model.cfg.model_name)
        except ValueError:
            return _HP_TYPES[method]()  # unknown model: the reference (GPT-J) values
    if not isinstance(hparams, _HP_TYPES[method]):
        raise TypeError(f"method {method!r} needs {_HP_TYPES[method].__name__}, got {type(hparams).__name__}")
    return hparams


def apply(
    model: HookedTransformer,
    request: EditRequest,
    method: str,
    layers: Sequence[int],
    hparams: HyperParams | None = None,
    objective: str = "maximize",
    noise: SubjectNoise | None = None,
    *,
    covariance=None,
    fast: bool = True,
) -> EditResult:
    """Edit ``model`` in place (permanently) and return the :class:`EditResult` (exact float64 deltas).

    Args:
        method: "rome" (exactly one layer), "memit" (the window, e.g. 5 layers), "ft" (FT-1: one layer; FT-5: five).
        layers: layers whose MLP ``W_out`` (and ``b_out`` for FT) are edited.
        hparams: method's hyper-parameters (default: :func:`editors.hparams.default_hparams` for the model).
        objective: "maximize" p(target) (inject/amplify/force) or "minimize" it (erase).
        noise: Fact Forcing — optimise on the noised-subject input; every prompt the editor builds gets
            ``noise.samples`` rows with the noise at its own subject tokens.
        covariance: optional callable ``(model, layer) -> C`` (default: cached WikiText key statistics).
        fast: cache the frozen lower layers and run only from the edit layer per step (default); False runs the
            whole model every step (reference path, for parity checks and benchmarks).

    Raises:
        ValueError: unknown method/objective; ROME with ≠ 1 layer. LayerOutOfRangeError, EmptyTargetError,
        SubjectNotFoundError: see :mod:`editors.requests`.
    """
    method = validate_method(method)
    if objective not in ("maximize", "minimize"):
        raise ValueError(f"objective must be 'maximize' or 'minimize', got {objective!r}")
    layers = validate_layers(model, layers)
    validate_request(model, request)
    if method == "rome" and len(layers) != 1:
        raise ValueError(f"ROME edits exactly one layer, got {layers}")
    hp = _resolve_hparams(model, method, hparams)
    if noise is not None and not isinstance(noise, SubjectNoise):
        raise TypeError(f"noise must be a tracer.noise.SubjectNoise, got {type(noise).__name__}")
    names = edited_parameter_names(method, layers)
    snap = snapshot(model, names)
    try:
        if method == "rome":
            return execute_rome(model, request, layers[0], hp, objective, noise, covariance=covariance, fast=fast)
        if method == "memit":
            return execute_memit(model, request, layers, hp, objective, noise, covariance=covariance, fast=fast)
        return execute_ft(model, request, layers, hp, objective, noise, fast=fast)
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
    noise: SubjectNoise | None = None,
    **kwargs,
) -> Iterator[EditResult]:
    """Context manager: the model is edited inside the block (``as result``: the :class:`EditResult`); on exit
    — normal or by exception — the edited parameters are restored bit-identically from a snapshot."""
    names = edited_parameter_names(validate_method(method), validate_layers(model, layers))
    snap = snapshot(model, names)
    try:
        yield apply(model, request, method, layers, hparams, objective, noise, **kwargs)
    finally:
        load_snapshot(model, snap)


def with_hparams(hp: HyperParams, **changes) -> HyperParams:
    """``dataclasses.replace`` shortcut, e.g. ``with_hparams(default_hparams("ft"), num_steps=50)``."""
    return dataclasses.replace(hp, **changes)
