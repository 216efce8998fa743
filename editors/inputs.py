"""Batched editor inputs (prompts, targets, subject positions, subject noise) and the two ways to run them:

* **fast**: the residual stream entering block ``start`` is computed once (no grad) and every optimisation step
  runs only blocks ``start..L-1`` (TransformerLens ``forward(resid, start_at_layer=start, stop_at_layer=L)``), then
  ``ln_final`` and the unembedding *only at the scored positions*. Valid because nothing below ``start`` changes.
* **plain**: the whole model from tokens at every step with hooks (the reference way), used for parity checks.

Noise (Fact Forcing): with ``noise = SubjectNoise(sigma, samples, seed)`` every prompt becomes ``samples`` rows;
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

from tracer.lean import LeanBlocks, lean_supported
from tracer.noise import SubjectNoise, noise_hook
from tracer.tokens import locate_subject

__all__ = [
    "EditBatch", "SuffixPlan", "build_batch", "frozen_params", "plan_suffix", "suffix_cache_names",
    "suffix_scored_logits",
]


@dataclass(frozen=True)
class EditBatch:
    """Prompts as rows of one right-padded batch.

    Attributes:
        tokens: ``[rows, pos]`` token ids.
        lookup: ``[rows]`` index of the last subject token of each row.
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


def build_batch(
    model: HookedTransformer,
    texts: Sequence[str],
    subject: str,
    appended: Sequence[Tensor | None],
    noise: SubjectNoise | None = None,
) -> EditBatch:
    """One row per (text, noise sample): ``tokens(text) + appended[i]``.

    For a text with an appended target ``t`` (= target ids without the last token, teacher forcing), the scored
    positions are ``n-1 .. n-1+len(target)-1`` (pass the *full* target ids in ``appended``; the last is dropped
    from the tokens and used as the last score target). With ``appended[i] = None`` the row scores the whole
    next-token distribution at its *last subject token* (KL prompts; target −1): the reference codebases read the
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
        for r in range(reps):
            b = len(rows)
            rows.append(ids)
            lookups.append(pt.last_subject_index)
            groups.append(i)
            spans.append(pt.subject_span)
            if eps is not None:
                eps_rows.append(eps[r])
            if tgt is None:
                s_rows.append(b), s_pos.append(pt.last_subject_index), s_tgt.append(-1)
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
    x = resid_final[batch.score_rows, batch.score_pos]
    return model.unembed(model.ln_final(x[None]))[0]


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
    """Rows grouped by the position of their last subject token, for the suffix-only fast path.

    A vector added at position ``p`` of a row cannot change that row's positions ``< p`` (causal attention), so
    above the edit layer only positions ``p..`` need computing; the keys/values of positions ``< p`` are the
    unedited run's, fed to each block as a frozen TransformerLens KV-cache entry (rotary offsets follow from its
    length). A group of rows runs as one batch from its smallest ``p``.

    Attributes:
        groups: per group ``(p, rows [g], scored index into the batch's flat scored pairs [n_g])`` (TransformerLens
            blocks only; empty with ``lean``).
        keys, values: per block ``j`` (``start..L-1``) the unedited ``attn.hook_k``/``hook_v`` ``[rows, pos, kv, d_head]``
            (TransformerLens blocks), or with ``lean`` the rotated ``[rows, kv, pos, d_head]`` keys/values.
        start: the first block run (edit layer + 1).
        lean: packed blocks (:class:`tracer.lean.LeanBlocks`) when the model supports them, else ``None``. Then
            rows are ragged instead of grouped: row r computes only positions ``lookup[r]..`` up to its last scored
            position (``gather`` ``[rows, P]``: the absolute positions, clamped), attending to its own first
            ``lookup[r]`` prefix keys.
    """

    groups: tuple[tuple[int, Tensor, Tensor], ...]
    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    start: int
    lean: LeanBlocks | None = None
    gather: Tensor | None = None


# Cost model for grouping rows (in token-positions of one block): a block call re-reads the block's weights,
# which on a CPU costs about as much as computing ~32 extra positions.
_GROUP_OVERHEAD = 32


def _split_points(lookup: list[int], width: int, overhead: int = _GROUP_OVERHEAD) -> list[int]:
    """Partition the sorted distinct last-subject positions into contiguous ranges minimizing
    Σ_groups (overhead + n_rows · (width − group start)) (dynamic programming); returns each group's start."""
    ps = sorted(set(lookup))
    count = {p: lookup.count(p) for p in ps}
    k = len(ps)
    best = [0.0] + [float("inf")] * k  # best[i]: cost of the first i distinct positions
    cut = [0] * (k + 1)
    for i in range(1, k + 1):
        for j in range(i):  # group = ps[j:i], computed from ps[j]
            cost = best[j] + overhead + sum(count[p] for p in ps[j:i]) * (width - ps[j])
            if cost < best[i]:
                best[i], cut[i] = cost, j
    starts, i = [], k
    while i > 0:
        starts.append(ps[cut[i]])
        i = cut[i]
    return sorted(starts)


