"""Constrained finetuning (Zhu et al. 2020; ROME's FT baseline; Hase et al. FT-1 / FT-5).

Adam (lr) on ``W_out`` and ``b_out`` of the chosen layers; loss on the plain prompt
    maximize:  −(1/m) Σ_i log p(o_i | prompt, o_<i)     (mean per-token NLL)
    minimize:  exp(Σ_i log p(o_i | ...)) = p(o | prompt)   (exp(−Σ NLL))
(with noise: p is the mean over the noise rows). After every step each entry is clamped to
[W₀ − ε, W₀ + ε] (ε = norm_constraint) with bounds pre-rounded so that |W − W₀| ≤ ε holds exactly in float
arithmetic. A step is skipped (and the loop ends) once the loss < skip_loss.
Fast path: the residual stream entering the lowest edited block is cached once; each step runs only the blocks
from there on, and the unembedding only at the target positions.

Lockstep (:func:`optimize_ft`): the finetunings of one request at several layer sets (a study's FT edits of one fact
at all of its layers) are independent, so they advance as one growing batch: each set's rows join at its lowest
layer, each set has its own copy of the weights it edits (its own Adam state, clamp and early stop), and a set that
reached ``skip_loss`` leaves the batch. Each set's result equals :func:`execute_ft` on that set alone up to float
rounding (tests/test_ft_lockstep.py); a study gets it through :class:`editors.targets.TargetMemo`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.editors.deltas import Convergence, EditResult, parameter, snapshot, weight_changes
from locedit.editors.hparams import FTHyperParams
from locedit.editors.inputs import build_batch, cache_acts, frozen_params, run_from, run_plain, scored_logits
from locedit.editors.requests import EditRequest
from locedit.editors.targets import TargetMemo, target_key
from locedit.tracer.forward import logits_from_resid
from locedit.editors.vstar import target_loss_terms
from locedit.tracer.corruption import GaussianNoise
from locedit.tracer.tokens import target_tokens

__all__ = ["FTOutcome", "execute_ft", "ft_memo_key", "linf_bounds", "optimize_ft"]


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


@dataclass(frozen=True)
class FTOutcome:
    """One layer set's finetuning from :func:`optimize_ft`.

    Attributes:
        params: final value of every edited parameter (``blocks.{l}.mlp.W_out`` / ``b_out``), within its L∞ bounds.
        losses: the loss at every evaluation (the loop of :func:`execute_ft`).
        p_target: mean p(target) over the prompts at the last evaluation.
        bound_share: share of the edited entries at their L∞ bound at the end.
        noise_samples: rows per prompt (1 without noise).
    """

    params: Mapping[str, Tensor]
    losses: tuple[float, ...]
    p_target: float
    bound_share: float
    noise_samples: int


def _ft_loss(prompt_lp: Float[Tensor, " prompts"], m: int, objective: str) -> Tensor:
    """The module docstring's loss from per-prompt log p(o | prompt): mean per-token NLL (maximize) or p (minimize)."""
    return (-prompt_lp / m).mean() if objective == "maximize" else prompt_lp.exp().mean()


def _ft_result(model: HookedTransformer, names: list[str], old: Mapping[str, Tensor], layers: list[int],
               hp: FTHyperParams, objective: str, t0: float, outcome: FTOutcome) -> EditResult:
    """The :class:`EditResult` of a finetuning whose final weights the model now holds (``old``: before it)."""
    deltas, flips = weight_changes(model, {n: old[n] for n in names})
    return EditResult(
        method="ft", layers=tuple(layers), deltas=deltas, bit_flips=flips, losses=outcome.losses,
        seconds=time.perf_counter() - t0, objective=objective,
        info={"steps": len(outcome.losses), "norm_constraint": hp.norm_constraint,
              "noise_samples": outcome.noise_samples},
        convergence=Convergence(final_loss=outcome.losses[-1], steps=len(outcome.losses), p_target=outcome.p_target,
                                bound_share=outcome.bound_share),
    )


