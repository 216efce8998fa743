"""What ROME, r-ROME and MEMIT read from the *unedited* model, computed once and shared by many edits.

A study edits each fact at several layers, with ROME, r-ROME, MEMIT and FT, under several problems. Per (request, objective,
noise, token, optimisation hyper-parameters) two things are the same for all of those edits:

* the v*/z optimisation at a layer: ROME and r-ROME optimise the very same v* (they differ only in the update solve,
  :mod:`editors.rome`), so the second one reuses the first's;
* the optimisations of the *other* layers the study will edit: they are independent, so they run together as one
  lockstep batch (:func:`editors.vstar.optimize_targets`), with one pass over the unedited batch for all of them;
  likewise FT-1's and FT-5's finetunings of a fact at all of its layer sets (:func:`editors.finetune.optimize_ft`).

:class:`TargetMemo` holds those results for one fact. Asked for a layer it has not computed, it computes the whole
*group* of layers its owner declared for that memo group (``groups``: ``{"hook_mlp_out": ROME's layers,
"hook_resid_post": MEMIT's z layers, "ft-1": FT-1's layer sets, ...}``, :func:`editors.methods.target_groups`) in one
batch, so the group — hence every float of the results — depends on
the plan only, never on which units a resumed run still has to do. It is valid for the model it first saw: a memo
asked while the weights differ (an edit is active) computes that request alone and keeps nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import HookedTransformer

from locedit.tracer.corruption import GaussianNoise

__all__ = ["TargetKey", "TargetMemo", "target_key", "weights_stamp"]

# the hyper-parameters the v*/z optimisation reads (ROME's and MEMIT's dataclasses share these names)
OPTIMISATION_FIELDS = ("v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                       "context_lengths", "early_stop_loss")


@dataclass(frozen=True)
class TargetKey:
    """Everything a v*/z optimisation depends on besides the model and the layer."""

    v_hook: str
    template: str
    subject: str
    target: str
    objective: str
    noise: tuple | None
    token: str | int
    fast: bool
    hparams: tuple


def _noise_key(noise: GaussianNoise | None) -> tuple | None:
    if noise is None:
        return None
    values = None if noise.values is None else hashlib.sha256(noise.values.detach().cpu().numpy().tobytes()).hexdigest()
    return (noise.sigma, noise.samples, noise.seed, noise.of, values)


def target_key(v_hook: str, request, objective: str, noise: GaussianNoise | None, token, fast: bool, hp,
               fields: tuple[str, ...] = OPTIMISATION_FIELDS) -> TargetKey:
    """The memo key of an edit's optimisation (``v_hook``: its memo group, :attr:`EditMethod.memo_group`; ``hp``: its
    hyper-parameters, of which ``fields`` count: for ROME / MEMIT only those the v*/z optimisation reads, so ROME and
    r-ROME under the same problem share one key; FT passes all of its fields)."""
    return TargetKey(v_hook=v_hook, template=request.template, subject=request.subject, target=request.target,
                     objective=objective, noise=_noise_key(noise), token=token, fast=fast,
                     hparams=tuple(getattr(hp, f) for f in fields))


@torch.no_grad()
def weights_stamp(model: HookedTransformer) -> tuple[float, ...]:
    """A cheap fingerprint of the weights edits change (float64 sums of every block's ``W_out`` and ``b_out``):
    equal before an edit and after its bit-identical restore, different while one is applied."""
    return tuple(float(p.sum(dtype=torch.float64)) for b in model.blocks for p in (b.mlp.W_out, b.mlp.b_out))


class TargetMemo:
    """Per-fact store of the unedited model's target optimisations (module docstring).

    Args:
        groups: per memo group (``"hook_mlp_out"``: ROME / r-ROME's v*; ``"hook_resid_post"``: MEMIT's z at the
            window's last layer; ``"ft-1"`` / ``"ft-5"``: the layer *sets* finetuned) the items (layers, or layer
            tuples for FT) computed together when any one of them is first asked for. An item outside its group is
            computed alone.

    Attributes:
        computed: layers optimised so far; ``reused``: requests answered from the store.
    """

    def __init__(self, groups: Mapping[str, Sequence[int]] | None = None):
        self.groups = {hook: tuple(sorted({tuple(int(y) for y in x) if isinstance(x, tuple) else int(x) for x in items}))
                       for hook, items in (groups or {}).items()}
        self._store: dict[tuple[TargetKey, int], Any] = {}
        self._stamp: tuple[float, ...] | None = None
        self.computed = 0
        self.reused = 0

    def clear(self) -> None:
        """Forget every result (the next fact)."""
        self._store.clear()

    def get(self, model: HookedTransformer, key: TargetKey, layer: int,
            compute: Callable[[tuple[int, ...]], Mapping[int, Any]]) -> Any:
        """The result at ``layer`` for ``key``: from the store, or ``compute(layers)`` (``{layer: result}``) for the
        whole group that contains ``layer``."""
        stamp = weights_stamp(model)
        if self._stamp is None:
            self._stamp = stamp
        if stamp != self._stamp:  # the model is not the one the store belongs to (an edit is active)
            self.computed += 1
            return compute((layer,))[layer]
        if (key, layer) in self._store:
            self.reused += 1
            return self._store[(key, layer)]
        group = self.groups.get(key.v_hook, ())
        layers = group if layer in group else (layer,)
        results = compute(layers)
        self.computed += len(layers)
        for x in layers:
            self._store[(key, x)] = results[x]
        return results[layer]

    def __len__(self) -> int:
        return len(self._store)

