"""Teacher-forced target probabilities, batched over prompts of different lengths.

p(o | P) for a multi-token target o = (o_1..o_m) is exp(Σ_i log p(o_i | P, o_<i)) (the reference code's
quantity). Rows are right-padded: with causal attention and absolute rotary/learned positions, padding after a
row's last real token cannot change that row's logits, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.tracer.corruption import GaussianNoise, noise_hook
from locedit.tracer.forward import ResidCheckpoints, scored_logits
from locedit.tracer.tokens import encode, locate_subject, target_tokens

__all__ = ["pack", "sequence_log_probs", "target_positions", "target_probs", "target_log_probs"]


def pack(
    prompt_tokens: Sequence[Int[Tensor, "T"]], target_ids: Sequence[Int[Tensor, "m"]], pad_id: int = 0
) -> tuple[Int[Tensor, "batch pos"], list[int], list[int]]:
    """Right-padded ``prompt + target[:-1]`` rows, with each row's prompt length and target length."""
    rows = [torch.cat([p, t[:-1]]) for p, t in zip(prompt_tokens, target_ids)]
    width = max(int(r.shape[0]) for r in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : r.shape[0]] = r
    return batch, [int(p.shape[0]) for p in prompt_tokens], [int(t.shape[0]) for t in target_ids]


def target_positions(prompt_lens: Sequence[int], target_lens: Sequence[int]) -> Int[Tensor, "batch m_max"]:
    """Per row, the teacher-forced positions ``n-1 .. n-2+m`` whose logits predict the target tokens; rows with a
    shorter target repeat their last position (ignored by :func:`sequence_log_probs`)."""
    m_max = max(target_lens)
    out = torch.empty(len(prompt_lens), m_max, dtype=torch.long)
    for b, (n, m) in enumerate(zip(prompt_lens, target_lens)):
        out[b] = (n - 1 + torch.arange(m_max)).clamp(max=n - 2 + m)
    return out


def sequence_log_probs(
    logits: Float[Tensor, "batch m_max d_vocab"],
    target_ids: Sequence[Int[Tensor, "m"]],
) -> Float[Tensor, "batch"]:
    """Σ_i log p(o_i | prompt, o_<i) per row, from the logits at each row's :func:`target_positions`
    (differentiable)."""
    logp = logits.log_softmax(-1)
    out = []
    for b, tgt in enumerate(target_ids):
        m = tgt.shape[0]
        out.append(logp[b, torch.arange(m, device=logits.device), tgt.to(logits.device)].sum())
    return torch.stack(out)


def target_log_probs(
    model: HookedTransformer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    subjects: Sequence[str] | None = None,
    noise: GaussianNoise | None = None,
    batch_size: int = 32,
    fwd_hooks: Sequence = (),
    checkpoints: ResidCheckpoints | None = None,
    changed_from: int | None = None,
) -> Float[Tensor, "batch"]:
    """log p(target_i | prompt_i), teacher-forced; with ``noise``, the log of the mean over noise samples of
    p(target | s_noise, r), the noise added at each prompt's own subject tokens (``subjects`` required).
    Differentiable when called with grad enabled.

    ``checkpoints``, ``changed_from``: record each chunk's residual stream at the checkpoint blocks (unedited
    model, ``changed_from`` None), or rerun each chunk only from the checkpoint at or below block ``changed_from``
    (the same prompts and targets, inside an edit of blocks ``changed_from..``); see
    :class:`tracer.forward.ResidCheckpoints`."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if noise is not None and (subjects is None or len(subjects) != len(prompts)):
        raise ValueError("noised scoring needs one subject per prompt")
    tgt_ids = [target_tokens(model, t) for t in targets]
    if noise is not None:
        noise = noise.resolve(model)
    if noise is None:
        p_toks = [encode(model, p) for p in prompts]
        spans = None
    else:
        located = [locate_subject(model, p, s) for p, s in zip(prompts, subjects)]
        p_toks = [pt.tokens for pt in located]
        spans = [pt.subject_span for pt in located]
    reps = 1 if noise is None else noise.samples
    out = []
    for lo in range(0, len(prompts), max(1, batch_size // reps)):
        hi = min(len(prompts), lo + max(1, batch_size // reps))
        p_chunk = [p for p in p_toks[lo:hi] for _ in range(reps)]
        t_chunk = [t for t in tgt_ids[lo:hi] for _ in range(reps)]
        toks, plens, tlens = pack(p_chunk, t_chunk)
        hooks = list(fwd_hooks)
        if spans is not None:
            row_spans, row_eps = [], []
            for s, e in spans[lo:hi]:
                eps = noise.draw(e - s, model.cfg.d_model, model.cfg.device, model.cfg.dtype)
                row_spans += [(s, e)] * reps
                row_eps += list(eps)
            hooks.append(("hook_embed", noise_hook(row_spans, row_eps)))
        logits, _ = scored_logits(model, toks, target_positions(plens, tlens), fwd_hooks=hooks,
                                  checkpoints=checkpoints, key=(lo, hi), changed_from=changed_from)
        lp = sequence_log_probs(logits, t_chunk)
        if reps > 1:  # log of the mean probability over noise samples
            lp = torch.logsumexp(lp.view(-1, reps), dim=1) - torch.log(torch.tensor(float(reps)))
        out.append(lp)
    return torch.cat(out)


@torch.no_grad()
def target_probs(
    model: HookedTransformer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    subjects: Sequence[str] | None = None,
    noise: GaussianNoise | None = None,
    batch_size: int = 32,
    checkpoints: ResidCheckpoints | None = None,
    changed_from: int | None = None,
) -> Float[Tensor, "batch"]:
    """p(target_i | prompt_i) (mean over noise samples when ``noise`` is given). See :func:`target_log_probs`."""
    return target_log_probs(
        model, prompts, targets, subjects=subjects, noise=noise, batch_size=batch_size, checkpoints=checkpoints,
        changed_from=changed_from,
    ).exp()