def optimize_ft(
    model: HookedTransformer,
    request: EditRequest,
    layer_sets: Sequence[Sequence[int]],
    hp: FTHyperParams,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
) -> dict[tuple[int, ...], FTOutcome]:
    """Constrained finetuning of ``request`` at every layer set of ``layer_sets``, in lockstep (module docstring);
    the model is left unchanged. ``{sorted layer set: FTOutcome}``.

    Per step the active sets' rows form one batch ``[Σ rows, pos, d_model]``: set ``g``'s copy of the batch joins at
    ``blocks.{min g}.hook_resid_pre`` (cached once, no grad), and at each of its layers ``l`` the MLP output of its
    rows is the MLP's own forward with ``W_out``, ``b_out`` replaced by set ``g``'s copies. The loss is
    ``Σ_g loss_g`` (``loss_g`` only depends on set ``g``'s weights, so each gets exactly its own gradient)."""
    sets = list(dict.fromkeys(tuple(sorted(int(x) for x in s)) for s in layer_sets))
    if not sets or any(not s for s in sets):
        raise ValueError(f"optimize_ft needs non-empty layer sets, got {layer_sets!r}")
    n_layers = model.cfg.n_layers
    tgt = target_tokens(model, request.target).to(model.cfg.device)
    m = int(tgt.shape[0])
    batch = build_batch(model, [request.text], request.subject, [tgt], noise)
    rows = batch.n_rows
    starts = sorted({s[0] for s in sets})
    resid = cache_acts(model, batch, [f"blocks.{s}.hook_resid_pre" for s in starts], stop_at_layer=starts[-1] + 1)
    edited = sorted({layer for s in sets for layer in s})
    old = {layer: (model.blocks[layer].mlp.W_out.detach(), model.blocks[layer].mlp.b_out.detach()) for layer in edited}
    bounds = {layer: tuple(linf_bounds(w, hp.norm_constraint) for w in old[layer]) for layer in edited}
    weights = {g: {layer: tuple(w.clone().requires_grad_(True) for w in old[layer]) for layer in s}
               for g, s in enumerate(sets)}
    losses: dict[int, list[float]] = {g: [] for g in range(len(sets))}
    p_target: dict[int, float] = {}
    active = list(range(len(sets)))
    state: dict = {"busy": False, "ranges": {}}

    def mlp_hook(layer: int):
        def hook(module, args, output):
            if state["busy"]:  # the functional call below runs this module (and its hooks) again
                return None
            pieces, at = [], 0
            state["busy"] = True
            try:
                for g, (lo, hi) in state["ranges"].items():
                    if layer in weights[g]:
                        w_out, b_out = weights[g][layer]
                        own = torch.func.functional_call(module, {"W_out": w_out, "b_out": b_out}, (args[0][lo:hi],))
                        pieces += [output[at:lo], own]
                        at = hi
            finally:
                state["busy"] = False
            return torch.cat(pieces + [output[at:]]) if pieces else None

        return hook

    params = [w for g in weights for pair in weights[g].values() for w in pair]
    handles = [model.blocks[layer].mlp.register_forward_hook(mlp_hook(layer)) for layer in edited]
    try:
        with frozen_params(model):
            opt = torch.optim.Adam(params, lr=hp.lr)
            for _ in range(hp.num_steps):
                order = sorted(active, key=lambda g: sets[g][0])
                x, state["ranges"] = None, {}
                for j in range(sets[order[0]][0], n_layers):
                    joining = [g for g in order if sets[g][0] == j]
                    for g in joining:
                        at = 0 if x is None else int(x.shape[0])
                        state["ranges"][g] = (at, at + rows)
                        x = resid[f"blocks.{j}.hook_resid_pre"] if x is None else torch.cat(
                            [x, resid[f"blocks.{j}.hook_resid_pre"]])
                    x = model.blocks[j](x)
                picks = torch.cat([batch.score_rows + state["ranges"][g][0] for g in order])
                logits = logits_from_resid(model, x[picks, batch.score_pos.repeat(len(order))]).chunk(len(order))
                total, stepping = 0.0, []
                for g, lg in zip(order, logits):
                    prompt_lp, _ = target_loss_terms(lg, batch, m)
                    loss = _ft_loss(prompt_lp, m, objective)
                    losses[g].append(loss.item())
                    p_target[g] = float(prompt_lp.detach().exp().mean())
                    if losses[g][-1] < hp.skip_loss:
                        active.remove(g)  # converged: no step, and out of the batch from now on
                        continue
                    total = total + loss
                    stepping.append(g)
                if not stepping:
                    break
                opt.zero_grad(set_to_none=True)
                total.backward()
                for g in set(order) - set(stepping):  # a set that stopped in this batch got a zero gradient:
                    for pair in weights[g].values():   # drop it, else Adam would still move it by its momentum
                        for w in pair:
                            w.grad = None
                opt.step()  # sets without a gradient are left alone by Adam (their state too)
                with torch.no_grad():
                    for g in stepping:
                        for layer, pair in weights[g].items():
                            for w, (lo, hi) in zip(pair, bounds[layer]):
                                w.copy_(torch.maximum(torch.minimum(w, hi), lo))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for g, s in enumerate(sets):
        final = {f"blocks.{layer}.mlp.{name}": w.detach().clone() for layer in s
                 for name, w in zip(("W_out", "b_out"), weights[g][layer])}
        at_bound = sum(int(((w == lo) | (w == hi)).sum()) for layer in s
                       for w, (lo, hi) in zip(weights[g][layer], bounds[layer]))
        out[s] = FTOutcome(params=final, losses=tuple(losses[g]), p_target=p_target[g],
                           bound_share=at_bound / sum(w.numel() for pair in weights[g].values() for w in pair),
                           noise_samples=batch.reps)
    return out


