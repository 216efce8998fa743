"""The resolved study plan: every setting of a study decided once, before any unit runs.

A :class:`StudyPlan` is built by :func:`resolve_plan` from a validated :class:`~locedit.config.StudyConfig`, the
loaded model and the selected facts, and fixes everything a unit needs:

* the study's one Gaussian noise with σ resolved (``noise``: the rule, scale and samples behind it), used by the
  noise and attribution grids, o_noise (Tracing Reversal) and Fact Forcing;
* each (problem, method)'s hyper-parameters (the editors' defaults for the model, the profile's App. A overrides
  and the config's ``[hparams.<method>]``);
* each method's edit token rules (``None`` for a method with no key position: FT);
* the edit layers and the key-statistics settings (WikiText tokens for ROME/MEMIT's C);
* the facts, in the study's order.

Units (:class:`TraceUnit`, :class:`EditUnit`) carry only their coordinates; their :meth:`key` / :func:`parse_key`
is the only journal-key format. The plan is written into ``provenance.json`` at a run's first start
(:meth:`StudyPlan.to_json`) and read back at every resume (:meth:`StudyPlan.from_json`), so a resumed run keeps its
σ and hyper-parameters even when the code's defaults change (:meth:`StudyPlan.differences` says what would differ).
Nothing below the plan re-validates or re-derives these values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from transformer_lens import HookedTransformer

from locedit.config import StudyConfig, default_edit_layers
from locedit.editors.covariance import default_n_tokens
from locedit.editors.hparams import HyperParams
from locedit.editors.methods import lowest_edited_layers, method_layers, resolve_method, target_groups
from locedit.editors.tokens import DEFAULT_EDIT_TOKEN
from locedit.problems.variants import problem_hparams
from locedit.tracer.corruption import GaussianNoise

__all__ = [
    "SCHEMA_VERSION",
    "EditUnit",
    "hparams_from_json",
    "StudyPlan",
    "TraceUnit",
    "Unit",
    "UnitKeyError",
    "parse_key",
    "plan_units",
    "resolve_plan",
]

SCHEMA_VERSION = 2
"""The run-directory format: ``config.json``'s ``schema_version``. 1 (no field): flat config with a ``tracing``
section, noise keys without their localization, default-token keys without their token, no plan in provenance.
``locedit migrate`` rewrites a version-1 run into this one."""


class UnitKeyError(ValueError):
    """A journal key that is not a unit key of the current format."""


def _check_id(fact_id: str) -> str:
    if not isinstance(fact_id, str) or not fact_id or "|" in fact_id:
        raise ValueError(f"a fact id must be a non-empty string without '|' (journal keys use it), got {fact_id!r}")
    return fact_id


@dataclass(frozen=True)
class TraceUnit:
    """One localization grid: fact × localization method × kind × window. Key ``trace|FACT|KIND|wW|LOCALIZATION``."""

    fact_id: str
    localization: str
    kind: str
    window: int
    table: ClassVar[str] = "tracing"

    def key(self) -> str:
        return f"trace|{self.fact_id}|{self.kind}|w{self.window}|{self.localization}"

    @property
    def stage(self) -> str:
        return f"localization: {self.localization}"


@dataclass(frozen=True)
class EditUnit:
    """One edit: fact × problem × method × (centre) layer × token rule (None: the method has no key position).
    Key ``edit|FACT|PROBLEM|METHOD|LLAYER`` plus ``|TTOKEN`` for a method with a key position."""

    fact_id: str
    problem: str
    method: str
    layer: int
    token: str | int | None
    table: ClassVar[str] = "edits"

    def key(self) -> str:
        base = f"edit|{self.fact_id}|{self.problem}|{self.method}|L{self.layer}"
        return base if self.token is None else f"{base}|T{self.token}"

    @property
    def stage(self) -> str:
        other = self.token is not None and self.token != DEFAULT_EDIT_TOKEN
        return f"edits: {self.method}" + (f" at token rule {self.token}" if other else "")


Unit = TraceUnit | EditUnit

_TRACE_KEY = re.compile(r"trace\|(?P<fact>[^|]+)\|(?P<kind>[^|]+)\|w(?P<window>\d+)\|(?P<loc>[^|]+)")
_EDIT_KEY = re.compile(r"edit\|(?P<fact>[^|]+)\|(?P<problem>[^|]+)\|(?P<method>[^|]+)\|L(?P<layer>\d+)"
                       r"(?:\|T(?P<token>[^|]+))?")


def parse_key(key: str) -> Unit:
    """The unit a journal key names (inverse of ``unit.key()``); :class:`UnitKeyError` for anything else."""
    if m := _TRACE_KEY.fullmatch(key):
        return TraceUnit(m["fact"], m["loc"], m["kind"], int(m["window"]))
    if m := _EDIT_KEY.fullmatch(key):
        tok = m["token"]
        token = None if tok is None else int(tok) if tok.lstrip("+-").isdigit() else tok
        return EditUnit(m["fact"], m["problem"], m["method"], int(m["layer"]), token)
    raise UnitKeyError(f"{key!r} is not a unit key of run format {SCHEMA_VERSION}")


def _trace_windows(kind: str, windows: Sequence[int]) -> tuple[int, ...]:
    return (1,) if kind == "resid" else tuple(windows)


def method_tokens(config: StudyConfig) -> dict[str, tuple[str | int | None, ...]]:
    """Each edit method's token rules: the config's ``[editing] tokens`` for a method with a key position (the
    default rule first), ``(None,)`` for one without (:meth:`editors.methods.EditMethod.edit_token`)."""
    out = {}
    for m in config.editing.methods:
        entry = resolve_method(m, aliases=False)
        rules = tuple(dict.fromkeys(entry.edit_token(t) for t in config.editing.tokens))
        out[m] = rules
    return out


def plan_units(config: StudyConfig, tokens: Mapping[str, tuple], layers: Sequence[int], study_ids: Sequence[str],
               fact_ids: Sequence[str] | None = None) -> list[Unit]:
    """All units of ``fact_ids`` (default: the whole study) in run order.

    ``[study] order = "fact"`` runs every unit of a fact before the next fact; ``"stage"`` runs one stage over every
    fact before the next -- each localization method, then each edit method at its own token (all problems of a
    fact together), then the other token rules -- so a study stopped early has its first stages complete over all
    facts. ``[editing] token_methods`` / ``token_facts`` limit the token rules other than the default to those
    methods and to the first ``token_facts`` facts of ``study_ids`` (the study's order, ``facts.json``)."""
    ed, loc = config.editing, config.localization
    study_ids = list(study_ids)
    fact_ids = study_ids if fact_ids is None else list(fact_ids)
    token_ids = set(study_ids if ed.token_facts is None else study_ids[: ed.token_facts])

    def own(method: str):
        return tokens[method][0]

    def tokens_for(method: str, fid: str) -> tuple:
        if fid not in token_ids or (ed.token_methods is not None and method not in ed.token_methods):
            return (own(method),)
        return tokens[method]

    def traces(fid: str, method: str):
        for kind in loc.kinds:
            for w in _trace_windows(kind, loc.windows):
                yield TraceUnit(fid, method, kind, w)

    def edits(fid: str, problem: str, method: str, token):
        if token in tokens_for(method, fid):
            for layer in layers:
                yield EditUnit(fid, problem, method, layer, token)

    if config.order == "fact":
        return [u for fid in fact_ids for u in (
            *(u for m in loc.methods for u in traces(fid, m)),
            *(u for p in ed.problems for m in ed.methods for t in tokens_for(m, fid) for u in edits(fid, p, m, t)),
        )]
    stages = method_stages(ed.methods)
    return [
        *(u for m in loc.methods for fid in fact_ids for u in traces(fid, m)),
        *(u for st in stages for fid in fact_ids for p in ed.problems for m in st for u in edits(fid, p, m, own(m))),
        *(u for st in stages for fid in fact_ids for p in ed.problems for m in st for t in tokens[m][1:]
          for u in edits(fid, p, m, t)),
    ]


def method_stages(methods: Sequence[str]) -> list[tuple[str, ...]]:
    """The edit methods grouped into the stages of ``order = "stage"``: a method that optimises the same target
    vector as an earlier one (:attr:`editors.methods.EditMethod.target_hook`: r-ROME after ROME) joins that
    method's stage, so the two run back to back on each fact and the second reuses the first's v*
    (:class:`editors.targets.TargetMemo`); every other method is its own stage, in config order."""
    stages: list[list[str]] = []
    by_hook: dict[str, list[str]] = {}
    for m in methods:
        hook = resolve_method(m, aliases=False).target_hook
        if hook is not None and hook in by_hook:
            by_hook[hook].append(m)
            continue
        stages.append([m])
        if hook is not None:
            by_hook[hook] = stages[-1]
    return [tuple(st) for st in stages]


def _hparams_json(hp: HyperParams) -> dict[str, Any]:
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(hp).items()}


