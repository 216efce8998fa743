"""The target-vector optimisation shared by ROME (v* at ``hook_mlp_out`` of the edit layer) and MEMIT (z at
``hook_resid_post`` of the window's last layer).

A vector δ is added at the last subject token of every prompt (context-template prompts and the KL prompt
"{subject} is a") to the residual stream after layer ``layer`` — for ROME that is the same as adding δ to the
MLP output of that layer (in post-norm blocks, Gemma's, δ is added to the MLP output *before* its post-norm:
see :func:`tracer.lean.mlp_post_norm`). δ minimizes (Meng et al. 2022, compute_v)

    L(δ) = NLL(δ) + kl_factor · KL(p_δ ‖ p_0)["{s} is a"] + wd · ‖δ‖ / ‖v_init‖²,

where the KL term compares next-token distributions read at the *last subject token* of "{s} is a" (as the
reference's ``compute_v``/``compute_z`` do: the logits at the KL prompt's lookup index), and
    NLL(δ) = mean_prompts  −(1/m) log p_δ(o | prompt)            (objective="maximize")
    main(δ) = NLL(δ)  (maximize)  or  exp(−NLL(δ))  (minimize: Fact Erasure)

exp(−mean NLL) is the geometric mean over prompts of the per-token probability — the paper's own code (its ROME/MEMIT
copies in google/belief-localization take ``torch.exp(-nll_loss)`` of the prompt-averaged NLL). The paper's text only
says "minimize p(o_true | s, r)"; we reproduce the code (an earlier locedit used the arithmetic mean of exp(−NLL_i)).

with Adam, and after each step ‖δ‖ is clamped to ``clamp_norm_factor · ‖v_init‖``. With noise, p(o | prompt) is the
mean over the prompt's noise rows and the KL is averaged over the KL prompt's noise rows (batchmean).
As in the reference, the loss is evaluated ``steps`` times and the last evaluation takes no step; maximizing stops
early once L < early_stop_loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.editors.deltas import Convergence
from locedit.editors.inputs import (
    EditBatch,
    cache_acts,
    group_mean,
    plan_suffix,
    run_plain,
    scored_logits,
    suffix_cache_names,
    suffix_scored_logits,
)
from locedit.tracer.lean import mlp_post_norm

__all__ = [
    "TargetOpt",
    "main_objective",
    "mlp_values",
    "optimize_target",
    "optimize_targets",
    "target_cache_names",
    "target_loss_terms",
]


def mlp_values(model: HookedTransformer, acts: dict[str, Tensor], layer: int, batch: EditBatch) -> Float[Tensor, "rows d_model"]:
    """Each row's MLP output v = k @ W_out + b_out at its lookup position, *before* any post-MLP norm: read from
    ``hook_mlp_out`` where that is the MLP's output, recomputed from the cached keys (``mlp.hook_post``) where a
    post-norm follows."""
    rows = torch.arange(batch.n_rows, device=batch.lookup.device)
    if mlp_post_norm(model, layer) is None:
        return acts[f"blocks.{layer}.hook_mlp_out"][rows, batch.lookup]
    mlp = model.blocks[layer].mlp
    return acts[f"blocks.{layer}.mlp.hook_post"][rows, batch.lookup] @ mlp.W_out + mlp.b_out


@dataclass(frozen=True)
class TargetOpt:
    """Result: ``delta`` [d_model], ``v_init`` [d_model] (value at the plain prompt), per-step losses; at the last
    evaluation, ``p_target`` (mean over the rewrite prompts of p(target), each the mean over its noise rows) and
    ``clamped`` (‖δ‖ at the clamp bound)."""

    delta: Tensor
    v_init: Tensor
    losses: tuple[float, ...]
    p_target: float = math.nan
    clamped: bool = False

    def convergence(self) -> Convergence:
        """The :class:`editors.deltas.Convergence` record of this optimisation."""
        return Convergence(final_loss=self.losses[-1], steps=len(self.losses), p_target=self.p_target,
                           delta_ratio=float(self.delta.norm() / self.v_init.norm()), clamped=float(self.clamped))


def target_loss_terms(
    logits: Float[Tensor, "n d_vocab"], batch: EditBatch, n_target: int
) -> tuple[Float[Tensor, "prompts"], Float[Tensor, "kl_rows d_vocab"]]:
    """Per-prompt log p(o | prompt) (log of the mean over noise rows) and the KL rows' next-token log-probs."""
    logp = logits.log_softmax(-1)
    rw = batch.score_targets >= 0
    lp_tok = logp[rw].gather(1, batch.score_targets[rw][:, None])[:, 0]
    seq = lp_tok.view(-1, n_target).sum(1)  # [rewrite rows]
    prompt_lp = torch.logsumexp(seq.view(-1, batch.reps), 1) - math.log(batch.reps)
    return prompt_lp, logp[~rw]


