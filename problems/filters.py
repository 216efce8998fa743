"""Which facts a model knows: the paper's correctness filter (App. A) and Fact Erasure's probability filter.

* :func:`greedy_continuations` decodes ``n`` greedy tokens for many prompts at once. Prompts are grouped by token
  length, so every batch is rectangular: no padding, hence no attention mask and no rotary-position shift (this
  model has no BOS token to pad with, and TransformerLens' left padding would shift rotary positions). Each group is
  decoded with ``model.generate(do_sample=False, use_past_kv_cache=True, stop_at_eos=False)``; tests check that it
  equals one-prompt, cache-free argmax decoding.
* :func:`known_mask` marks a fact *known* when ``o_true.strip()`` occurs in the decoded text of the first 36 greedy
  tokens (Hase et al. App. A). Verdicts are cached per model on disk in
  ``tracer.models.cache_dir()/"filters"/<model id>-known<n_tokens>.json``, one entry per fact (id + hash of its
  prompt and o_true), written after every chunk (resumable).
* :func:`min_target_prob_mask`: ``p(o_true | s, r) >= 0.02`` (the Fact Erasure filter, n = 489 for GPT-J).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from transformer_lens import HookedTransformer

from locedit.problems.facts import Fact
from locedit.tracer.models import cache_dir, model_id
from locedit.tracer.atomic import read_checked_json, write_checked_json
from locedit.tracer.probs import target_probs
from locedit.tracer.tokens import encode

__all__ = [
    "KNOWN_N_TOKENS",
    "MIN_TARGET_PROB",
    "greedy_continuations",
    "known_mask",
    "filter_known",
    "min_target_prob_mask",
    "filter_min_target_prob",
    "first_passing",
]

KNOWN_N_TOKENS = 36
MIN_TARGET_PROB = 0.02


@torch.no_grad()
def greedy_continuations(
    model: HookedTransformer,
    prompts: Sequence[str],
    n_tokens: int = KNOWN_N_TOKENS,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The decoded text of ``n_tokens`` greedy tokens after each prompt (BOS only where the profile says, EOS not a
    stop)."""
    toks = [encode(model, p) for p in prompts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(toks):
        if t.numel() == 0:
            raise ValueError(f"prompt {prompts[i]!r} tokenizes to nothing")
        groups[int(t.numel())].append(i)
    out: list[str | None] = [None] * len(prompts)
    for _, idx in sorted(groups.items()):
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo : lo + batch_size]
            batch = torch.stack([toks[i] for i in chunk]).to(model.cfg.device)
            gen = model.generate(
                batch,
                max_new_tokens=n_tokens,
                do_sample=False,
                use_past_kv_cache=True,
                stop_at_eos=False,
                verbose=False,
                return_type="tokens",
            )
            new = gen[:, batch.shape[1] :].cpu()
            for row, i in enumerate(chunk):
                out[i] = model.tokenizer.decode(new[row].tolist())
            if progress is not None:
                progress(sum(o is not None for o in out), len(prompts))
    return out  # type: ignore[return-value]


def _fact_key(f: Fact) -> str:
    h = hashlib.sha256(f"{f.prompt}\x00{f.o_true}".encode()).hexdigest()[:12]
    return f"{f.id}|{h}"


def _cache_path(model: HookedTransformer, n_tokens: int):
    return cache_dir() / "filters" / f"{model_id(model)}-known{n_tokens}.json"


def _read_cache(path) -> dict:
    try:
        data = read_checked_json(path)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path, new: dict) -> None:
    data = _read_cache(path)  # merge with what another process may have written meanwhile
    data.update(new)
    write_checked_json(path, data)


