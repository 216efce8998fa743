"""Batched editor inputs (prompts, targets, subject positions, subject noise) and the two ways to run them:

* **fast**: the residual stream entering block ``start`` is computed once (no grad) and every optimisation step
  runs only blocks ``start..L-1`` (TransformerLens ``forward(resid, start_at_layer=start, stop_at_layer=L)``), then
  ``ln_final`` and the unembedding *only at the scored positions*. Valid because nothing below ``start`` changes.
* **plain**: the whole model from tokens at every step with hooks (the reference way), used for parity checks.

Noise (Fact Forcing): with ``noise = GaussianNoise(sigma=..., samples=..., seed=...)`` (resolved) every prompt becomes ``samples`` rows;
row ``r`` of a prompt gets ``noise.draw(n_subject_tokens)[r]`` added at ``hook_embed`` at *that prompt's own*
subject positions (located with :func:`tracer.tokens.locate_subject`). Probabilities of a prompt are the mean over
its rows, as in the tracer's evaluation. All ``noise.samples`` samples are used for every prompt the editors build.

Rows are right-padded; with causal attention padding after a row's last real token changes nothing before it, so
no attention mask is needed (as in :mod:`tracer.probs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.tracer.corruption import GaussianNoise, noise_hook
from locedit.tracer.forward import logits_from_resid
from locedit.tracer.suffix import SuffixRunner
from locedit.tracer.tokens import locate_subject
from locedit.editors.tokens import token_position

__all__ = [
    "EditBatch", "KL_PROMPT", "SuffixPlan", "build_batch", "target_batch", "frozen_params", "plan_suffix", "suffix_cache_names",
    "suffix_scored_logits",
]


@dataclass(frozen=True)
class EditBatch:
    """Prompts as rows of one right-padded batch.

    Attributes:
        tokens: ``[rows, pos]`` token ids.
        lookup: ``[rows]`` each row's edit position (the last subject token unless another token rule is given).
        group: ``[rows]`` prompt index of each row (rows of a prompt differ only by their noise sample).
        score_rows, score_pos: flat ``[n_scored]`` (row, position) pairs whose next-token logits are needed.
        score_targets: ``[n_scored]`` the token to score at each pair (−1 for "whole distribution" KL rows).
        n_prompts: number of prompts; ``reps`` rows per prompt.
        spans: subject span per row; ``eps``: noise per row (``None`` without noise).
    """

    tokens: Int[Tensor, "rows pos"]
    lookup: Int[Tensor, "rows"]
    group: Int[Tensor, "rows"]
    score_rows: Int[Tensor, "n"]
    score_pos: Int[Tensor, "n"]
    score_targets: Int[Tensor, "n"]
    n_prompts: int
    reps: int
    spans: tuple[tuple[int, int], ...]
    eps: tuple[Tensor, ...] | None

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    def embed_hooks(self) -> list:
        """The ``hook_embed`` noise hook (empty list without noise)."""
        if self.eps is None:
            return []
        return [("hook_embed", noise_hook(self.spans, self.eps))]


KL_PROMPT = "{} is a"
"""The prompt whose next-token distribution the v*/z optimisation's KL term keeps (ROME's and MEMIT's
"{subject} is a")."""


def target_batch(model: HookedTransformer, request, context_lengths, noise: GaussianNoise | None = None,
                 token: str | int = "subject_last") -> tuple[EditBatch, int, Tensor]:
    """The batch a v* (ROME, r-ROME) or z (MEMIT) optimisation of ``request`` runs on: every context template
    (:func:`editors.templates.context_templates` of ``context_lengths``) formatted with the request's prompt and
    followed by the target (teacher forcing), then :data:`KL_PROMPT` (:func:`build_batch`). Returns
    ``(batch, n_texts, target ids)``; groups ``< n_texts`` are the rewriting texts."""
    from locedit.editors.templates import context_templates
    from locedit.tracer.tokens import target_tokens

    templates = context_templates(model, context_lengths)
    tgt = target_tokens(model, request.target).to(model.cfg.device)
    texts = [t.format(request.text) for t in templates]
    batch = build_batch(model, texts + [KL_PROMPT.format(request.subject)], request.subject,
                        [tgt] * len(texts) + [None], noise, token)
    return batch, len(texts), tgt


def build_batch(
    model: HookedTransformer,
    texts: Sequence[str],
    subject: str,
    appended: Sequence[Tensor | None],
    noise: GaussianNoise | None = None,
    token: str | int = "subject_last",
) -> EditBatch:
    """One row per (text, noise sample): ``tokens(text) + appended[i]``; each row's lookup position (where keys are
    read and δ is added) is the position ``token`` names in that text (:func:`editors.tokens.token_position`:
    ``"subject_last"`` by default, ROME's and MEMIT's own rule).

    For a text with an appended target ``t`` (= target ids without the last token, teacher forcing), the scored
    positions are ``n-1 .. n-1+len(target)-1`` (pass the *full* target ids in ``appended``; the last is dropped
    from the tokens and used as the last score target). With ``appended[i] = None`` the row scores the whole
    next-token distribution at its *lookup position* (KL prompts; target −1; by default the last subject token): the reference codebases read the
    KL prompt "{subject} is a" there (``rome/compute_v.py`` and ``memit/compute_z.py`` index the logits of the KL
    prompts at their lookup index), not at the prompt's last token.
    """
    reps = 1 if noise is None else noise.samples
    rows, lookups, groups, spans, eps_rows = [], [], [], [], []
    s_rows, s_pos, s_tgt = [], [], []
    for i, (text, tgt) in enumerate(zip(texts, appended)):
        pt = locate_subject(model, text, subject)
        n = pt.n_tokens
        ids = pt.tokens if tgt is None else torch.cat([pt.tokens, tgt[:-1]])
        eps = None
        if noise is not None:
            s, e = pt.subject_span
            eps = noise.draw(e - s, model.cfg.d_model, model.cfg.device, model.cfg.dtype)
        lookup = token_position(pt, token, text)
        for r in range(reps):
            b = len(rows)
            rows.append(ids)
            lookups.append(lookup)
            groups.append(i)
            spans.append(pt.subject_span)
            if eps is not None:
                eps_rows.append(eps[r])
            if tgt is None:
                s_rows.append(b), s_pos.append(lookup), s_tgt.append(-1)
            else:
                for j in range(int(tgt.shape[0])):
                    s_rows.append(b), s_pos.append(n - 1 + j), s_tgt.append(int(tgt[j]))
    width = max(int(r.shape[0]) for r in rows)
    toks = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        toks[b, : r.shape[0]] = r
    dev = model.cfg.device
    lt = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
    return EditBatch(
        tokens=toks.to(dev),
        lookup=lt(lookups),
        group=lt(groups),
        score_rows=lt(s_rows),
        score_pos=lt(s_pos),
        score_targets=lt(s_tgt),
        n_prompts=len(texts),
        reps=reps,
        spans=tuple(spans),
        eps=tuple(eps_rows) if noise is not None else None,
    )


def scored_logits(
    model: HookedTransformer, resid_final: Float[Tensor, "rows pos d_model"], batch: EditBatch
) -> Float[Tensor, "n d_vocab"]:
    """``unembed(ln_final(resid))`` at the batch's scored positions only."""
    return logits_from_resid(model, resid_final[batch.score_rows, batch.score_pos])


