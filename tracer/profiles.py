"""Model profiles: everything locedit knows about a model family, as data, in one place.

A :class:`ModelProfile` holds a family's default edit layer, its editors' hyper-parameters (overrides of the
reference GPT-J values in :mod:`editors.hparams`, per edit method), the paper's App. A overrides per problem × edit
method, the BOS convention and whether the lean fast path may be used. Everything else reads
it through :func:`profile_for`:

* ``editors.default_hparams`` / ``problems.problem_hparams`` — hyper-parameters;
* ``locedit`` — the default edit layers of a study and ``locedit tune``'s layer;
* :func:`tracer.tokens.encode` / ``locate_subject`` — whether a BOS token starts every prompt;
* :func:`tracer.lean.lean_supported` — whether the lean blocks may be used (the config must allow them too).

A family's *tuned* table — the App. A table ``locedit tune`` measured for that model by the paper's rule, and the
default edit layer its layer sweep chose — is data shipped beside this module (``data/tuned/<family>.json``, written
by :func:`locedit.tuning.write_tuned_table`, read here by :func:`read_tuned_table`): its entries replace the
inherited (GPT-J) App. A values per (problem, method), each with its provenance (facts, layer, grid, rule, measured
table, date).

Adding a model family is one :data:`PROFILES` entry (see docs/CONTRACTS.md). A model no profile matches gets
:data:`FALLBACK_PROFILE`: the reference (GPT-J) hyper-parameters and App. A table, the paper's edit layer 5 of 28
scaled to its depth, no BOS, the lean path where its configuration allows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = ["FALLBACK_PROFILE", "PROFILES", "TUNED_DIR", "TUNED_FORMAT", "ModelProfile", "TunedTableError",
           "profile_for", "read_tuned_table", "with_tuned_table"]

TUNED_DIR = Path(__file__).parent / "data" / "tuned"
"""Where the shipped tuned tables live (``<family>.json``)."""

TUNED_FORMAT = 1
"""Version of the tuned-table JSON layout (:func:`read_tuned_table`)."""


class TunedTableError(ValueError):
    """A tuned table that is not one: wrong format version, a missing field, an unknown problem or method."""

Overrides = Mapping[str, Any]


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(d)


@dataclass(frozen=True)
class ModelProfile:
    """One model family.

    Attributes:
        family: the family's name (``"smollm2"``, ``"gpt-j"``, ...).
        matches: lower-case substrings of ``model.cfg.model_name`` (or a hub/loader name) that select the profile.
        default_edit_layer: the family's default ROME layer (0-indexed), or None for the paper's GPT-J layer 5 of
            28 scaled to the model's depth (:meth:`edit_layer`).
        editor_hparams: per edit method (``"rome"``, ``"memit"``, ``"ft-1"``, ...), field overrides of the
            reference hyper-parameter dataclass.
        problem_hparams: per (problem, edit method), Hase et al. App. A overrides applied on top.
        prepend_bos: every prompt starts with the tokenizer's BOS token (subject spans shift by one).
        lean_fast_path: the lean suffix blocks may be used (they are used only where the config allows them).
        tuned: per (problem, edit method), the overrides ``locedit tune`` chose for this model (applied on top of
            ``problem_hparams``; empty where the family was not tuned).
        tuned_edit_layer: the default edit layer a ``locedit tune --layers`` sweep chose (overrides
            ``default_edit_layer``), or None.
    """

    family: str
    matches: tuple[str, ...]
    default_edit_layer: int | None = None
    editor_hparams: Mapping[str, Overrides] = field(default_factory=dict)
    problem_hparams: Mapping[tuple[str, str], Overrides] = field(default_factory=dict)
    prepend_bos: bool = False
    lean_fast_path: bool = True
    tuned: Mapping[tuple[str, str], Overrides] = field(default_factory=dict)
    tuned_edit_layer: int | None = None

    def edit_layer(self, n_layers: int) -> int:
        """The default edit layer for a model of ``n_layers`` layers: the tuned sweep's, else the family's, else
        GPT-J's 5 of 28 scaled."""
        for layer in (self.tuned_edit_layer, self.default_edit_layer):
            if layer is not None and layer < n_layers:
                return layer
        return round(5 * n_layers / 28)

    def hparam_overrides(self, method: str, problem: str | None = None, tuned: bool = True) -> dict[str, Any]:
        """Field overrides for ``method`` (an edit method name), plus App. A's for ``problem`` if given, plus this
        model's tuned values for (problem, method) unless ``tuned=False`` (the base a tuning run starts from)."""
        out = dict(self.editor_hparams.get(method, {}))
        if problem is not None:
            out.update(self.problem_hparams.get((problem, method), {}))
            if tuned:
                out.update(self.tuned.get((problem, method), {}))
        return out