def known_mask(
    model: HookedTransformer,
    facts: Sequence[Fact],
    n_tokens: int = KNOWN_N_TOKENS,
    *,
    use_cache: bool = True,
    batch_size: int = 64,
    chunk_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> list[bool]:
    """Per fact: does ``o_true.strip()`` occur in the first ``n_tokens`` greedy tokens after ``fact.prompt``?

    Verdicts are cached per fact (key: fact id + hash of prompt and o_true) in one JSON file per (model,
    n_tokens), which also stores each continuation; facts are decoded in chunks of ``chunk_size`` and the cache is
    written after every chunk, so an interrupted run resumes where it stopped."""
    path = _cache_path(model, n_tokens)
    cache = _read_cache(path) if use_cache else {}
    todo = [f for f in facts if _fact_key(f) not in cache]
    done = len(facts) - len(todo)
    for lo in range(0, len(todo), chunk_size):
        chunk = todo[lo : lo + chunk_size]
        conts = greedy_continuations(model, [f.prompt for f in chunk], n_tokens, batch_size)
        new = {_fact_key(f): {"known": f.o_true.strip() in c, "continuation": c} for f, c in zip(chunk, conts)}
        cache.update(new)
        if use_cache:
            _write_cache(path, new)
        done += len(chunk)
        if progress is not None:
            progress(done, len(facts))
    return [bool(cache[_fact_key(f)]["known"]) for f in facts]


def continuations(model: HookedTransformer, facts: Sequence[Fact], n_tokens: int = KNOWN_N_TOKENS) -> dict:
    """The cached greedy continuations by fact id (only the facts already decoded by :func:`known_mask`)."""
    cache = _read_cache(_cache_path(model, n_tokens))
    return {f.id: cache[_fact_key(f)]["continuation"] for f in facts if _fact_key(f) in cache}


def filter_known(model: HookedTransformer, facts: Sequence[Fact], **kw) -> list[Fact]:
    """The facts the model knows (see :func:`known_mask`)."""
    return [f for f, k in zip(facts, known_mask(model, facts, **kw)) if k]


def min_target_prob_mask(
    model: HookedTransformer, facts: Sequence[Fact], threshold: float = MIN_TARGET_PROB, batch_size: int = 32
) -> list[bool]:
    """Per fact: ``p(o_true | s, r) >= threshold`` (teacher-forced, multi-token targets as a product)."""
    if not facts:
        return []
    p = target_probs(model, [f.prompt for f in facts], [f.o_true for f in facts], batch_size=batch_size)
    return [bool(x >= threshold) for x in p.tolist()]


def filter_min_target_prob(
    model: HookedTransformer, facts: Sequence[Fact], threshold: float = MIN_TARGET_PROB, **kw
) -> list[Fact]:
    """The facts with ``p(o_true | s, r) >= threshold`` (Fact Erasure's filter)."""
    return [f for f, k in zip(facts, min_target_prob_mask(model, facts, threshold, **kw)) if k]


def _main() -> None:  # `python -m locedit.problems [limit]`: run and cache the CounterFact correctness filter
    import sys
    import time

    from locedit.problems.facts import load_counterfact
    from locedit.tracer import load_model

    model = load_model(device=None)
    facts = load_counterfact(limit=int(sys.argv[1]) if len(sys.argv) > 1 else None)
    t0 = time.time()
    known = known_mask(
        model,
        facts,
        progress=lambda d, n: print(f"{d}/{n} decoded, {time.time() - t0:.0f} s", flush=True),
    )
    print(f"known: {sum(known)} of {len(facts)} CounterFact facts ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    _main()


def first_passing(
    model: HookedTransformer,
    facts: Sequence[Fact],
    n: int,
    mask: Callable[[HookedTransformer, Sequence[Fact]], list[bool]] | None = None,
    chunk: int = 32,
) -> list[Fact]:
    """The first ``n`` facts, in the given order, passing ``mask`` (default :func:`known_mask`), checked lazily in
    chunks of ``chunk`` facts so that a small selection does not filter a whole dataset (``known_mask`` caches)."""
    mask = known_mask if mask is None else mask
    out: list[Fact] = []
    for lo in range(0, len(facts), chunk):
        part = list(facts[lo : lo + chunk])
        out += [f for f, ok in zip(part, mask(model, part)) if ok]
        if len(out) >= n:
            break
    return out[:n]
