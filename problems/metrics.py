"""Edit-success metrics of Hase et al. 2023 (§3.4, App. B) and Meng et al. 2022's unscaled metrics.

All functions are pure and work elementwise on Python floats, NumPy arrays or torch tensors (they return the same
kind: a float for floats, a tensor for tensors). ``p`` is the pre-edit probability p_θ(o | ·), ``p_star`` the
post-edit probability p_θ*(o | ·) of the scored target o.

Edge cases (no NaN is ever produced from probabilities in [0, 1]):

* :func:`rewrite_score` with p = 1: there is no room to improve, the denominator 1 − p is replaced by 1, so the score
  is the raw change p* − p (0 when the target stays certain, negative when it drops). This keeps the score ≤ 1 and
  continuous along p* = p (where (p* − p)/(1 − p) → 0).
* :func:`erasure_score` with p = 0: nothing to erase, the score is 0 (the numerator p − p* ≤ 0 is clipped at 0).
* :func:`neighborhood_score`: the denominator 0.5 + |p − 0.5| is ≥ 0.5, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "ngram_entropy",
    "rewrite_score",
    "erasure_score",
    "paraphrase_score",
    "neighborhood_score",
    "overall_score",
    "harmonic_mean",
    "essence_score",
    "perplexity_change",
    "success",
    "magnitude",
]


def _lib(x: Any):
    return torch if isinstance(x, torch.Tensor) else np


def _out(x: Any, like: Sequence[Any]):
    if any(isinstance(v, torch.Tensor) for v in like):
        return x
    if isinstance(x, np.ndarray) and x.ndim == 0 or np.isscalar(x):
        return float(x)
    return x


def _as(x: Any, like: Sequence[Any]):
    if any(isinstance(v, torch.Tensor) for v in like):
        return torch.as_tensor(x, dtype=torch.float64) if not isinstance(x, torch.Tensor) else x.double()
    return np.asarray(x, dtype=np.float64)


def rewrite_score(p_pre, p_post):
    """(p* − p) / (1 − p): the share of the possible increase of p(target) achieved by the edit (1 best, 0 no
    change, negative if the edit lowered it). At p = 1 the score is p* − p (see module docstring)."""
    like = (p_pre, p_post)
    p, ps = _as(p_pre, like), _as(p_post, like)
    lib = _lib(p)
    denom = 1.0 - p
    denom = lib.where(denom > 0, denom, lib.ones_like(denom))
    return _out((ps - p) / denom, like)


def erasure_score(p_pre, p_post):
    """max(0, (p − p*) / p): the share of p(o_true) the edit removed (1: all of it, 0: none or it increased).
    At p = 0 the score is 0."""
    like = (p_pre, p_post)
    p, ps = _as(p_pre, like), _as(p_post, like)
    lib = _lib(p)
    denom = lib.where(p > 0, p, lib.ones_like(p))
    s = (p - ps) / denom
    return _out(lib.clip(s, 0.0, None) if lib is np else s.clamp(min=0.0), like)


def paraphrase_score(p_pre, p_post, *, erase: bool = False, first_only: bool = False):
    """Mean over paraphrase prompts of the rewrite score (erasure score when ``erase``) of 1-D sequences of pre/post
    probabilities. ``first_only=True`` scores only the first paraphrase (the reference code's behaviour).
    Empty input gives NaN."""
    like = (p_pre, p_post)
    p, ps = _as(p_pre, like).reshape(-1), _as(p_post, like).reshape(-1)
    if first_only:
        p, ps = p[:1], ps[:1]
    if p.shape[0] == 0:
        return math.nan
    s = erasure_score(p, ps) if erase else rewrite_score(p, ps)
    return float(s.mean())


def neighborhood_score(p_pre, p_post, *, first_only: bool = False, mean: bool = True):
    """1 − |p* − p| / (0.5 + |p − 0.5|) per neighborhood prompt (1: unchanged, 0: moved as far as possible),
    averaged over all prompts (``mean=False``: elementwise). ``first_only``: only the first prompt."""
    like = (p_pre, p_post)
    p, ps = _as(p_pre, like), _as(p_post, like)
    lib = _lib(p)
    s = 1.0 - lib.abs(ps - p) / (0.5 + lib.abs(p - 0.5))
    if not mean:
        return _out(s, like)
    s = s.reshape(-1)
    if first_only:
        s = s[:1]
    if s.shape[0] == 0:
        return math.nan
    return float(s.mean())


def overall_score(rewrite: float, paraphrase: float, neighborhood: float) -> float:
    """Hase et al.'s overall score: the plain mean of the three scores (NaN entries are ignored)."""
    vals = [v for v in (rewrite, paraphrase, neighborhood) if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def harmonic_mean(*scores: float) -> float:
    """Meng et al.'s aggregate: harmonic mean of scores clipped to [0, 1] (0 if any clipped score is 0; NaN entries
    ignored). Meant for success rates (ES, PS, NS); for the scaled scores it is a stricter overall score."""
    vals = [min(1.0, max(0.0, float(v))) for v in scores if not math.isnan(float(v))]
    if not vals:
        return math.nan
    if any(v == 0.0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def perplexity_change(ppl_pre, ppl_post):
    """Δppl = ppl_post − ppl_pre."""
    like = (ppl_pre, ppl_post)
    return _out(_as(ppl_post, like) - _as(ppl_pre, like), like)


def essence_score(ppl_pre, ppl_post, cap: float = 5.0):
    """1 − clip(ppl_post − ppl_pre, 0, cap) / cap: 1 when the essence texts' perplexity did not rise (slight decreases
    are capped at 1), 0 when it rose by ``cap`` (5) or more."""
    like = (ppl_pre, ppl_post)
    d = _as(ppl_post, like) - _as(ppl_pre, like)
    lib = _lib(d)
    d = lib.clip(d, 0.0, cap) if lib is np else d.clamp(0.0, cap)
    return _out(1.0 - d / cap, like)


def success(p_new, p_old):
    """Meng et al.'s success indicator p(o_new) > p(o_old) as a float (1.0/0.0) elementwise; its mean over facts is
    ES/PS. For neighborhood success (NS) call it with the arguments swapped: p(o_true) > p(o_new)."""
    like = (p_new, p_old)
    a, b = _as(p_new, like), _as(p_old, like)
    return _out((a > b).double() if isinstance(a, torch.Tensor) else (a > b).astype(np.float64), like)


def magnitude(p_new, p_old):
    """Meng et al.'s magnitude p(o_new) − p(o_old) elementwise (EM/PM; NM with the arguments swapped)."""
    like = (p_new, p_old)
    return _out(_as(p_new, like) - _as(p_old, like), like)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """Meng et al. (2022) §3.3 generation entropy (GE) of one text: the weighted mean over n of the n-gram entropy
    −Σ_k f(k) log₂ f(k) (f: the n-gram frequency distribution), bi- and tri-grams weighted 2/3 and 4/3 as in ROME's
    ``compute_n_gram_entropy``; it drops when a generation repeats itself. Words are split by ``\w+|[^\w\s]``
    (ROME uses nltk's word_tokenize, whose punkt data cannot be downloaded here; the two agree on plain prose up to
    contractions). NaN for a text too short to have an n-gram of every order."""
    import re
    from collections import Counter

    words = re.findall(r"\w+|[^\w\s]", text)
    values = []
    for n in ns:
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if total == 0:
            return math.nan
        values.append(-sum(c / total * math.log2(c / total) for c in grams.values()))
    return sum(v * w for v, w in zip(values, weights)) / len(values)
