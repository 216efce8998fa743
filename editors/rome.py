"""ROME (Meng et al. 2022): a rank-one update of one layer's MLP output matrix.

TransformerLens applies ``W_out`` [d_mlp, d_model] as ``mlp_out = k @ W_out + b_out`` (k = ``hook_post``). With
k* = mean over context-template prompts of k at the last subject token, C = E[k kᵀ] (key second moment), and
v* = v_init + δ from :func:`editors.vstar.optimize_target` (v_init = MLP output at the plain prompt):

    u = C⁻¹k* / ‖C⁻¹k*‖                     (u = k*/‖k*‖ without mom2_adjustment)
    ΔW_out = u ⊗ (v* − W_outᵀk − b_out) / (k·u)  = u ⊗ δ / (k·u)         [d_mlp, d_model]

where k is the plain prompt's key, so that the edited layer maps k to exactly v*:
k @ (W_out + ΔW_out) + b_out = k @ W_out + b_out + (k·u) δ/(k·u) = v*.

**r-ROME** (Gupta et al. 2024, "Rebuilding ROME"; EasyEdit's ``r_rome`` with ``enable_random_prefix_keys``): ROME
takes u from the template-mean key k* but solves the update for the plain prompt's key k, an inconsistency that
produces the "disabling" edits (huge update norms, model collapse). r-ROME uses k* on both sides:

    ΔW_out = u ⊗ (v* − v̄) / (k*·u),     v̄ = mean over templates of the MLP output = k* @ W_out + b_out,

so that the edited layer maps k* to exactly v* (v* = v_init + δ as in ROME; v_init at the plain prompt).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, jaxtyped
from beartype import beartype
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.editors.deltas import EditResult, parameter, weight_changes
from locedit.editors.hparams import ROMEHyperParams
from locedit.editors.inputs import cache_acts, frozen_params, group_mean, target_batch
from locedit.editors.requests import EditRequest
from locedit.editors.targets import TargetMemo, target_key
from locedit.editors.vstar import TargetOpt, mlp_values, optimize_targets, target_cache_names
from locedit.tracer.corruption import GaussianNoise

__all__ = ["RomeTarget", "execute_rome", "rome_targets", "rome_update"]


@jaxtyped(typechecker=beartype)
def rome_update(
    C: Float[Tensor, "d_mlp d_mlp"],
    k_star: Float[Tensor, " d_mlp"],
    k: Float[Tensor, " d_mlp"],
    delta: Float[Tensor, " d_model"],
    mom2_adjustment: bool = True,
) -> tuple[Float[Tensor, "d_mlp d_model"], Float[Tensor, " d_mlp"]]:
    """ΔW_out = u ⊗ δ/(k·u) with u = C⁻¹k*/‖C⁻¹k*‖ (solved in float64); returns (ΔW_out, u) in δ's dtype.

    ``k`` is the key the edited layer must map to v* and ``delta`` = v* minus that key's current output: for ROME
    the plain prompt's key and δ, for r-ROME k* and v* − v̄ (module docstring)."""
    if mom2_adjustment:
        u = torch.linalg.solve(C.double(), k_star.double().to(C.device))
    else:
        u = k_star.double()
    u = (u / u.norm()).to(delta.device)
    right = delta.double() / (k.double().to(u.device) @ u)
    return torch.outer(u, right).to(delta.dtype), u.to(delta.dtype)


@dataclass(frozen=True)
class RomeTarget:
    """What a ROME / r-ROME edit at one layer reads from the unedited model (:func:`rome_targets`).

    Attributes:
        k_star: [d_mlp] mean over context-template prompts of the key at the edit position.
        k: [d_mlp] the plain prompt's key (mean over its noise rows).
        v_bar: [d_model] mean over templates of the MLP output there (r-ROME's v̄).
        opt: the v* optimisation (v* = ``opt.v_init + opt.delta``).
        n_templates, noise_samples: the batch's prompts and rows per prompt.
    """

    k_star: Tensor
    k: Tensor
    v_bar: Tensor
    opt: TargetOpt
    n_templates: int
    noise_samples: int