def main_objective(nll_each: Float[Tensor, " prompts"], objective: str) -> Float[Tensor, ""]:
    """The target term of L(δ): mean NLL over prompts (maximize) or exp(−mean NLL) (minimize; see module doc)."""
    if objective == "maximize":
        return nll_each.mean()
    if objective == "minimize":
        return torch.exp(-nll_each.mean())
    raise ValueError(f"objective must be 'maximize' or 'minimize', got {objective!r}")


def target_cache_names(model: HookedTransformer, layer: int, v_hook: str = "hook_mlp_out", fast: bool = True) -> list[str]:
    """Activations :func:`optimize_target` reads from the unedited batch (one forward pass provides them all)."""
    names = {f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.{v_hook}"}
    if v_hook == "hook_mlp_out" and mlp_post_norm(model, layer) is not None:
        names.add(f"blocks.{layer}.mlp.hook_post")  # the MLP's pre-norm output is recomputed from its keys
    if fast:
        names |= set(suffix_cache_names(model, layer + 1))
    return sorted(names)


def optimize_target(
    model: HookedTransformer,
    batch: EditBatch,
    layer: int,
    n_target: int,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    clamp_norm_factor: float,
    kl_factor: float,
    objective: str = "maximize",
    early_stop_loss: float = 5e-2,
    v_hook: str = "hook_mlp_out",
    fast: bool = True,
    acts: dict[str, Tensor] | None = None,
) -> TargetOpt:
    """Optimise δ added to ``blocks.{layer}.hook_resid_post`` at every row's last subject token (see module doc).

    ``v_init`` is ``blocks.{layer}.{v_hook}`` at the last subject token of prompt 0 (the plain prompt; mean over
    its noise rows): ROME ``hook_mlp_out`` (v* = v_init + δ), MEMIT ``hook_resid_post`` (z = z_init + δ).

    ``acts``: activations of the unedited batch already computed by the caller (one pass; see
    :func:`target_cache_names`); missing ones are computed here.

    ``fast``: cache ``resid_post[layer]`` and the keys/values above it once, and per step run only blocks
    ``layer+1..`` on the positions from each row's last subject token on (:func:`editors.inputs.plan_suffix`);
    else the whole model
    each step with δ added by a hook at ``blocks.{layer}.hook_mlp_out`` (plain reference path; identical maths,
    summation order differs by float rounding). :func:`optimize_targets` runs several layers' optimisations as one
    batch.
    """
    return optimize_targets(
        model, batch, (layer,), n_target, steps=steps, lr=lr, weight_decay=weight_decay,
        clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor, objective=objective,
        early_stop_loss=early_stop_loss, v_hook=v_hook, fast=fast, acts=acts,
    )[0]


def optimize_targets(
    model: HookedTransformer,
    batch: EditBatch,
    layers: Sequence[int],
    n_target: int,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    clamp_norm_factor: float,
    kl_factor: float,
    objective: str = "maximize",
    early_stop_loss: float = 5e-2,
    v_hook: str = "hook_mlp_out",
    fast: bool = True,
    acts: dict[str, Tensor] | None = None,
) -> tuple[TargetOpt, ...]:
    """:func:`optimize_target` for several edit layers of the same batch at once, in lockstep: one result per
    entry of ``layers`` (distinct), each equal to the one-layer optimisation up to float summation order.

    The independent optimisations advance together as one growing batch: at block ``j`` the rows of every layer
    ``l < j`` run together (a layer's rows join above their own layer, with the frozen prefix keys/values of the
    unedited batch shared by all), and the last block and the unembedding run once for all. Each layer has its own
    δ (one row of a ``[layers, d_model]`` tensor; Adam is elementwise, so a row's trajectory is its own), its own
    v_init, KL reference, clamp bound and early stop (a layer that stops leaves the batch; its δ is the one its
    last evaluated loss belongs to). The total loss is the sum of the layers' losses, whose gradients are
    disjoint. On a CPU the batch saves the per-operation overhead of small matmuls; on a GPU it is what fills the
    device. ``fast=False`` (the plain reference path) runs the layers one after another.

    ``acts``: as :func:`optimize_target`, for every layer (:func:`target_cache_names` of each).

    Raises:
        ValueError: repeated or no layers.
    """
    layers = tuple(int(x) for x in layers)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct and non-empty, got {layers}")
    kw = dict(steps=steps, lr=lr, weight_decay=weight_decay, clamp_norm_factor=clamp_norm_factor,
              kl_factor=kl_factor, objective=objective, early_stop_loss=early_stop_loss, v_hook=v_hook)
    if not fast and len(layers) > 1:  # the plain path stays one layer at a time
        return tuple(optimize_targets(model, batch, (x,), n_target, fast=False, acts=acts, **kw)[0] for x in layers)
    needed = sorted({n for x in layers for n in target_cache_names(model, x, v_hook, fast)})
    if acts is None or not all(n in acts for n in needed):
        acts = cache_acts(model, batch, needed)  # one pass for everything below
    L = model.cfg.n_layers
    rows = torch.arange(batch.n_rows, device=batch.tokens.device)
    order = sorted(range(len(layers)), key=lambda g: layers[g])  # groups in the order they join the batch
    v_init, shift = [], []
    for layer in layers:
        # post-norm blocks (Gemma): δ is added to the MLP's own output m, *before* ln2_post, so that
        # v* = v_init + δ is a value W_out can produce; the residual stream then changes by ln2_post(m + δ) −
        # ln2_post(m)
        post = mlp_post_norm(model, layer) if v_hook == "hook_mlp_out" else None
        if post is None:
            v_init.append(group_mean(acts[f"blocks.{layer}.{v_hook}"][rows, batch.lookup], batch, 0))
            shift.append(lambda d: d)
        else:
            m = mlp_values(model, acts, layer, batch)
            post_m = post(m[None])[0]
            v_init.append(group_mean(m, batch, 0))
            shift.append(lambda d, m=m, post=post, post_m=post_m: post((m + d)[None])[0] - post_m)
    resid = [acts[f"blocks.{layer}.hook_resid_post"] for layer in layers]
    dtype = resid[0].dtype
    deltas = torch.zeros(len(layers), model.cfg.d_model, device=rows.device, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([deltas], lr=lr)
    plan = plan_suffix(model, batch, min(layers) + 1, acts) if fast and min(layers) + 1 < L else None

    def edited(g: int, d: Tensor) -> Tensor:
        r = resid[g].clone()
        r[rows, batch.lookup] = r[rows, batch.lookup] + shift[g](d)
        return r

    def forward(groups: list[int]) -> list[Tensor]:
        """Scored logits of each group in ``groups`` (ascending layer), its δ added."""
        if not fast:
            (g,) = groups
            name = f"blocks.{layers[g]}.{v_hook}"

            def add(x: Tensor, hook) -> Tensor:
                x = x.clone()
                x[rows, batch.lookup] = x[rows, batch.lookup] + shift[g](deltas[g])
                return x

            return [scored_logits(model, run_plain(model, batch, [(name, add)]), batch)]
        if plan is None:  # every group edits the last layer: nothing above it runs
            return [scored_logits(model, edited(g, deltas[g]), batch) for g in groups]
        return suffix_scored_logits(model, [(layers[g] + 1, edited(g, deltas[g])) for g in groups], batch, plan)

    max_norm = [clamp_norm_factor * v.norm() for v in v_init]
    kl_init: list[Tensor | None] = [None] * len(layers)
    losses: list[list[float]] = [[] for _ in layers]
    final: dict[int, Tensor] = {}
    p_final: dict[int, float] = {}
    active = list(order)
    for it in range(steps):
        total = None
        for g, logits in zip(list(active), forward(active)):
            prompt_lp, kl_lp = target_loss_terms(logits, batch, n_target)
            if kl_init[g] is None:
                kl_init[g] = kl_lp.detach().clone()
            nll_each = -prompt_lp / n_target
            main = main_objective(nll_each, objective)
            kl = torch.nn.functional.kl_div(kl_init[g], kl_lp, log_target=True, reduction="batchmean")
            loss = main + kl_factor * kl + weight_decay * (deltas[g].norm() / v_init[g].norm() ** 2)
            losses[g].append(loss.item())
            if (objective == "maximize" and losses[g][-1] < early_stop_loss) or it == steps - 1:
                final[g] = deltas[g].detach().clone()  # this δ is the one its last loss belongs to
                p_final[g] = float(prompt_lp.detach().exp().mean())
                active.remove(g)
                continue
            total = loss if total is None else total + loss
        if not active:
            break
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            for g in active:
                if deltas[g].norm() > max_norm[g]:
                    deltas[g] = deltas[g] * max_norm[g] / deltas[g].norm()
    return tuple(TargetOpt(delta=final[g], v_init=v_init[g], losses=tuple(losses[g]), p_target=p_final[g],
                           clamped=bool(final[g].norm() >= max_norm[g] * (1 - 1e-6)))
                 for g in range(len(layers)))