def hparams_from_json(cls: type, d: Mapping[str, Any]) -> HyperParams:
    """The hyper-parameter dataclass ``cls`` from its JSON record (lists back to the fields' tuples)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"recorded hyper-parameters of {cls.__name__} have unknown fields {sorted(unknown)}")
    vals = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in d.items()}
    return cls(**vals)


@dataclass(frozen=True)
class StudyPlan:
    """A study with every setting resolved (see the module docstring). Build with :func:`resolve_plan`.

    Attributes:
        config: the validated config.
        model: the model's name (``model.cfg.model_name``); ``n_layers`` its depth.
        noise: the study's Gaussian noise, resolved (``sigma`` set; ``rule``/``scale``/``samples``/``seed`` say
            where it came from).
        layers: the edit (centre) layers.
        hparams: per ``(problem, method)``, the hyper-parameter dataclass every edit of that pair uses.
        tokens: per method, its token rules (own rule first; ``(None,)`` for a method with no key position).
        covariance_tokens: WikiText tokens of ROME/MEMIT's key second moment.
        fact_ids: the study's facts in order (``facts.json``).
    """

    config: StudyConfig
    model: str
    n_layers: int
    noise: GaussianNoise
    layers: tuple[int, ...]
    hparams: Mapping[tuple[str, str], HyperParams]
    tokens: Mapping[str, tuple[str | int | None, ...]]
    covariance_tokens: int
    fact_ids: tuple[str, ...]

    @property
    def key_layers(self) -> tuple[int, ...]:
        """Every layer whose key second moment an edit of this study reads (methods with ``key_statistics``, ROME
        only with ``mom2_adjustment``; MEMIT's whole window): computed in one pass before the first edit."""
        out: set[int] = set()
        for (_, m), hp in self.hparams.items():
            entry = resolve_method(m, aliases=False)
            if entry.key_statistics and getattr(hp, "mom2_adjustment", True):
                out |= {x for layer in self.layers for x in method_layers(m, self.n_layers, layer)}
        return tuple(sorted(out))

    @property
    def target_groups(self) -> dict[str, tuple]:
        """Per memo group of the study's methods (:attr:`editors.methods.EditMethod.memo_group`: a target hook, or
        FT-1 / FT-5), the target layers or layer sets its edits optimise: a fact's optimisations of one group run
        as one batch (:class:`editors.targets.TargetMemo`)."""
        return target_groups(self.config.editing.methods, self.n_layers, self.layers)

    @property
    def scoring_checkpoints(self) -> tuple[int, ...]:
        """The lowest edited layer of every edit of the study: a fact's pre-edit scoring records its residual stream
        there, and each edit's post-edit scoring reruns only the blocks from its own (:class:`problems.run.
        ScoringCheckpoints`)."""
        return lowest_edited_layers(self.config.editing.methods, self.n_layers, self.layers)

    def units(self, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> list[Unit]:
        """The units of the first ``limit`` facts, shard ``(i, n)`` (facts ``i::n``), in run order."""
        i, n = shard
        ids = list(self.fact_ids[:limit] if limit is not None else self.fact_ids)[i::n]
        return plan_units(self.config, self.tokens, self.layers, self.fact_ids, ids)

    def to_json(self) -> dict[str, Any]:
        """The plan as ``provenance.json`` records it (``"plan"``): everything :meth:`from_json` needs."""
        nz = self.noise
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "n_layers": self.n_layers,
            "noise": {"sigma": nz.sigma, "rule": nz.rule, "scale": nz.scale, "samples": nz.samples, "seed": nz.seed},
            "layers": list(self.layers),
            "hparams": {f"{p}|{m}": _hparams_json(hp) for (p, m), hp in self.hparams.items()},
            "tokens": {m: list(t) for m, t in self.tokens.items()},
            "covariance_tokens": self.covariance_tokens,
            "n_facts": len(self.fact_ids),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], config: StudyConfig, fact_ids: Sequence[str]) -> StudyPlan:
        """The plan a run recorded (:meth:`to_json`), for ``config`` and the run's facts."""
        nz = d["noise"]
        noise = GaussianNoise(scale=nz["scale"], sigma=float(nz["sigma"]), samples=int(nz["samples"]),
                              seed=int(nz["seed"]), rule=nz["rule"])
        hparams = {}
        for key, values in d["hparams"].items():
            p, m = key.split("|")
            hparams[(p, m)] = hparams_from_json(resolve_method(m, aliases=False).hparams, values)
        tokens = {m: tuple(t) for m, t in d["tokens"].items()}
        return cls(config, str(d["model"]), int(d["n_layers"]), noise, tuple(int(x) for x in d["layers"]),
                   hparams, tokens, int(d["covariance_tokens"]), tuple(fact_ids))

    def differences(self, other: StudyPlan) -> list[str]:
        """What ``other`` resolves differently (σ, layers, hyper-parameters, tokens, key statistics), one phrase
        each; empty when the two plans would run the same units with the same values."""
        a, b = self.to_json(), other.to_json()
        out = []
        if a["noise"] != b["noise"]:
            out.append(f"noise {a['noise']} -> {b['noise']}")
        for k in ("model", "n_layers", "layers", "tokens", "covariance_tokens"):
            if a[k] != b[k]:
                out.append(f"{k} {a[k]} -> {b[k]}")
        for k in sorted(set(a["hparams"]) | set(b["hparams"])):
            x, y = a["hparams"].get(k, {}), b["hparams"].get(k, {})
            diff = {f: (x.get(f), y.get(f)) for f in sorted(set(x) | set(y)) if x.get(f) != y.get(f)}
            if diff:
                out.append(f"hparams {k}: " + ", ".join(f"{f} {u} -> {v}" for f, (u, v) in diff.items()))
        return out