def suffix_cache_names(model: HookedTransformer, start: int) -> list[str]:
    """The activations :func:`plan_suffix` needs: keys/values of blocks ``start..``."""
    return [f"blocks.{j}.attn.hook_{kv}" for j in range(start, model.cfg.n_layers) for kv in "kv"]


@torch.no_grad()
def plan_suffix(
    model: HookedTransformer, batch: EditBatch, start: int, acts: dict[str, Tensor] | None = None
) -> SuffixPlan:
    """Cache the unedited keys/values of blocks ``start..`` (or take them from ``acts``, see
    :func:`suffix_cache_names`) and plan the rows: ragged with lean blocks, else grouped by last-subject position
    (rows of a group run from the group's smallest position; groups chosen by :func:`_split_points`)."""
    names = suffix_cache_names(model, start)
    if acts is None or not all(n in acts for n in names):
        acts = cache_acts(model, batch, names) if names else {}
    keys = {j: acts[f"blocks.{j}.attn.hook_k"] for j in range(start, model.cfg.n_layers)}
    values = {j: acts[f"blocks.{j}.attn.hook_v"] for j in range(start, model.cfg.n_layers)}
    lean = gather = None
    groups = []
    if not (lean_supported(model) and start < model.cfg.n_layers):  # TransformerLens blocks: rows in groups
        starts = _split_points(batch.lookup.tolist(), int(batch.tokens.shape[1]))
        bounds = starts[1:] + [int(batch.tokens.shape[1]) + 1]
        for p, nxt in zip(starts, bounds):
            rows = torch.nonzero((batch.lookup >= p) & (batch.lookup < nxt))[:, 0]
            scored = torch.nonzero(torch.isin(batch.score_rows, rows))[:, 0]
            groups.append((int(p), rows, scored))
    else:  # lean blocks: ragged rows
        lean = LeanBlocks(model, layers=range(start, model.cfg.n_layers))
        p0 = int(batch.lookup.max())
        for j in keys:  # rotated once here, not at every optimisation step; only the longest prefix is needed
            keys[j], values[j] = lean.prefix_keys_values(j, keys[j][:, :p0], values[j][:, :p0])
        last = torch.zeros_like(batch.lookup).scatter_reduce(0, batch.score_rows, batch.score_pos, "amax")
        width = int((last - batch.lookup).max()) + 1
        local = torch.arange(width, device=batch.lookup.device)
        gather = (batch.lookup[:, None] + local[None, :]).clamp(max=int(batch.tokens.shape[1]) - 1)
    return SuffixPlan(groups=tuple(groups), keys=keys, values=values, start=start, lean=lean, gather=gather)


def suffix_scored_logits(
    model: HookedTransformer, resid: Float[Tensor, "rows pos d_model"], batch: EditBatch, plan: SuffixPlan
) -> Float[Tensor, "n d_vocab"]:
    """Scored next-token logits when ``resid`` (= ``blocks.{start}.hook_resid_pre``) differs from the unedited
    run only at each row's last subject position: blocks ``start..`` run on positions ``p..`` of each group with
    the frozen prefix keys/values; equal to :func:`run_from` + :func:`scored_logits` up to float rounding."""
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as KVEntry

    L = model.cfg.n_layers
    if plan.lean is not None:  # ragged rows: each row from its own last subject token
        rows = torch.arange(batch.n_rows, device=resid.device)
        x = resid[rows[:, None], plan.gather]
        qpos, local = torch.unique(batch.score_pos - batch.lookup[batch.score_rows], return_inverse=True)
        has_prefix = int(batch.lookup.max()) > 0
        for j in range(plan.start, L):
            past = (plan.keys[j], plan.values[j]) if has_prefix else (None, None)
            x = plan.lean.block(j, x, *past, starts=batch.lookup, query_positions=qpos if j == L - 1 else None)
        return model.unembed(model.ln_final(x[batch.score_rows, local][None]))[0]

    chunks, order = [], []
    for p, rows, scored in plan.groups:
        x = resid[rows, p:]
        for j in range(plan.start, L):
            entry = None
            if p > 0:
                entry = KVEntry(past_keys=plan.keys[j][rows, :p], past_values=plan.values[j][rows, :p], frozen=True)
            x = model.blocks[j](x, past_kv_cache_entry=entry)
        local_row = torch.searchsorted(rows, batch.score_rows[scored])
        chunks.append(x[local_row, batch.score_pos[scored] - p])
        order.append(scored)
    flat = torch.cat(chunks)
    idx = torch.cat(order)
    final = torch.empty_like(flat)
    final[idx] = flat
    return model.unembed(model.ln_final(final[None]))[0]


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
    model: HookedTransformer, batch: EditBatch, names: Sequence[str], stop_at_layer: int | None = None
) -> dict[str, Tensor]:
    """Activations ``names`` of the (noised) batch, computed once without grad."""
    wanted = set(names)
    store: dict[str, Tensor] = {}

    def save(x: Tensor, hook) -> None:
        store[hook.name] = x.detach().clone()

    model.run_with_hooks(
        batch.tokens,
        stop_at_layer=stop_at_layer if stop_at_layer is not None else model.cfg.n_layers,
        fwd_hooks=batch.embed_hooks() + [(lambda n: n in wanted, save)],
    )
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