# Hase et al. App. A, GPT-J (the reference table; used by every family that has no table of its own).
_APP_A_GPTJ: dict[tuple[str, str], Overrides] = {
    ("error_injection", "ft-1"): {"norm_constraint": 1e-4},
    ("error_injection", "ft-5"): {"norm_constraint": 2e-5},
    ("error_injection", "rome"): {"kl_factor": 1.0},
    ("error_injection", "r-rome"): {"kl_factor": 1.0},  # r-ROME: ROME's App. A values (same optimisation of v*)
    ("error_injection", "memit"): {"kl_factor": 0.9},
    ("tracing_reversal", "ft-1"): {"norm_constraint": 1e-5},
    ("tracing_reversal", "ft-5"): {"norm_constraint": 2e-5},
    ("fact_erasure", "ft-1"): {"norm_constraint": 1e-5},
    ("fact_erasure", "ft-5"): {"norm_constraint": 1e-5},
    ("fact_amplification", "ft-1"): {"norm_constraint": 1e-5},
    ("fact_amplification", "ft-5"): {"norm_constraint": 1e-5},
    ("fact_forcing", "ft-1"): {"norm_constraint": 1e-4, "num_steps": 50},
    ("fact_forcing", "ft-5"): {"norm_constraint": 1e-4, "num_steps": 50},
    ("fact_forcing", "rome"): {"v_num_grad_steps": 25, "v_lr": 0.05},
    ("fact_forcing", "r-rome"): {"v_num_grad_steps": 25, "v_lr": 0.05},
}

GPT_J = ModelProfile(
    family="gpt-j",
    matches=("gpt-j",),
    default_edit_layer=5,  # the paper's "layer 6" (1-indexed)
    problem_hparams=_frozen(_APP_A_GPTJ),
)

GPT2_XL = ModelProfile(
    family="gpt2-xl",
    matches=("gpt2-xl",),
    default_edit_layer=17,
    editor_hparams=_frozen({
        "memit": {"v_num_grad_steps": 20, "mom2_update_weight": 20000.0},
        "ft-1": {"norm_constraint": 1e-3},
        "ft-5": {"norm_constraint": 1e-3},
    }),
    # App. A for gpt2-xl (only Error Injection and Fact Forcing were run); ROME/MEMIT: defaults.
    problem_hparams=_frozen({
        ("error_injection", "ft-1"): {"norm_constraint": 1e-3},
        ("error_injection", "ft-5"): {"norm_constraint": 1e-4},
        ("fact_forcing", "ft-1"): {"norm_constraint": 5e-4, "num_steps": 50},
        ("fact_forcing", "ft-5"): {"norm_constraint": 5e-5, "num_steps": 50},
        ("fact_forcing", "rome"): {"v_num_grad_steps": 25, "v_lr": 0.05},
        ("fact_forcing", "r-rome"): {"v_num_grad_steps": 25, "v_lr": 0.05},
    }),
)