def run_from(
    model: HookedTransformer, resid: Float[Tensor, "rows pos d_model"], start: int, fwd_hooks: Sequence = ()
) -> Float[Tensor, "rows pos d_model"]:
    """Blocks ``start..n_layers-1`` on ``resid`` (= ``blocks.{start}.hook_resid_pre``); final residual."""
    n = model.cfg.n_layers
    if start >= n:
        return resid
    if fwd_hooks:
        return model.run_with_hooks(resid, start_at_layer=start, stop_at_layer=n, fwd_hooks=list(fwd_hooks))
    return model(resid, start_at_layer=start, stop_at_layer=n)


@dataclass(frozen=True)
class SuffixPlan:
    """What the fast path needs to run blocks ``start..L-1`` on each row's suffix only.

    A vector added at position ``p`` of a row cannot change that row's positions ``< p`` (causal attention), so
    above the edit layer each row computes only positions ``lookup[r]..`` up to its last scored position
    (``gather`` ``[rows, P]``: their absolute positions, clamped at the row's end), attending to the unedited
    run's keys/values of its first ``lookup[r]`` positions (:class:`tracer.suffix.SuffixRunner`, lean or
    TransformerLens backend).

    Attributes:
        runner: the suffix runner.
        prefix: per block ``j`` (``start..L-1``) the unedited keys/values in the runner's layout.
        start: the first block run (edit layer + 1).
        gather: ``[rows, P]`` absolute positions each row computes.
    """

    runner: SuffixRunner
    prefix: dict[int, tuple[Tensor, Tensor]]
    start: int
    gather: Tensor


def suffix_cache_names(model: HookedTransformer, start: int) -> list[str]:
    """The activations :func:`plan_suffix` needs: keys/values of blocks ``start..``."""
    return [f"blocks.{j}.attn.hook_{kv}" for j in range(start, model.cfg.n_layers) for kv in "kv"]


@torch.no_grad()
def plan_suffix(
    model: HookedTransformer, batch: EditBatch, start: int, acts: dict[str, Tensor] | None = None
) -> SuffixPlan:
    """Cache the unedited keys/values of blocks ``start..`` (or take them from ``acts``, see
    :func:`suffix_cache_names`) and each row's suffix positions."""
    names = suffix_cache_names(model, start)
    if acts is None or not all(n in acts for n in names):
        acts = cache_acts(model, batch, names) if names else {}
    L = model.cfg.n_layers
    runner = SuffixRunner(model, layers=range(start, L))
    prefix = {j: runner.prefix(j, acts[f"blocks.{j}.attn.hook_k"], acts[f"blocks.{j}.attn.hook_v"])
              for j in range(start, L)}
    last = torch.zeros_like(batch.lookup).scatter_reduce(0, batch.score_rows, batch.score_pos, "amax")
    width = int((last - batch.lookup).max()) + 1
    local = torch.arange(width, device=batch.lookup.device)
    gather = (batch.lookup[:, None] + local[None, :]).clamp(max=int(batch.tokens.shape[1]) - 1)
    return SuffixPlan(runner=runner, prefix=prefix, start=start, gather=gather)


