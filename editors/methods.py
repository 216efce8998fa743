"""The edit-method registry: every name ``edit``/``apply``, ``run_edit``, the study config, the CLI and the stats
labels accept comes from :data:`EDIT_METHODS`.

An :class:`EditMethod` carries its editor (the function that edits the model in place), its hyper-parameter class,
its layer rule (how many layers around a centre layer a study edits: 1 for ROME and FT-1, the 5-layer window of
:func:`tracer.vocab.window_layers` for MEMIT and FT-5), the weights it changes, and its label. Adding a method is one
entry here (plus its hyper-parameter overrides in a model profile, if it needs any); see docs/CONTRACTS.md.

``"ft"`` is accepted by :func:`resolve_method` as the algorithm name of FT-1/FT-5 (the layers are then given
explicitly), which is how ``edit(..., method="ft", layers=[...])`` reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Literal, get_args

from locedit.editors.finetune import execute_ft
from locedit.editors.hparams import FTHyperParams, HyperParams, MEMITHyperParams, ROMEHyperParams
from locedit.editors.memit import execute_memit
from locedit.editors.rome import execute_rome
from locedit.editors.tokens import check_edit_token
from locedit.tracer.profiles import profile_for
from locedit.tracer.vocab import check_choice, window_layers

__all__ = ["DEFAULT_METHOD", "EDIT_METHODS", "METHOD_ALIASES", "EditMethod", "EditMethodName", "default_hparams",
           "lowest_edited_layers", "method_layers", "resolve_method", "target_groups"]

EditMethodName = Literal["ft-1", "ft-5", "rome", "memit", "r-rome"]  # the paper's table order, then r-ROME


@dataclass(frozen=True)
class EditMethod:
    """One edit method.

    Attributes:
        name: the registry key (``"ft-5"``).
        label: display label (``"FT (5 layers)"``).
        execute: ``execute(model, request, layers, hp, objective, noise, *, covariance, fast, token, targets)
            -> EditResult``; edits
            the model in place (``edit``/``apply`` snapshot and restore around it).
        hparams: the hyper-parameter dataclass (its defaults are the reference GPT-J values).
        window: layers a study edits around its centre layer (1: the layer itself; 5: ``window_layers(l, 5, L)``).
        weights: the parameters changed in each edited block's MLP.
        single_layer: the algorithm edits exactly one layer (ROME).
        uses_token: the algorithm reads keys at one token position (ROME, MEMIT: ``token=`` chooses it); a study
            edits such a method once per ``[editing] tokens`` rule, the others once.
        key_statistics: the update reads the key second moment C of each edited layer (ROME with
            ``mom2_adjustment``, MEMIT): a study computes C for all of its layers in one pass before the first edit.
        target_hook: the hook whose vector the method optimises on the unedited model, at the highest layer it
            edits (ROME, r-ROME: v* at ``hook_mlp_out``; MEMIT: z at ``hook_resid_post``), or None (FT). Methods with
            the same hook and hyper-parameters share that optimisation, and a study optimises a fact's layers
            together (:class:`editors.targets.TargetMemo`).
        lockstep_weights: the method optimises the weights themselves (FT): a study finetunes a fact at all of its
            layer sets together (:func:`editors.finetune.optimize_ft`), each set its own memo item.
    """

    name: str
    label: str
    execute: Callable
    hparams: type
    window: int
    weights: tuple[str, ...] = ("W_out",)
    single_layer: bool = False
    uses_token: bool = True
    key_statistics: bool = True
    target_hook: str | None = None
    lockstep_weights: bool = False

    @property
    def memo_group(self) -> str | None:
        """The :class:`editors.targets.TargetMemo` group of this method's optimisations: its target hook (shared by
        ROME and r-ROME), its own name for a weight-optimising method (FT-1, FT-5), None when nothing is shared."""
        return self.target_hook if self.target_hook is not None else self.name if self.lockstep_weights else None

    def memo_item(self, layers) -> int | tuple[int, ...] | None:
        """What identifies an edit of ``layers`` within its memo group: the target layer, or the layer set (FT)."""
        return self.target_layer(layers) if self.target_hook is not None else tuple(sorted(layers))

    def edit_token(self, token: object) -> str | int | None:
        """The one decision of where this method edits: ``token`` as a canonical rule
        (:func:`editors.tokens.check_edit_token`) for a method that reads keys at a position, None for one that has
        no key position (constrained finetuning descends the NLL through every position of the prompt at once)."""
        return check_edit_token(token) if self.uses_token else None

    def target_layer(self, layers) -> int | None:
        """The layer of the vector this method optimises when it edits ``layers`` (the highest), None without one."""
        return max(layers) if self.target_hook is not None else None

    def parameter_names(self, layers) -> list[str]:
        """``blocks.{l}.mlp.{weight}`` for every edited layer and weight."""
        return [f"blocks.{layer}.mlp.{w}" for layer in layers for w in self.weights]


def _rome(model, request, layers, hp, objective, noise, **kwargs):
    return execute_rome(model, request, layers[0], hp, objective, noise, **kwargs)


def _r_rome(model, request, layers, hp, objective, noise, **kwargs):
    return execute_rome(model, request, layers[0], hp, objective, noise, consistent_keys=True, **kwargs)


def _ft(group, model, request, layers, hp, objective, noise, *, covariance=None, fast=True, token=None, targets=None):
    # no key statistics, no token (EditMethod.edit_token gives None: uses_token=False); a study's finetunings of one
    # request at all of its layer sets run in lockstep through the memo (group: the method's memo group)
    return execute_ft(model, request, layers, hp, objective, noise, fast=fast, targets=targets, group=group)


EDIT_METHODS: Mapping[str, EditMethod] = MappingProxyType({
    "ft-1": EditMethod("ft-1", "FT (1 layer)", partial(_ft, "ft-1"), FTHyperParams, window=1,
                       weights=("W_out", "b_out"), uses_token=False, key_statistics=False, lockstep_weights=True),
    "ft-5": EditMethod("ft-5", "FT (5 layers)", partial(_ft, "ft-5"), FTHyperParams, window=5,
                       weights=("W_out", "b_out"), uses_token=False, key_statistics=False, lockstep_weights=True),
    "rome": EditMethod("rome", "ROME (1 layer)", _rome, ROMEHyperParams, window=1, single_layer=True,
                       target_hook="hook_mlp_out"),
    "memit": EditMethod("memit", "MEMIT (5 layers)", execute_memit, MEMITHyperParams, window=5,
                        target_hook="hook_resid_post"),
    "r-rome": EditMethod("r-rome", "r-ROME (1 layer)", _r_rome, ROMEHyperParams, window=1, single_layer=True,
                         target_hook="hook_mlp_out"),
})
assert tuple(EDIT_METHODS) == get_args(EditMethodName)

DEFAULT_METHOD = "rome"
"""The method a study edits with when its config names none (the paper's headline editor)."""

# algorithm names accepted where layers are explicit (edit/apply): "ft" is FT-1's entry with any layers
METHOD_ALIASES: Mapping[str, str] = MappingProxyType({"ft": "ft-1"})


def resolve_method(method: str, *, aliases: bool = True) -> EditMethod:
    """The registry entry of ``method`` (case-insensitive; with ``aliases``, ``"ft"`` → FT-1's entry);
    ``ValueError`` naming the choices for an unknown one. Study-level callers (a centre layer, not explicit layers)
    pass ``aliases=False``: there "ft" would be ambiguous between FT-1 and FT-5."""
    m = method.lower() if isinstance(method, str) else method
    if aliases:
        m = METHOD_ALIASES.get(m, m)
    return EDIT_METHODS[check_choice(m, EDIT_METHODS, "edit method")]


def default_hparams(method: str, model="smollm2-135m") -> HyperParams:
    """Default hyper-parameters of edit ``method`` for a model (a HookedTransformer or a name): the method's
    dataclass (reference GPT-J values) with the model profile's overrides (:mod:`tracer.profiles`; an unknown model
    gets the fallback profile, i.e. the reference values)."""
    entry = resolve_method(method)
    return dataclasses.replace(entry.hparams(), **profile_for(model).hparam_overrides(entry.name))


def method_layers(method: str, n_layers: int, layer: int) -> tuple[int, ...]:
    """The layers ``method`` edits in a study centred on ``layer``: ``window_layers(layer, window, n_layers)``
    (rome/ft-1 → (layer,); memit/ft-5 → layer−2..layer+2, clipped).

    Raises:
        ValueError: unknown method (aliases refused); ``LayerOutOfRangeError``: ``layer`` not in [0, n_layers).
    """
    from locedit.editors.requests import LayerOutOfRangeError

    entry = resolve_method(method, aliases=False)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise LayerOutOfRangeError(
            f"edit layer {layer!r} is out of range: the model has n_layers={n_layers} (valid: 0..{n_layers - 1})"
        )
    return tuple(window_layers(layer, entry.window, n_layers))


def target_groups(methods, n_layers: int, layers) -> dict[str, tuple]:
    """Per memo group of ``methods`` (:attr:`EditMethod.memo_group`: a target hook, or FT-1 / FT-5), the items their
    edits at (centre) ``layers`` optimise (:meth:`EditMethod.memo_item`: layers of the target vector, or FT's layer
    sets): a fact's optimisations of one group run as one lockstep batch (:class:`editors.targets.TargetMemo`)."""
    out: dict[str, set] = {}
    for m in methods:
        entry = resolve_method(m, aliases=False)
        if entry.memo_group is not None:
            out.setdefault(entry.memo_group, set()).update(
                entry.memo_item(method_layers(m, n_layers, layer)) for layer in layers)
    return {group: tuple(sorted(v)) for group, v in out.items()}


def lowest_edited_layers(methods, n_layers: int, layers) -> tuple[int, ...]:
    """The lowest edited layer of every edit of ``methods`` at (centre) ``layers``: where a fact's pre-edit scoring
    records its residual stream so that each post-edit scoring reruns only the blocks from there
    (:class:`problems.run.ScoringCheckpoints`)."""
    return tuple(sorted({min(method_layers(m, n_layers, layer)) for m in methods for layer in layers}))
