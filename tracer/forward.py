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

from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer

__all__ = ["ResidCheckpoints", "logits_from_resid", "scored_logits"]


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
    checkpoints: ResidCheckpoints | None = None,
    key: Hashable = None,
    changed_from: int | None = None,
) -> tuple[Float[Tensor, "batch m d_vocab"], ActivationCache | None]:
    """Logits at ``positions`` (shared ``[m]`` or per row ``[batch, m]``) of a forward pass with ``fwd_hooks``;
    with ``cache_names`` also a cache of those activations (else None). Differentiable under grad mode.

    ``checkpoints``, ``key``, ``changed_from``: with ``changed_from`` None (an unedited model) record this pass's
    residual stream at the checkpoint blocks under ``key``; with ``changed_from = l`` (an edit changed blocks
    ``l..`` only) run just the blocks from the highest checkpoint ``<= l`` recorded under ``key``
    (:class:`ResidCheckpoints`; ``fwd_hooks`` then act from that block on)."""
    n = model.cfg.n_layers
    tokens = tokens.to(model.cfg.device)
    start = checkpoints.start(key, changed_from) if checkpoints is not None and changed_from is not None else None
    if start is not None and cache_names is None:
        layer, resid_in = start
        resid, cache = model.run_with_hooks(resid_in, start_at_layer=layer, stop_at_layer=n,
                                            fwd_hooks=list(fwd_hooks)), None
    elif cache_names is None:
        record = checkpoints.record_hooks(key) if checkpoints is not None and changed_from is None else []
        resid, cache = model.run_with_hooks(tokens, stop_at_layer=n, fwd_hooks=list(fwd_hooks) + record), None
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


class ResidCheckpoints:
    """The residual stream entering a few blocks (``layers``) in an unedited model's scoring passes, recorded once
    per pass (under a caller's key: a chunk of a batch) and reused after an edit to rerun only the blocks the edit
    can change.

    An edit of blocks ``l..`` leaves every activation below block ``l`` unchanged, so a pass may start at the highest
    checkpoint ``c <= l`` from its recorded ``blocks.{c}.hook_resid_pre`` — the same tensor the full pass would
    recompute, bit for bit — instead of from the embedding. Protocol: pass the object to :func:`scored_logits` on
    the unedited model (it records), then score the same passes inside an edit with ``changed_from`` = the edit's
    lowest block (they resume). Only the caller knows that the model is unedited when it records.

    Attributes:
        layers: the checkpoint blocks (sorted).
    """

    def __init__(self, layers: Iterable[int]):
        self.layers = tuple(sorted({int(x) for x in layers}))
        self._saved: dict[Hashable, dict[int, Tensor]] = {}

    def record_hooks(self, key: Hashable) -> list[tuple[str, Callable]]:
        """Hooks that store this pass's input to every checkpoint block under ``key``."""
        saved = self._saved.setdefault(key, {})

        def save(x: Tensor, hook) -> None:
            saved[int(hook.name.split(".")[1])] = x.detach().clone()

        return [(f"blocks.{layer}.hook_resid_pre", save) for layer in self.layers if layer > 0]

    def start(self, key: Hashable, changed_from: int) -> tuple[int, Tensor] | None:
        """``(c, resid)`` to resume the pass recorded under ``key`` from, or None (nothing recorded, or no
        checkpoint at or below block ``changed_from``: run the whole model)."""
        if key not in self._saved:
            return None
        below = [c for c in self._saved[key] if c <= changed_from]
        if not below:
            return None
        c = max(below)
        return c, self._saved[key][c]

    def __len__(self) -> int:
        return sum(len(v) for v in self._saved.values())
