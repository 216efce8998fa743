"""MEMIT (Meng et al. 2023) for one fact over a window of layers.

1. z = z_init + δ at ``blocks.{L}.hook_resid_post`` (L = last window layer) at the last subject token, δ from
   :func:`editors.vstar.optimize_target` (z_init = the plain prompt's residual there).
2. For each window layer l_i (i = 0..n−1, in order), with the earlier layers already updated:
   k = ``blocks.{l_i}.mlp.hook_post`` at the last subject token, averaged *within* each context-template group
   first and then over the groups (:func:`mean_of_group_means`, as ``memit/compute_ks.py``): with MEMIT's
   templates ``[["{}"], [5 prefixed]]`` the plain prompt weighs 1/2 and each prefixed one 1/10 (a flat mean
   would give 1/6 each),
   r = (z − h_L) / (n − i) with h_L the plain prompt's current ``resid_post[L]``, and

       ΔW_out(l_i) = (λ C_l + k kᵀ)⁻¹ k ⊗ r        [d_mlp, d_model], solved in float64,

   λ = mom2_update_weight, C_l = E[k kᵀ]. (The reference's W [d_model, d_mlp] update r (adj_k)ᵀ, transposed for
   TransformerLens's k @ W_out.) Each update is applied before the next layer's k and h_L are computed; with
   ``fast`` the next pass starts from the previous edited layer's cached input (everything below it is unchanged),
   so a 5-layer window costs one forward to the top layer plus 4 partial ones, not 5 from the embedding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.editors.deltas import EditResult, parameter, snapshot, weight_changes
from locedit.editors.hparams import MEMITHyperParams
from locedit.editors.inputs import cache_acts, frozen_params, group_mean, target_batch
from locedit.editors.requests import EditRequest, UnsupportedArchitectureError
from locedit.editors.templates import template_group_sizes
from locedit.editors.targets import TargetMemo, target_key
from locedit.editors.vstar import TargetOpt, optimize_targets
from locedit.tracer.corruption import GaussianNoise
from locedit.tracer.lean import post_norm_blocks

__all__ = ["memit_update", "execute_memit", "mean_of_group_means"]


@jaxtyped(typechecker=beartype)
def memit_update(
    C: Float[Tensor, "d_mlp d_mlp"], k: Float[Tensor, " d_mlp"], r: Float[Tensor, " d_model"], lam: float
) -> Float[Tensor, "d_mlp d_model"]:
    """ΔW_out = (λC + kkᵀ)⁻¹k ⊗ r, solved in float64, returned in r's dtype."""
    k64 = k.double().to(C.device)
    A = lam * C.double() + torch.outer(k64, k64)
    adj = torch.linalg.solve(A, k64).to(r.device)
    return torch.outer(adj, r.double()).to(r.dtype)


@jaxtyped(typechecker=beartype)
def mean_of_group_means(x: Float[Tensor, "prompts d"], sizes: Sequence[int]) -> Float[Tensor, " d"]:
    """Mean over groups of the mean within each group; ``sizes`` are the consecutive group sizes of ``x``'s rows
    (``memit/compute_ks.py``'s averaging of keys over context-template types)."""
    if sum(sizes) != x.shape[0] or any(n < 1 for n in sizes):
        raise ValueError(f"group sizes {tuple(sizes)} do not partition {x.shape[0]} rows")
    return torch.stack([g.mean(0) for g in x.split(list(sizes))]).mean(0)


def execute_memit(
    model: HookedTransformer,
    request: EditRequest,
    layers: Sequence[int],
    hp: MEMITHyperParams,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
    *,
    covariance=None,
    fast: bool = True,
    token: str | int = "subject_last",
    targets: TargetMemo | None = None,
) -> EditResult:
    """Edit ``blocks.{l}.mlp.W_out`` for every l in ``layers`` in place; return exact deltas and info (z, z_init).

    ``targets``: a :class:`editors.targets.TargetMemo` that holds (or computes, with the rest of its group of z
    layers) the z optimisation at the window's last layer; None: computed here.

    Raises:
        UnsupportedArchitectureError: the blocks normalize the MLP output before adding it to the residual stream
            (Gemma 2/3's ``ln2_post``): MEMIT spreads a *residual-stream* change over the layers' ``W_out``
            linearly, which a norm after ``W_out`` breaks (ROME, which optimizes the MLP's own output, works there).
    """
    if post_norm_blocks(model.cfg):
        raise UnsupportedArchitectureError(
            f"MEMIT cannot edit {model.cfg.model_name}: its MLP outputs pass a norm (ln2_post) before the residual "
            "stream, so MEMIT's linear split of the residual target over layers does not hold; use rome, r-rome or ft"
        )
    t0 = time.perf_counter()
    if covariance is None:
        from locedit.editors.covariance import key_second_moments

        covs = key_second_moments(model, list(layers))
        covariance = lambda m, layer: covs[layer]  # noqa: E731
    layers = sorted(layers)
    L = layers[-1]
    batch, n_texts, tgt = target_batch(model, request, hp.context_lengths, noise, token)
    names = [f"blocks.{layer}.mlp.W_out" for layer in layers]
    old = snapshot(model, names)
    with frozen_params(model):

        def compute(z_layers: tuple[int, ...]) -> dict[int, TargetOpt]:
            opts = optimize_targets(
                model, batch, z_layers, int(tgt.shape[0]),
                steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
                clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor, objective=objective,
                early_stop_loss=hp.early_stop_loss, v_hook="hook_resid_post", fast=fast,
            )
            return dict(zip(z_layers, opts))

        if targets is None:
            opt = compute((L,))[L]
        else:  # z at L is shared by every window ending at L; the memo's group runs in one batch
            opt = targets.get(model, target_key("hook_resid_post", request, objective, noise, token, fast, hp), L,
                              compute)
        z = opt.v_init + opt.delta
        rows = torch.arange(batch.n_rows)
        t_keys = time.perf_counter()
        acts: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            wanted = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.mlp.hook_post", f"blocks.{L}.hook_resid_post"]
            # with fast, nothing below the previous edited layer changed: continue from its cached input (one shared
            # forward instead of a pass from the embedding per layer)
            prev = layers[i - 1] if fast and i > 0 else None
            resid = None if prev is None else acts[f"blocks.{prev}.hook_resid_pre"]
            acts = cache_acts(model, batch, wanted, stop_at_layer=L + 1, resid=resid, start=prev or 0)
            keys = acts[f"blocks.{layer}.mlp.hook_post"][rows, batch.lookup]
            per_prompt = torch.stack([group_mean(keys, batch, g) for g in range(n_texts)])
            k = mean_of_group_means(per_prompt, template_group_sizes(hp.context_lengths))
            h = group_mean(acts[f"blocks.{L}.hook_resid_post"][rows, batch.lookup], batch, 0)
            r = (z - h) / (len(layers) - i)
            dW = memit_update(covariance(model, layer), k, r, hp.mom2_update_weight)
            with torch.no_grad():
                parameter(model, f"blocks.{layer}.mlp.W_out").add_(dW)
        t_keys = time.perf_counter() - t_keys
    deltas, flips = weight_changes(model, {n: old[n] for n in names})
    return EditResult(
        method="memit", layers=tuple(layers), deltas=deltas, bit_flips=flips, losses=opt.losses,
        seconds=time.perf_counter() - t0, objective=objective,
        info={"z": z.cpu(), "z_init": opt.v_init.cpu(), "n_templates": n_texts, "noise_samples": batch.reps,
              "token": token,
              "update_seconds": t_keys},
        convergence=opt.convergence(),
    )
