"""Fluency of free generations (Meng et al. 2022 §3.3, "GE"): the mean n-gram entropy
(:func:`problems.metrics.ngram_entropy`) of one top-k (k = 5) generation per CounterFact ``generation_prompts``
entry, each generated to 100 tokens in all (prompt included, ROME's ``generate_fast(..., max_out_len=100)``), the text
scored with its prompt as in ROME. The same seeds are used before and after an edit, so the difference reflects the
edit, not the sampling. Meng et al.'s *consistency* score (TF-IDF similarity to reference Wikipedia snippets about
subjects sharing o*) needs their attribute snippets and IDF tables, which are not vendored; it is not computed.
"""

from __future__ import annotations

import math

import torch
from transformer_lens import HookedTransformer

from locedit.problems.essence import sample_tokens
from locedit.problems.metrics import ngram_entropy
from locedit.tracer.atomic import read_checked_json, write_checked_json
from locedit.tracer.models import cache_dir, model_id
from locedit.tracer.tokens import encode

__all__ = ["MAX_LEN", "generation_entropy", "generate_texts", "unedited_generation_entropy"]

MAX_LEN = 100


@torch.no_grad()
def generate_texts(
    model: HookedTransformer, prompts: tuple[str, ...] | list[str], *, max_len: int = MAX_LEN, top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """One top-k generation per prompt, ``max_len`` tokens in all (prompts of one length sampled as one batch with
    seed ``seed + length``), decoded with the prompt, in the prompts' order."""
    ids = [encode(model, p) for p in prompts]
    out: list[str | None] = [None] * len(ids)
    for length in sorted({int(t.shape[0]) for t in ids}):
        which = [i for i, t in enumerate(ids) if t.shape[0] == length]
        gen = sample_tokens(model, torch.stack([ids[i] for i in which]), max(1, max_len - length), top_k=top_k,
                            seed=seed + length)
        for i, row in zip(which, gen):
            out[i] = model.tokenizer.decode(row.tolist(), skip_special_tokens=True)
    return out  # type: ignore[return-value]


def generation_entropy(model: HookedTransformer, prompts, **kwargs) -> float:
    """Mean generation entropy over one generation per prompt (NaN without prompts)."""
    if not prompts:
        return math.nan
    values = [ngram_entropy(t) for t in generate_texts(model, prompts, **kwargs)]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def unedited_generation_entropy(model: HookedTransformer, prompts, **kwargs) -> float:
    """:func:`generation_entropy` of the model *as loaded* (call it only on an unedited model), cached on disk per
    (model, prompts, settings) like the essence texts: every edit of a fact shares its pre-edit fluency."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps([list(prompts), sorted(kwargs.items())]).encode()).hexdigest()[:20]
    path = cache_dir() / "fluency" / model_id(model) / f"{key}.json"
    cached = read_checked_json(path)
    if cached is not None:
        return float(cached["entropy"])
    value = generation_entropy(model, prompts, **kwargs)
    write_checked_json(path, {"prompts": list(prompts), "entropy": value})
    return value