# The embedded SmolLM2-135M (30 layers, d_mlp 1536). MEMIT's lambda is scaled down to 5000 (its keys are 1536-dim vs
# GPT-J's 16384) so that a 5-layer edit at layers 10..14 reaches p(target) > 0.5 on most facts. App. A: GPT-J's table
# as the base, except Error Injection's FT bounds (an earlier bound-only tuning by the same rule: FT-1 1e-2, FT-5
# 1e-3); what `locedit tune` measured for this model (docs/TUNING.md) is the tuned table data/tuned/smollm2.json,
# applied on top per (problem, method).
SMOLLM2 = ModelProfile(
    family="smollm2",
    matches=("smollm2",),
    default_edit_layer=None,  # the tuned table's "edit_layer" (15, `locedit tune --layers`) applies
    editor_hparams=_frozen({"memit": {"mom2_update_weight": 5000.0}}),
    problem_hparams=_frozen({
        **_APP_A_GPTJ,
        ("error_injection", "ft-1"): {"norm_constraint": 1e-2},
        ("error_injection", "ft-5"): {"norm_constraint": 1e-3},
    }),
)

# Gemma 3 (google/gemma-3-270m, packaged as "gemma3-270m"): trained with a BOS token at the start of every sequence,
# so prompts get one (subject spans shift by one). Edit layer: GPT-J's 5 of 28 scaled (3 of 18). Editors keep the
# reference values (not tuned on this model); App. A: GPT-J's table.
GEMMA3 = ModelProfile(
    family="gemma3",
    matches=("gemma-3", "gemma3"),
    problem_hparams=_frozen(_APP_A_GPTJ),
    prepend_bos=True,
)


def read_tuned_table(path: str | Path) -> dict[str, Any]:
    """A tuned table (JSON written by :func:`locedit.tuning.write_tuned_table`), checked:
    ``{"format": 1, "family", "entries": [{"problem", "method", "overrides": {field: value}, ...provenance}],
    "edit_layer": {"layer": int, ...provenance} | null}``.

    Raises:
        TunedTableError: another format version or a malformed entry (names the file and the entry).
    """
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TunedTableError(f"{path}: not a readable tuned table ({e})") from e
    if not isinstance(table, dict) or table.get("format") != TUNED_FORMAT:
        raise TunedTableError(f"{path}: tuned-table format {table.get('format') if isinstance(table, dict) else None!r}"
                              f", expected {TUNED_FORMAT}")
    for i, e in enumerate(table.get("entries", [])):
        if not (isinstance(e, dict) and isinstance(e.get("problem"), str) and isinstance(e.get("method"), str)
                and isinstance(e.get("overrides"), dict)):
            raise TunedTableError(f"{path}: entry {i} needs a problem, a method and an overrides object")
    layer = table.get("edit_layer")
    if layer is not None and not (isinstance(layer, dict) and isinstance(layer.get("layer"), int)):
        raise TunedTableError(f"{path}: edit_layer must be null or an object with an int layer")
    return table


def with_tuned_table(profile: ModelProfile, table: Mapping[str, Any] | None) -> ModelProfile:
    """``profile`` with a tuned table's overrides and edit layer (unchanged for None)."""
    if table is None:
        return profile
    tuned = {(e["problem"], e["method"]): _frozen(dict(e["overrides"])) for e in table.get("entries", [])}
    layer = table.get("edit_layer")
    return replace(profile, tuned=_frozen(tuned), tuned_edit_layer=None if layer is None else int(layer["layer"]))


def _shipped(profile: ModelProfile) -> ModelProfile:
    path = TUNED_DIR / f"{profile.family}.json"
    return with_tuned_table(profile, read_tuned_table(path) if path.exists() else None)


PROFILES: Mapping[str, ModelProfile] = _frozen(
    {p.family: _shipped(p) for p in (SMOLLM2, GPT_J, GPT2_XL, GEMMA3)}
)

FALLBACK_PROFILE = replace(GPT_J, family="unknown", matches=(), default_edit_layer=None)


def profile_for(model_or_name: Any) -> ModelProfile:
    """The profile of a model (a HookedTransformer, a config, or a name); :data:`FALLBACK_PROFILE` if none matches."""
    name = model_or_name
    if not isinstance(name, str):
        cfg = getattr(model_or_name, "cfg", model_or_name)
        name = getattr(cfg, "model_name", "") or ""
    key = name.lower().replace("_", "-")
    for profile in PROFILES.values():
        if any(m in key for m in profile.matches):
            return profile
    return FALLBACK_PROFILE