def ft_memo_key(group: str, request: EditRequest, objective: str, noise: GaussianNoise | None, hp: FTHyperParams):
    """The :class:`editors.targets.TargetMemo` key of an FT edit (``group``: the method's memo group, "ft-1" / "ft-5";
    every hyper-parameter counts)."""
    return target_key(group, request, objective, noise, None, True, hp,
                      fields=tuple(f.name for f in dataclasses.fields(hp)))


def execute_ft(
    model: HookedTransformer,
    request: EditRequest,
    layers: Sequence[int],
    hp: FTHyperParams,
    objective: str = "maximize",
    noise: GaussianNoise | None = None,
    *,
    fast: bool = True,
    targets: TargetMemo | None = None,
    group: str = "ft",
) -> EditResult:
    """Finetune ``W_out``/``b_out`` of ``layers`` in place under the L∞ constraint; return exact deltas.

    ``targets`` (with ``fast``): a :class:`editors.targets.TargetMemo` whose ``group`` entry lists the layer sets a
    study finetunes this request at; the first of them asked for runs all of them in lockstep (:func:`optimize_ft`)
    and the others are then read from the memo. None: this edit alone (the reference loop below)."""
    t0 = time.perf_counter()
    layers = sorted(layers)
    names = [f"blocks.{layer}.mlp.{w}" for layer in layers for w in ("W_out", "b_out")]
    if targets is not None and fast:
        outcome = targets.get(model, ft_memo_key(group, request, objective, noise, hp), tuple(layers),
                              lambda sets: optimize_ft(model, request, sets, hp, objective, noise))
        old = snapshot(model, names)
        with torch.no_grad():
            for n in names:
                parameter(model, n).copy_(outcome.params[n])
        return _ft_result(model, names, old, layers, hp, objective, t0, outcome)
    tgt = target_tokens(model, request.target).to(model.cfg.device)
    m = int(tgt.shape[0])
    batch = build_batch(model, [request.text], request.subject, [tgt], noise)
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
            loss = _ft_loss(prompt_lp, m, objective)
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
    outcome = FTOutcome(params={}, losses=tuple(losses), p_target=p_target,
                        bound_share=at_bound / sum(p.numel() for p in params), noise_samples=batch.reps)
    return _ft_result(model, names, old, layers, hp, objective, t0, outcome)