def rome_targets(
    model: HookedTransformer,
    request: EditRequest,
    layers: Sequence[int],
    hp: ROMEHyperParams,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
    *,
    fast: bool = True,
    token: str | int = "subject_last",
) -> dict[int, RomeTarget]:
    """k*, k, v̄ and v* of ``request`` at each of ``layers`` on the unedited model: one pass over the batch for all
    layers, the v* optimisations in lockstep (:func:`editors.vstar.optimize_targets`); for one layer exactly what
    :func:`execute_rome` computes itself."""
    layers = tuple(layers)
    batch, n_texts, tgt = target_batch(model, request, hp.context_lengths, noise, token)
    with frozen_params(model):
        names = sorted({n for layer in layers for n in
                        [f"blocks.{layer}.mlp.hook_post"] + target_cache_names(model, layer, "hook_mlp_out", fast)})
        acts = cache_acts(model, batch, names)  # the only pass over the unedited batch
        opts = optimize_targets(
            model, batch, layers, int(tgt.shape[0]),
            steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
            clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor, objective=objective,
            early_stop_loss=hp.early_stop_loss, v_hook="hook_mlp_out", fast=fast, acts=acts,
        )
    rw = batch.group < n_texts
    out = {}
    for layer, opt in zip(layers, opts):
        keys = acts[f"blocks.{layer}.mlp.hook_post"][torch.arange(batch.n_rows), batch.lookup]
        out[layer] = RomeTarget(
            k_star=keys[rw].mean(0),  # mean over templates (equal noise rows per template)
            k=group_mean(keys, batch, 0), v_bar=mlp_values(model, acts, layer, batch)[rw].mean(0).detach(), opt=opt,
            n_templates=n_texts, noise_samples=batch.reps,
        )
    return out


def execute_rome(
    model: HookedTransformer,
    request: EditRequest,
    layer: int,
    hp: ROMEHyperParams,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
    *,
    covariance=None,
    fast: bool = True,
    token: str | int = "subject_last",
    consistent_keys: bool = False,
    targets: TargetMemo | None = None,
) -> EditResult:
    """Edit ``blocks.{layer}.mlp.W_out`` in place; return the exact delta and info (k_star, k, u, v_init, v_star).

    ``covariance``: callable ``layer -> C`` (default :func:`editors.covariance.key_second_moment`).
    ``consistent_keys``: r-ROME — solve the update for k* and v* − v̄ instead of k and δ (module docstring).
    ``token``: where keys are read and v* optimised in every prompt (:data:`editors.tokens.EDIT_TOKENS` or an int
    offset from the last subject token; default the last subject token, the reference's ``fact_token``).
    ``targets``: a :class:`editors.targets.TargetMemo` that holds (or computes, with the rest of its layer group)
    this edit's :class:`RomeTarget`; ROME and r-ROME edits of the same request share it. None: computed here.
    """
    t0 = time.perf_counter()
    if covariance is None:
        from locedit.editors.covariance import key_second_moment as covariance

    def compute(layers: tuple[int, ...]) -> dict[int, RomeTarget]:
        return rome_targets(model, request, layers, hp, objective, noise, fast=fast, token=token)

    if targets is None:
        tg = compute((layer,))[layer]
    else:
        key = target_key("hook_mlp_out", request, objective, noise, token, fast, hp)
        tg = targets.get(model, key, layer, compute)
    opt = tg.opt
    C = covariance(model, layer) if hp.mom2_adjustment else torch.eye(model.cfg.d_mlp, dtype=torch.float64)
    if consistent_keys:  # r-ROME: map the template-mean key k* to v*
        dW, u = rome_update(C.to(tg.k_star.device), tg.k_star, tg.k_star, opt.v_init + opt.delta - tg.v_bar,
                            hp.mom2_adjustment)
    else:
        dW, u = rome_update(C.to(tg.k_star.device), tg.k_star, tg.k, opt.delta, hp.mom2_adjustment)
    name = f"blocks.{layer}.mlp.W_out"
    W = parameter(model, name)
    with torch.no_grad():
        old = W.detach().clone()
        W.add_(dW.to(W.dtype))
        deltas, flips = weight_changes(model, {name: old})
    return EditResult(
        method="r-rome" if consistent_keys else "rome", layers=(layer,), deltas=deltas, bit_flips=flips,
        losses=opt.losses,
        seconds=time.perf_counter() - t0, objective=objective,
        info={"k_star": tg.k_star.cpu(), "k": tg.k.cpu(), "u": u.cpu(), "v_init": opt.v_init.cpu(),
              "v_star": (opt.v_init + opt.delta).cpu(), "n_templates": tg.n_templates,
              "noise_samples": tg.noise_samples, "token": token},
        convergence=opt.convergence(),
    )