def resolve_plan(config: StudyConfig, model: HookedTransformer, fact_ids: Sequence[str]) -> StudyPlan:
    """Resolve ``config`` for ``model`` once: σ of the study's noise, each (problem, method)'s hyper-parameters with
    ``[hparams.<method>]`` applied, each method's token rules, the edit layers and the key-statistics tokens."""
    from locedit.config import check_against_model

    check_against_model(config, model.cfg.n_layers)
    for fid in fact_ids:
        _check_id(fid)
    ed = config.editing
    noise = config.localization.corruption().resolve(model)
    hparams = {}
    for p in ed.problems:
        for m in ed.methods:
            hp = problem_hparams(p, m, model)
            overrides = config.hparams.get(m, {})
            hp = dataclasses.replace(hp, **overrides) if overrides else hp
            hparams[(p, m)] = hparams_from_json(type(hp), _hparams_json(hp))  # TOML lists -> the fields' tuples
    layers = tuple(ed.layers or default_edit_layers(model.cfg.n_layers, config.model))
    n_cov = ed.covariance_tokens if ed.covariance_tokens is not None else default_n_tokens()
    return StudyPlan(config, model.cfg.model_name, model.cfg.n_layers, noise, layers, hparams, method_tokens(config),
                     int(n_cov), tuple(fact_ids))
