"""Localization methods of the study (:data:`tracer.vocab.LOCALIZATIONS`) run on one fact.

* ``noise`` — causal tracing with Gaussian noise at the subject (exact fast path);
* ``flip`` — Reber's input flipping: the subject is replaced by ``flips`` partner subjects, each the subject of
  another fact of the same relation with a *different* true object whose prompt tokens line up with the fact's
  outside the subject; partners are drawn deterministically (seeded by the fact id and the seed) from the dataset.
  The grid, p_corrupt and the logit-difference grid (logit(o_true) − logit(o_partner), Zhang & Nanda 2023) are
  means over partners;
* ``zero`` — App. B representation zeroing of all subject tokens (exact fast path; effect = deleted share);
* ``attribution`` — the first-order estimate of the noise grid.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformer_lens import HookedTransformer

from locedit.problems.facts import Fact
from locedit.tracer.corruption import GaussianNoise, SubjectFlip
from locedit.tracer.result import TraceResult
from locedit.tracer.tracing import FlipAlignmentError, check_flip, trace, zero
from locedit.tracer.vocab import LOCALIZATIONS, check_choice

__all__ = ["NotEnoughPartnersError", "flip_partners", "localize"]


class NotEnoughPartnersError(ValueError):
    """Fewer eligible flip partners than requested (same relation, different object, aligned prompt)."""


def flip_partners(
    model: HookedTransformer, fact: Fact, facts: Sequence[Fact], n: int, seed: int = 0
) -> list[Fact]:
    """``n`` partner facts for flipping ``fact``: same ``relation``, a different ``o_true``, a subject that is neither
    the fact's nor inside its prompt, and the fact's prompt with the partner's subject aligning token by token
    outside the subject (:func:`tracer.tracing.check_flip`). Candidates are taken in a deterministic order: the
    dataset's order shuffled by ``random.Random(f"{seed}|{fact.id}")``.

    Raises:
        NotEnoughPartnersError: fewer than ``n`` eligible partners (the message says how many).
    """
    if fact.relation is None:
        raise NotEnoughPartnersError(f"{fact.id} has no relation id: flip partners need one")
    pool = [f for f in facts if f.relation == fact.relation and f.o_true.strip() != fact.o_true.strip()
            and f.subject != fact.subject and f.subject not in fact.prompt and fact.subject not in f.subject]
    seen: set[str] = set()
    unique = [f for f in pool if not (f.subject in seen or seen.add(f.subject))]
    random.Random(f"{seed}|{fact.id}").shuffle(unique)
    chosen = []
    for f in unique:
        try:
            check_flip(model, fact.prompt, fact.subject, f.subject)
        except FlipAlignmentError:
            continue
        chosen.append(f)
        if len(chosen) == n:
            return chosen
    raise NotEnoughPartnersError(
        f"{fact.id}: only {len(chosen)} eligible flip partners (relation {fact.relation}, different object, aligned "
        f"tokens) of {n} requested"
    )


def _mean_flip(results: list[TraceResult], partners: list[Fact]) -> TraceResult:
    base = results[0]
    ld = [r.extra["logit_diff"] for r in results]
    traced = torch.stack([r.traced for r in results]).all(0) if base.traced is not None else None
    return TraceResult(
        tokens=base.tokens, subject_span=base.subject_span,
        grid=torch.stack([r.grid for r in results]).mean(0),
        p_clean=base.p_clean, p_noised=float(sum(r.p_noised for r in results) / len(results)),
        kind=base.kind, window=base.window, algorithm=base.algorithm, sigma=None, samples=len(results),
        corrupt="flip", traced=traced, prompt=base.prompt, subject=base.subject, target=base.target,
        flip_subject="; ".join(p.subject for p in partners),
        extra={
            "flip_partners": [p.id for p in partners],
            "logit_diff": {
                "contrast": "; ".join(p.o_true for p in partners),
                "grid": torch.tensor([x["grid"] for x in ld], dtype=torch.float64).mean(0).tolist(),
                "clean": sum(x["clean"] for x in ld) / len(ld),
                "corrupt": sum(x["corrupt"] for x in ld) / len(ld),
            },
        },
    )


def localize(
    model: HookedTransformer,
    fact: Fact,
    method: str,
    *,
    kind: str = "mlp",
    window: int | None = None,
    noise: GaussianNoise | None = None,
    partners: Sequence[Fact] = (),
) -> TraceResult:
    """The ``method`` grid of ``fact`` (for ``o_true``). ``noise``: the study's Gaussian noise (noise,
    attribution); ``partners``: the flip partners (flip; see :func:`flip_partners`)."""
    spec = LOCALIZATIONS[check_choice(method, LOCALIZATIONS, "localization method")]
    args = (model, fact.prompt, fact.subject, fact.o_true)
    if spec.corruption == "zero":
        return zero(*args, kind=kind, window=window)
    if spec.corruption == "flip":
        if not partners:
            raise NotEnoughPartnersError(f"{fact.id}: flip localization needs at least one partner")
        results = [trace(*args, kind=kind, window=window, noise=SubjectFlip(p.subject), contrast=p.o_true)
                   for p in partners]
        return _mean_flip(results, list(partners))
    return trace(*args, kind=kind, window=window, noise=noise if noise is not None else 3.0, algorithm=spec.algorithm)