def suffix_scored_logits(
    model: HookedTransformer,
    copies: Sequence[tuple[int, Float[Tensor, "rows pos d_model"]]],
    batch: EditBatch,
    plan: SuffixPlan,
) -> list[Float[Tensor, "n d_vocab"]]:
    """Scored next-token logits of several edited copies of the batch, run as one growing batch.

    ``copies``: ``(start, resid)`` pairs in ascending ``start`` (each ``>= plan.start``, at most ``n_layers``), where
    ``resid`` (= ``blocks.{start}.hook_resid_pre``) differs from the unedited run only at each row's lookup position.
    Blocks ``plan.start..`` run on each row's positions ``lookup[r]..`` with the frozen prefix keys/values; a copy's
    rows join the batch at their own ``start`` (one with ``start = n_layers`` runs no block), and the last block and
    the unembedding run once for all. Each copy's logits equal :func:`run_from` + :func:`scored_logits` up to float
    rounding."""
    L = model.cfg.n_layers
    rows = torch.arange(batch.n_rows, device=batch.tokens.device)
    qpos, local = torch.unique(batch.score_pos - batch.lookup[batch.score_rows], return_inverse=True)
    pending = list(copies)
    if any(a[0] > b[0] for a, b in zip(pending, pending[1:])) or (pending and pending[0][0] < plan.start):
        raise ValueError(f"copies must start in ascending order at block {plan.start} or later, got "
                         f"{[c[0] for c in copies]}")
    x = None
    for j in range(plan.start, L):
        joining = []
        while pending and pending[0][0] == j:
            joining.append(pending.pop(0)[1][rows[:, None], plan.gather])
        if joining:
            x = torch.cat(([x] if x is not None else []) + joining)
        if x is None:
            continue
        n = x.shape[0] // batch.n_rows
        x = plan.runner.block(j, x, plan.prefix[j], starts=batch.lookup.repeat(n),
                              rows=None if n == 1 else rows.repeat(n), query_positions=qpos if j == L - 1 else None)
    late = [resid[rows[:, None], plan.gather][:, qpos] for _, resid in pending]  # start = n_layers: no block
    x = torch.cat(([x] if x is not None else []) + late)
    n = x.shape[0] // batch.n_rows
    pick = (batch.score_rows[None, :] + batch.n_rows * torch.arange(n, device=rows.device)[:, None]).reshape(-1)
    return list(logits_from_resid(model, x[pick, local.repeat(n)]).chunk(n))


def run_plain(
    model: HookedTransformer, batch: EditBatch, fwd_hooks: Sequence = ()
) -> Float[Tensor, "rows pos d_model"]:
    """Whole model from tokens (with the noise hook); final residual (before ``ln_final``)."""
    n = model.cfg.n_layers
    return model.run_with_hooks(
        batch.tokens, stop_at_layer=n, fwd_hooks=batch.embed_hooks() + list(fwd_hooks)
    )


@torch.no_grad()
def cache_acts(
    model: HookedTransformer,
    batch: EditBatch,
    names: Sequence[str],
    stop_at_layer: int | None = None,
    *,
    resid: Float[Tensor, "rows pos d_model"] | None = None,
    start: int = 0,
) -> dict[str, Tensor]:
    """Activations ``names`` of the (noised) batch, computed once without grad — from the tokens, or with ``resid``
    (= ``blocks.{start}.hook_resid_pre`` of the batch, cached earlier) from block ``start`` on."""
    wanted = set(names)
    store: dict[str, Tensor] = {}

    def save(x: Tensor, hook) -> None:
        store[hook.name] = x.detach().clone()

    stop = stop_at_layer if stop_at_layer is not None else model.cfg.n_layers
    hooks = [(lambda n: n in wanted, save)]
    if resid is None:
        model.run_with_hooks(batch.tokens, stop_at_layer=stop, fwd_hooks=batch.embed_hooks() + hooks)
    else:
        model.run_with_hooks(resid, start_at_layer=start, stop_at_layer=stop, fwd_hooks=hooks)
    return store


def group_mean(x: Float[Tensor, "rows d"], batch: EditBatch, group: int = 0) -> Float[Tensor, "d"]:
    """Mean of ``x`` over the rows of prompt ``group`` (its noise samples)."""
    return x[batch.group == group].mean(0)


class frozen_params:
    """Context manager: ``requires_grad=False`` on every parameter except ``trainable``; restores the flags."""

    def __init__(self, model: HookedTransformer, trainable: Sequence[torch.nn.Parameter] = ()):
        self.model = model
        self.trainable = {id(p) for p in trainable}

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(id(p) in self.trainable)
        return self

    def __exit__(self, *exc):
        for p, f in self.flags:
            p.requires_grad_(f)
        return False


Hook = Callable[[Tensor, object], Tensor]
