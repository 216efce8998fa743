"""Context templates for ROME/MEMIT: ``"{}"`` plus short texts sampled from the model, each followed by ". {}".

The reference code samples from the end-of-text token (ROME) or from the start words "The", "Therefore",
"Because", "I", "You" (MEMIT). The embedded model has no BOS, so we always use the MEMIT start words: for each
``(length, n)`` in ``context_lengths``, ``n`` texts of ``length`` tokens (start word included), the start words
cycled, sampled top-k 5 with a seeded generator. ``((5, 10), (10, 10))`` gives ROME's 21 templates.
Templates are cached as JSON under ``cache_dir()/"templates"`` keyed by model id, lengths and seed.
"""

from __future__ import annotations


import torch
from transformer_lens import HookedTransformer

from locedit.tracer.models import cache_dir, model_id
from locedit.tracer.atomic import read_checked_json, write_checked_json
from locedit.tracer.forward import scored_logits
from locedit.tracer.tokens import bos_ids, encode

__all__ = ["START_WORDS", "context_templates", "sample_texts", "template_group_sizes"]

START_WORDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def sample_texts(
    model: HookedTransformer, starts: list[str], length: int, top_k: int = 5, seed: int = 0
) -> list[str]:
    """Sample ``len(starts)`` continuations (top-k) so that each text has ``length`` tokens including its start."""
    gen = torch.Generator().manual_seed(seed)
    rows = [encode(model, s) for s in starts]
    n0 = min(int(r.shape[0]) for r in rows)
    toks = torch.stack([r[:n0] for r in rows]).to(model.cfg.device)
    while toks.shape[1] < length:
        logits = scored_logits(model, toks, torch.tensor([toks.shape[1] - 1]))[0][:, 0].float().cpu()
        vals, idx = logits.topk(top_k, dim=-1)
        choice = torch.multinomial(vals.softmax(-1), 1, generator=gen)
        nxt = idx.gather(1, choice).to(toks.device)
        toks = torch.cat([toks, nxt], dim=1)
    n_bos = len(bos_ids(model))  # a BOS the profile prepends is not part of the template's text
    return [model.tokenizer.decode(t[n_bos:].tolist()) for t in toks]


def template_group_sizes(context_lengths: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """Sizes of the template groups :func:`context_templates` returns, in order: ``"{}"`` alone, then ``n`` per
    ``(length, n)``. E.g. MEMIT's ``((10, 5),)`` → ``(1, 5)``; ROME's ``((5, 10), (10, 10))`` → ``(1, 10, 10)``."""
    return (1, *(int(n) for _, n in context_lengths))


def context_templates(
    model: HookedTransformer,
    context_lengths: tuple[tuple[int, int], ...],
    seed: int = 0,
    cache: bool = True,
) -> tuple[str, ...]:
    """``("{}", "<text>. {}", ...)`` for the given ``((length, n), ...)``; cached on disk per model."""
    key = f"{model_id(model)}-" + "_".join(f"{a}x{b}" for a, b in context_lengths) + f"-s{seed}"
    path = cache_dir() / "templates" / f"{key}.json"
    cached = read_checked_json(path) if cache else None
    if cached is not None:
        return tuple(cached)
    out = ["{}"]
    for i, (length, n) in enumerate(context_lengths):
        starts = [START_WORDS[j % len(START_WORDS)] for j in range(n)]
        texts = sample_texts(model, starts, length, seed=seed + 1000 * i)
        out += [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]
    if cache:
        write_checked_json(path, out)
    return tuple(out)
