"""Hyper-parameters of the editors (frozen dataclasses) and their per-model defaults.

Defaults are the reference values (Meng et al. 2022/2023 code as used by Hase et al. 2023, GPT-J);
:func:`editors.methods.default_hparams` applies the model profile's overrides (:mod:`tracer.profiles`), and
``problems.problem_hparams`` adds the problem's App. A overrides from the same profile. This module imports nothing
of locedit's (the method registry imports it, not the other way round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["ROMEHyperParams", "MEMITHyperParams", "FTHyperParams", "HyperParams", "InvalidHyperParamsError"]


class InvalidHyperParamsError(ValueError):
    """A hyper-parameter value of the right type but out of range (a step count < 1, a learning rate <= 0, ...)."""


# per field name: (test, what it must be); fields not listed have no range beyond their type
_RANGES = {
    "v_num_grad_steps": (lambda v: v >= 1, "an int >= 1"),
    "num_steps": (lambda v: v >= 1, "an int >= 1"),
    "v_lr": (lambda v: v > 0, "> 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "clamp_norm_factor": (lambda v: v > 0, "> 0"),
    "norm_constraint": (lambda v: v > 0, "> 0"),
    "mom2_update_weight": (lambda v: v > 0, "> 0"),
    "v_weight_decay": (lambda v: v >= 0, ">= 0"),
    "kl_factor": (lambda v: v >= 0, ">= 0"),
    "early_stop_loss": (lambda v: v >= 0, ">= 0"),
    "skip_loss": (lambda v: v >= 0, ">= 0"),
    "context_lengths": (lambda v: all(len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                              for x in p) for p in v),
                        "pairs (n_tokens >= 1, n_templates >= 1)"),
}


def _check_ranges(hp) -> None:
    """Every field of ``hp`` within its range (and numbers finite); :class:`InvalidHyperParamsError` naming all."""
    bad = []
    for f in fields(hp):
        v = getattr(hp, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(f"{f.name} = {v!r} must be finite")
            continue
        rule = _RANGES.get(f.name)
        try:
            ok = rule is None or rule[0](v)
        except TypeError:
            ok = False
        if not ok:
            bad.append(f"{f.name} = {v!r} must be {rule[1]}")
    if bad:
        raise InvalidHyperParamsError(f"{type(hp).__name__}: " + "; ".join(bad))



@dataclass(frozen=True)
class ROMEHyperParams:
    """ROME (Meng et al. 2022), reference values for GPT-J.

    Attributes:
        v_num_grad_steps: Adam iterations for v* (20; Fact Forcing 25). As in the reference loop, the loss is
            evaluated ``v_num_grad_steps`` times and the last evaluation takes no step.
        v_lr: Adam learning rate for δ (0.5; Fact Forcing 0.05 per the paper code).
        v_weight_decay: weight of ‖δ‖ / ‖v_init‖² (the reference code's form: norm, not squared norm).
        clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖ after every step (4).
        kl_factor: weight of KL(p_δ ‖ p_0) on the "{subject} is a" next-token distribution (0.0625; the paper
            tuned 1 for Error Injection).
        mom2_adjustment: u = C⁻¹k* (True) instead of u = k*.
        context_lengths: ((n_tokens, n_templates), ...) of generated context prefixes; ((5, 10), (10, 10)) gives
            the reference's 21 templates with "{}".
        early_stop_loss: stop maximizing when the total loss < this (5e-2; not used when minimizing).
    """

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    early_stop_loss: float = 5e-2

    def __post_init__(self) -> None:
        _check_ranges(self)


@dataclass(frozen=True)
class MEMITHyperParams:
    """MEMIT (Meng et al. 2023) for one fact, reference values for GPT-J.

    Attributes:
        v_num_grad_steps: Adam iterations for z (25).
        v_lr: Adam learning rate (0.5).
        v_weight_decay: weight of ‖δ‖ / ‖z_init‖² (0.5).
        clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor · ‖z_init‖ (0.75).
        kl_factor: KL weight (0.0625; the paper tuned 0.9 for Error Injection).
        mom2_update_weight: λ in ΔW = (λC + kkᵀ)⁻¹k ⊗ r (15000 for GPT-J).
        context_lengths: ((10, 5),): "{}" plus 5 prefixes of 10 tokens (one per start word), as in MEMIT.
        early_stop_loss: as ROME.
    """

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_update_weight: float = 15000.0
    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    early_stop_loss: float = 5e-2

    def __post_init__(self) -> None:
        _check_ranges(self)


@dataclass(frozen=True)
class FTHyperParams:
    """Constrained finetuning of ``W_out`` and ``b_out`` (Zhu et al. 2020 as in ROME's FT baseline).

    Attributes:
        lr: Adam learning rate (5e-4).
        num_steps: gradient steps (25; Fact Forcing 50).
        norm_constraint: L∞ bound: after every step each entry is clamped to original ± norm_constraint.
            Paper (GPT-J): EI FT-1 1e-4 / FT-5 2e-5; TR 1e-5 / 2e-5; FE, FA 1e-5; FF 1e-4.
        skip_loss: no step is taken (and the loop ends) once the loss < skip_loss (1e-2).
    """

    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float = 1e-4
    skip_loss: float = 1e-2

    def __post_init__(self) -> None:
        _check_ranges(self)


HyperParams = ROMEHyperParams | MEMITHyperParams | FTHyperParams
