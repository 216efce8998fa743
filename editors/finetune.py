"""Constrained finetuning (Zhu et al. 2020; ROME's FT baseline; Hase et al. FT-1 / FT-5).

Adam (lr) on ``W_out`` and ``b_out`` of the chosen layers; loss on the plain prompt
    maximize:  −(1/m) Σ_i log p(o_i | prompt, o_<i)     (mean per-token NLL)
    minimize:  exp(Σ_i log p(o_i | ...)) = p(o | prompt)   (exp(−Σ NLL))
(with noise: p is the mean over the noise rows). After every step each entry is clamped to
[W₀ − ε, W₀ + ε] (ε = norm_constraint) with bounds pre-rounded so that |W − W₀| ≤ ε holds exactly in float
arithmetic. A step is skipped (and the loop ends) once the loss < skip_loss.
Fast path: the residual stream entering the lowest edited block is cached once; each step runs only the blocks
from there on, and the unembedding only at the target positions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.editors.deltas import Convergence, EditResult, exact_delta, parameter, snapshot
from locedit.editors.hparams import FTHyperParams
from locedit.editors.inputs import build_batch, cache_acts, frozen_params, run_from, run_plain, scored_logits
from locedit.editors.requests import EditRequest
from locedit.editors.vstar import target_loss_terms
from locedit.tracer.corruption import GaussianNoise
from locedit.tracer.tokens import target_tokens

__all__ = ["linf_bounds", "execute_ft"]


@jaxtyped(typechecker=beartype)
def linf_bounds(w0: Float[Tensor, "..."], eps: float) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """(lo, hi) in w0's dtype with lo ≤ w0 ≤ hi, and both |hi − w0| ≤ ε and |lo − w0| ≤ ε, whether the difference
    is evaluated exactly or in w0's dtype (bounds rounded inward with nextafter where w0 ± ε rounded outward)."""
    out = []
    for sign in (-1.0, 1.0):
        b = w0 + sign * eps
        for _ in range(4):
            bad = ((b - w0).abs().double() > eps) | ((b.double() - w0.double()).abs() > eps)
            if not bad.any():
                break
            b = torch.where(bad, torch.nextafter(b, w0), b)
        out.append(b)
    return out[0], out[1]


def execute_ft(
    model: HookedTransformer,
    request: EditRequest,
    layers: Sequence[int],
    hp: FTHyperParams,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
    *,
    fast: bool = True,
) -> EditResult:
    """Finetune ``W_out``/``b_out`` of ``layers`` in place under the L∞ constraint; return exact deltas."""
    t0 = time.perf_counter()
    layers = sorted(layers)
    tgt = target_tokens(model, request.target).to(model.cfg.device)
    m = int(tgt.shape[0])
    batch = build_batch(model, [request.text], request.subject, [tgt], noise)
    names = [f"blocks.{layer}.mlp.{w}" for layer in layers for w in ("W_out", "b_out")]
    params = [parameter(model, n) for n in names]
    old = snapshot(model, names)
    bounds = [linf_bounds(o, hp.norm_constraint) for o in old.values()]
    start = layers[0]
    losses: list[float] = []
    with frozen_params(model, trainable=params):
        resid = cache_acts(model, batch, [f"blocks.{start}.hook_resid_pre"], stop_at_layer=start + 1)[
            f"blocks.{start}.hook_resid_pre"
        ] if fast else None
        opt = torch.optim.Adam(params, lr=hp.lr)
        for _ in range(hp.num_steps):
            final = run_from(model, resid, start) if fast else run_plain(model, batch)
            prompt_lp, _ = target_loss_terms(scored_logits(model, final, batch), batch, m)
            loss = (-prompt_lp / m).mean() if objective == "maximize" else prompt_lp.exp().mean()
            losses.append(loss.item())
            p_target = float(prompt_lp.detach().exp().mean())
            if losses[-1] < hp.skip_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, (lo, hi) in zip(params, bounds):
                    p.copy_(torch.maximum(torch.minimum(p, hi), lo))
        for p in params:  # leave no gradients behind on the model
            p.grad = None
        at_bound = sum(int(((p == lo) | (p == hi)).sum()) for p, (lo, hi) in zip(params, bounds))
    deltas = {n: exact_delta(parameter(model, n).detach(), old[n]) for n in names}
    return EditResult(
        method="ft", layers=tuple(layers), deltas=deltas, losses=tuple(losses),
        seconds=time.perf_counter() - t0, objective=objective,
        info={"steps": len(losses), "norm_constraint": hp.norm_constraint, "noise_samples": batch.reps},
        convergence=Convergence(final_loss=losses[-1], steps=len(losses), p_target=p_target,
                                bound_share=at_bound / sum(p.numel() for p in params)),
    )
