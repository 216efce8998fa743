"""Edit results: weight deltas with metadata, exact apply/undo, save/load.

Deltas are stored in float64 as the *exact* difference ``W_new − W_old`` of the float32 (or other) parameters, so
that ``(W_old + Δ).to(dtype) == W_new`` and ``(W_new − Δ).to(dtype) == W_old`` bit for bit (the difference of two
float32 numbers is exactly representable in float64; :func:`exact_delta` checks it). A float64 parameter's difference
is not always representable in float64 (an entry that moves across many binades, e.g. from 1e-9 to 1e-3 under
finetuning): :func:`weight_changes` then keeps the rounded float64 delta (the numeric ΔW, for norms and analyses) and
the XOR of the two bit patterns (``EditResult.bit_flips``), which :func:`restore` and :func:`apply_deltas` use for
that parameter, so undoing and re-applying stay bit-exact in float64 too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

__all__ = ["Convergence", "EditResult", "apply_deltas", "restore", "exact_delta", "weight_changes", "parameter",
           "snapshot", "load_snapshot"]


@dataclass(frozen=True)
class Convergence:
    """How an edit's optimisation ended, so that an under-converged edit is visible in the table it lands in.

    Attributes:
        final_loss: the loss at the last evaluation (ROME / MEMIT: the one the final vector belongs to; FT, as the
            reference loop: the last evaluation, after which one more step may have been taken).
        steps: loss evaluations (the optimiser stepped after all but the last).
        p_target: mean over the optimisation prompts of p(target | prompt) at the last evaluation (with noise: each
            prompt's mean over its noise rows) — what the optimisation pushed up (or, minimizing, down).
        delta_ratio: ROME / r-ROME / MEMIT: ‖δ‖ / ‖v_init‖ of the final vector (NaN for FT).
        clamped: ROME / r-ROME / MEMIT: 1.0 when ‖δ‖ ended at the clamp bound ``clamp_norm_factor · ‖v_init‖``,
            else 0.0 (NaN for FT).
        bound_share: FT: the share of edited entries at their L∞ bound at the end (NaN otherwise).
    """

    final_loss: float
    steps: int
    p_target: float
    delta_ratio: float = math.nan
    clamped: float = math.nan
    bound_share: float = math.nan


@dataclass(frozen=True)
class EditResult:
    """What an edit did.

    Attributes:
        method: "rome", "memit" or "ft".
        layers: edited layers.
        deltas: parameter name (e.g. ``"blocks.6.mlp.W_out"``) → float64 delta of the parameter's shape.
        losses: the loss at every optimisation step (v*/z steps for ROME/MEMIT, FT steps).
        seconds: wall time of the edit.
        objective: "maximize" or "minimize".
        info: method-specific tensors/values (ROME: k_star, u, v_star, v_init; MEMIT: z, z_init; FT: steps).
        convergence: how the optimisation ended (:class:`Convergence`; None for results saved before it existed).
        edited_hashes: parameter name → hash of its weights right after this edit (set by ``apply``); lets
            :func:`restore` refuse to undo an edit that is not the most recent one of those parameters.
        bit_flips: parameter name → ``bits(W_new) XOR bits(W_old)`` (an integer tensor of the parameter's width) for
            the parameters whose float64 delta does not reproduce their weights exactly (float64 weights only; see
            the module docstring); :func:`restore` / :func:`apply_deltas` use it for them.
    """

    method: str
    layers: tuple[int, ...]
    deltas: Mapping[str, Tensor]
    losses: tuple[float, ...]
    seconds: float
    objective: str = "maximize"
    info: Mapping[str, Any] = field(default_factory=dict)
    edited_hashes: Mapping[str, str] = field(default_factory=dict)
    convergence: Convergence | None = None
    bit_flips: Mapping[str, Tensor] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """``torch.save`` of the deltas and metadata."""
        torch.save(
            {
                "format": 1,
                "method": self.method,
                "layers": list(self.layers),
                "deltas": {k: v.detach().cpu() for k, v in self.deltas.items()},
                "losses": list(self.losses),
                "seconds": self.seconds,
                "objective": self.objective,
                "info": {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in self.info.items()},
                "edited_hashes": dict(self.edited_hashes),
                "convergence": None if self.convergence is None else dataclasses.asdict(self.convergence),
                "bit_flips": {k: v.detach().cpu() for k, v in self.bit_flips.items()},
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> "EditResult":
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(
            method=d["method"],
            layers=tuple(d["layers"]),
            deltas=dict(d["deltas"]),
            losses=tuple(d["losses"]),
            seconds=float(d["seconds"]),
            objective=d["objective"],
            info=dict(d["info"]),
            edited_hashes=dict(d.get("edited_hashes", {})),
            convergence=Convergence(**d["convergence"]) if d.get("convergence") else None,
            bit_flips=dict(d.get("bit_flips", {})),
        )


def parameter(model: HookedTransformer, name: str) -> torch.nn.Parameter:
    """The model parameter called ``name`` (``KeyError`` with the name when it does not exist)."""
    params = dict(model.named_parameters())
    if name not in params:
        raise KeyError(f"model has no parameter {name!r}")
    return params[name]


def exact_delta(new: Tensor, old: Tensor) -> Tensor:
    """``new − old`` in float64, checked to reproduce ``new`` from ``old`` and ``old`` from ``new`` exactly."""
    d = new.detach().double() - old.detach().double()
    if not torch.equal((old.double() + d).to(new.dtype), new) or not torch.equal((new.double() - d).to(old.dtype), old):
        raise ArithmeticError("the weight delta is not exactly representable in float64")
    return d


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def _bits(t: Tensor) -> Tensor:
    """The bit patterns of a float tensor, as the signed integer type of its width."""
    return t.detach().contiguous().view(_INT_OF[t.dtype])


def weight_changes(model: HookedTransformer,
                   old: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """What an edit did to the parameters named in ``old`` (their values before it; the model holds the new ones):
    ``(deltas, bit_flips)``. ``deltas``: float64 ``new − old`` per parameter (:func:`exact_delta` where that is exact);
    ``bit_flips``: for each parameter where it is not (float64 weights), ``bits(new) XOR bits(old)``, and the delta
    is the rounded float64 difference."""
    deltas, flips = {}, {}
    for name, before in old.items():
        after = parameter(model, name).detach()
        try:
            deltas[name] = exact_delta(after, before)
        except ArithmeticError:
            deltas[name] = after.double() - before.double()
            flips[name] = torch.bitwise_xor(_bits(after), _bits(before))
    return deltas, flips


@torch.no_grad()
def apply_deltas(model: HookedTransformer, deltas: Mapping[str, Tensor], sign: float = 1.0,
                 bit_flips: Mapping[str, Tensor] | None = None) -> None:
    """W ← (W + sign·Δ) for every named parameter, computed in float64 and cast back (exact for edit deltas); a
    parameter in ``bit_flips`` (``EditResult.bit_flips``) gets its bit pattern XOR-ed instead, which undoes or redoes
    that edit exactly whichever way ``sign`` points (the caller checks which weights the model holds)."""
    flips = bit_flips or {}
    for name, d in deltas.items():
        p = parameter(model, name)
        if name in flips:
            p.copy_(torch.bitwise_xor(_bits(p), flips[name].to(p.device)).view(p.dtype))
            continue
        p.copy_((p.double() + sign * d.to(p.device, torch.float64)).to(p.dtype))


class EditOrderError(ValueError):
    """``restore`` was given an edit whose weights the model no longer holds (restored twice, out of order, or the
    parameters changed since)."""


def weights_hash(model: HookedTransformer, name: str) -> str:
    """A content hash (blake2b) of one parameter's bytes."""
    import hashlib

    return hashlib.blake2b(parameter(model, name).detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def restore(model: HookedTransformer, result: EditResult) -> None:
    """Undo ``result``'s edit exactly.

    Raises:
        EditOrderError: the model does not hold the weights this edit left (it was already restored, a later edit of
            the same parameters is still applied, or they changed otherwise); nothing is changed then.
    """
    for name, expected in result.edited_hashes.items():
        if weights_hash(model, name) != expected:
            raise EditOrderError(
                f"cannot restore this {result.method} edit: {name} no longer holds the weights it left (restored "
                "already, or a later edit of it is still applied — restore the most recent edit first)"
            )
    apply_deltas(model, result.deltas, sign=-1.0, bit_flips=result.bit_flips)


def snapshot(model: HookedTransformer, names: list[str]) -> dict[str, Tensor]:
    """Clones of the named parameters (for a bit-exact restore with :func:`load_snapshot`)."""
    return {n: parameter(model, n).detach().clone() for n in names}


@torch.no_grad()
def load_snapshot(model: HookedTransformer, snap: Mapping[str, Tensor]) -> None:
    for n, v in snap.items():
        parameter(model, n).copy_(v)
