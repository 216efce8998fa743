"""The one forward path from tokens to the logits locedit scores.

Every probability locedit reports is read at a handful of positions (the teacher-forced target positions, or a
prompt's last token). The unembedding is the costliest matrix of small models with large vocabularies (Gemma 3
270M: 640 × 262,144, more multiply-adds per position than all 18 blocks together), so the model is run only up to
its final residual stream (``stop_at_layer=n_layers``) and ``ln_final`` + ``unembed`` (+ the output soft-cap where
the config has one) are applied at the scored positions only. :func:`logits_from_resid` is that final step;
:func:`scored_logits` the whole path. Both equal ``model(tokens)[rows, positions]`` up to float rounding
(tests/test_models.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer

__all__ = ["logits_from_resid", "scored_logits"]


def logits_from_resid(model: HookedTransformer, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """``unembed(ln_final(resid))`` with the config's output soft-cap (Gemma 2), for residuals of any leading shape."""
    lead = resid.shape[:-1]
    x = resid.reshape(1, -1, resid.shape[-1])
    logits = model.unembed(model.ln_final(x))
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits.reshape(*lead, logits.shape[-1])


def scored_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, "m"] | Int[Tensor, "batch m"],
    *,
    fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
    cache_names: Iterable[str] | None = None,
) -> tuple[Float[Tensor, "batch m d_vocab"], ActivationCache | None]:
    """Logits at ``positions`` (shared ``[m]`` or per row ``[batch, m]``) of a forward pass with ``fwd_hooks``;
    with ``cache_names`` also a cache of those activations (else None). Differentiable under grad mode."""
    n = model.cfg.n_layers
    tokens = tokens.to(model.cfg.device)
    if cache_names is None:
        resid, cache = model.run_with_hooks(tokens, stop_at_layer=n, fwd_hooks=list(fwd_hooks)), None
    else:
        wanted = set(cache_names)
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            resid, cache = model.run_with_cache(tokens, stop_at_layer=n, names_filter=lambda name: name in wanted)
    positions = positions.to(resid.device)
    if positions.dim() == 1:
        picked = resid[:, positions]
    else:
        picked = resid.gather(1, positions[..., None].expand(-1, -1, resid.shape[-1]))
    return logits_from_resid(model, picked), cache
