"""Study configuration: a TOML file validated by a pydantic schema into small frozen models.

Example (``configs/default.toml``)::

    [study]
    name = "default"
    model = "smollm2-135m"

    [data]
    dataset = "counterfact"     # counterfact | zsre | known | a path to a CounterFact-schema JSON
    filter = "known"            # none | known | min_target_prob
    sample = 20                 # facts drawn (after filtering) with `seed`
    seed = 0

    [localization]
    methods = ["noise"]         # tracer.vocab.LOCALIZATIONS: noise | flip | zero | attribution
    kinds = ["mlp"]
    windows = [5]
    samples = 10
    noise = 3.0                 # GaussianNoise scale: x the noise_scale_rule's std ("s3", ROME's: sigma 0.350 on the
                                # embedded model); or `sigma = 0.094` for an absolute sigma

    [editing]
    problems = [...]            # names from problems.PROBLEMS (default: the first, Error Injection)
    methods = ["rome"]
    layers = [0, 4, 8, 12, 16, 20]   # default: every 4th layer plus the model profile's default edit layer
    essence = true

    [hparams.rome]               # overrides of the editors' defaults, per edit method (editors.EDIT_METHODS)
    v_num_grad_steps = 20

A run directory stores the validated config as ``config.json`` in this same layout (sections as tables, every default
filled in) with ``schema_version`` (:data:`locedit.plan.SCHEMA_VERSION`); :func:`parse_config` reads either.

Validation happens before anything is written and reports every problem at once (:class:`ConfigError`): unknown
sections or keys; every name against its registry (problems: ``problems.PROBLEMS``; methods: ``editors.EDIT_METHODS``;
kinds: ``tracer.TRACING_KINDS``); strict types (no "3" for 3, no "no" for false, no 5.5 for a layer, no string where
a list belongs); ranges (positive samples/windows/sample sizes, finite positive noise, non-empty lists); and
``[hparams.<method>]`` keys and value types against the method's hyper-parameter dataclass. Edit layers are checked
against the model's depth by :func:`check_against_model` once the model is loaded, still before the run directory
is written.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from locedit.editors.methods import DEFAULT_METHOD, EDIT_METHODS
from locedit.problems.variants import DEFAULT_PROBLEM, PROBLEMS
from locedit.tracer.corruption import DEFAULT_NOISE_SCALE_RULE, NOISE_SCALE_RULES, GaussianNoise
from locedit.tracer.vocab import LOCALIZATIONS, TRACING_KINDS, check_choice
from locedit.editors.tokens import DEFAULT_EDIT_TOKEN, check_edit_token

__all__ = [
    "AnalysisConfig",
    "ConfigError",
    "DataConfig",
    "EditingConfig",
    "LocalizationConfig",
    "SECTIONS",
    "StudyConfig",
    "check_against_model",
    "default_edit_layers",
    "load_config",
    "parse_config",
]

FILTERS = ("none", "known", "min_target_prob")


class ConfigError(ValueError):
    """A study config is invalid; the message lists every problem found."""


def _positive_finite(x: float) -> float:
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"must be finite and > 0, got {x!r}")
    return float(x)


Number = Annotated[StrictInt | StrictFloat, AfterValidator(float)]
PositiveNumber = Annotated[StrictInt | StrictFloat, AfterValidator(_positive_finite)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
Layer = Annotated[StrictInt, Field(ge=0)]


def _names(registry, what: str):
    def check(values):
        for v in values:
            check_choice(v, registry, what)
        return values

    return check


def _unique(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate entries in {list(values)}")
    return values


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    dataset: StrictStr = "counterfact"
    filter: StrictStr = "known"
    sample: PositiveInt | None = 20
    seed: StrictInt = 0

    _filter = field_validator("filter")(classmethod(lambda cls, v: check_choice(v, FILTERS, "filter")))


class LocalizationConfig(_Section):
    """``[localization]``: how facts are localized, and the study's one Gaussian noise (noise and attribution grids,
    o_noise and Fact Forcing all use it; :class:`locedit.plan.StudyPlan` resolves its σ once)."""

    methods: Annotated[tuple[StrictStr, ...], Field(min_length=1)] = ("noise",)  # tracer.vocab.LOCALIZATIONS
    kinds: tuple[StrictStr, ...] = ("mlp",)  # empty: no localization units (a study that only edits)
    windows: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (5,)
    samples: PositiveInt = 10
    noise: PositiveNumber = 3.0  # the GaussianNoise scale: a multiplier of the noise_scale_rule's std
    sigma: PositiveNumber | None = None  # an absolute sigma instead
    # what `noise` multiplies (tracer.corruption.NOISE_SCALE_RULES): "s3" (ROME's, the default everywhere: the std of
    # known_1000's subject-token embeddings) or "embedding" (the std of all of W_E; runs made before s3 name it)
    noise_scale_rule: StrictStr = DEFAULT_NOISE_SCALE_RULE
    flips: PositiveInt = 10  # flip partners per fact
    seed: StrictInt = 0

    _methods = field_validator("methods")(
        classmethod(lambda cls, v: _unique(_names(LOCALIZATIONS, "localization method")(v))))
    _kinds = field_validator("kinds")(classmethod(lambda cls, v: _unique(_names(TRACING_KINDS, "tracing kind")(v))))
    _windows = field_validator("windows")(classmethod(lambda cls, v: _unique(v)))
    _rule = field_validator("noise_scale_rule")(
        classmethod(lambda cls, v: check_choice(v, NOISE_SCALE_RULES, "noise_scale_rule")))

    def corruption(self) -> GaussianNoise:
        """The study's one Gaussian noise, unresolved (σ is fixed for a model by :meth:`GaussianNoise.resolve`, once
        per study in :func:`locedit.plan.resolve_plan`)."""
        return GaussianNoise(scale=None if self.sigma is not None else self.noise, sigma=self.sigma, samples=self.samples, seed=self.seed,
                             rule=self.noise_scale_rule)


class EditingConfig(_Section):
    problems: Annotated[tuple[StrictStr, ...], Field(min_length=1)] = (DEFAULT_PROBLEM,)
    methods: Annotated[tuple[StrictStr, ...], Field(min_length=1)] = (DEFAULT_METHOD,)
    layers: Annotated[tuple[Layer, ...], Field(min_length=1)] | None = None  # None: default_edit_layers(n_layers)
    essence: StrictBool = True
    forcing_edit_samples: PositiveInt | None = None  # Fact Forcing: noise samples the edit optimizes over (None: all)
    generation: StrictBool = False  # fluency (generation entropy) before/after each edit: slow, off by default
    covariance_tokens: PositiveInt | None = None  # WikiText tokens for ROME/MEMIT's key second moment (None: default)
    # ROME/MEMIT edit positions (editors.tokens.EDIT_TOKENS names or int offsets from the last subject token); methods
    # without a key position (FT) are edited once whatever this lists
    tokens: Annotated[tuple[StrictStr | StrictInt, ...], Field(min_length=1)] = (DEFAULT_EDIT_TOKEN,)
    # the token rules other than the default only for these methods (None: every method with a key position) and
    # only for the study's first `token_facts` facts (None: all); elsewhere the default token
    token_methods: Annotated[tuple[StrictStr, ...], Field(min_length=1)] | None = None
    token_facts: PositiveInt | None = None

    _problems = field_validator("problems")(classmethod(lambda cls, v: _unique(_names(PROBLEMS, "problem")(v))))
    _methods = field_validator("methods")(classmethod(lambda cls, v: _unique(_names(EDIT_METHODS, "edit method")(v))))
    _layers = field_validator("layers")(classmethod(lambda cls, v: v if v is None else _unique(v)))
    _tokens = field_validator("tokens")(classmethod(lambda cls, v: _unique(tuple(check_edit_token(t) for t in v))))
    _token_methods = field_validator("token_methods")(
        classmethod(lambda cls, v: v if v is None else _names(EDIT_METHODS, "edit method")(v)))


Bound = Literal["none", "clip", "rank"]


class AnalysisConfig(_Section):
    """``[analysis]``: the pre-registered analysis, fixed in ``config.json`` at the run's first start (before any
    data) and unchangeable at a resume. The report and ``locedit findings`` lead with the primary test
    (:func:`locedit.stats.preregistered.preregistered_analysis` on :func:`locedit.stats.added_effect`), run the other
    bounds as sensitivity analyses and every other (localization, problem, method) as the secondary family with
    ``multiplicity``-adjusted p-values."""

    localization: StrictStr = "noise"  # the primary test's localization method, problem, edit method and metric
    problem: StrictStr = DEFAULT_PROBLEM
    method: StrictStr = DEFAULT_METHOD
    metric: StrictStr = "rewrite_score"
    min_p_clean: Annotated[StrictInt | StrictFloat, Field(ge=0, le=1)] = 0.0  # facts below are excluded (App. A: 0.02)
    max_noised_ratio: Annotated[StrictInt | StrictFloat, Field(gt=0, le=1)] | None = None  # noise must corrupt:
    # a fact is excluded from a noise-based localization when p_noised > ratio · p_clean (e.g. 0.5)
    bound: Bound = "none"  # how the tracing covariate is bounded in the primary test
    sensitivity: tuple[Bound, ...] = ("clip", "rank")  # the other bounds, run as sensitivity analyses
    sesoi: PositiveNumber = 0.01  # smallest partial R² of interest (the equivalence bound)
    alpha: Annotated[StrictFloat, Field(gt=0, lt=0.5)] = 0.05
    multiplicity: Literal["holm", "fdr_bh"] = "holm"  # the secondary family's correction
    n_permutations: PositiveInt = 999
    n_boot: Annotated[StrictInt, Field(ge=0)] = 999
    seed: StrictInt = 0

    _localization = field_validator("localization")(
        classmethod(lambda cls, v: check_choice(v, LOCALIZATIONS, "localization method")))
    _problem = field_validator("problem")(classmethod(lambda cls, v: check_choice(v, PROBLEMS, "problem")))
    _method = field_validator("method")(classmethod(lambda cls, v: check_choice(v, EDIT_METHODS, "edit method")))
    _sensitivity = field_validator("sensitivity")(classmethod(lambda cls, v: _unique(v)))


def _check_hparams(hparams: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``[hparams.<method>]``: known methods, known fields, values of the field's type."""
    out, problems = {}, []
    for method, overrides in hparams.items():
        try:
            check_choice(method, EDIT_METHODS, "[hparams.<edit method>] section")
        except ValueError as e:
            problems.append(str(e))
            continue
        if not isinstance(overrides, dict):
            problems.append(f"[hparams.{method}] must be a table of hyper-parameters")
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(EDIT_METHODS[method].hparams)}
        for key, value in overrides.items():
            if key not in defaults:
                problems.append(f"[hparams.{method}] has unknown key {key!r}; allowed: {sorted(defaults)}")
                continue
            d = defaults[key]
            ok = (
                isinstance(value, bool) if isinstance(d, bool)
                else isinstance(value, int) and not isinstance(value, bool) if isinstance(d, int)
                else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if isinstance(d, float)
                else isinstance(value, (list, tuple)) if isinstance(d, tuple)
                else True
            )
            if not ok:
                problems.append(f"[hparams.{method}] {key} = {value!r} must be a {type(d).__name__}")
        if not problems:
            try:  # ranges (steps >= 1, rates and bounds > 0, ...): the dataclass checks them itself
                dataclasses.replace(EDIT_METHODS[method].hparams(), **{
                    k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                    for k, v in overrides.items()})
            except ValueError as e:
                problems.append(f"[hparams.{method}] {e}")
        out[method] = dict(overrides)
    if problems:
        raise ValueError("; ".join(problems))
    return out


class StudyConfig(_Section):
    name: StrictStr = "study"
    model: StrictStr = "smollm2-135m"
    # unit order: "fact" (every unit of a fact, then the next) or "stage" (each stage over all facts; plan.plan_units)
    order: Literal["fact", "stage"] = "fact"
    data: DataConfig = DataConfig()
    localization: LocalizationConfig = LocalizationConfig()
    editing: EditingConfig = EditingConfig()
    hparams: dict[StrictStr, dict[StrictStr, Any]] = Field(default_factory=dict)
    analysis: AnalysisConfig = AnalysisConfig()

    _hparams = field_validator("hparams")(classmethod(lambda cls, v: _check_hparams(v)))

    def to_dict(self) -> dict[str, Any]:
        """The config in the TOML layout (``[study]`` keys, then one table per section), every default filled in:
        ``parse_config(config.to_dict()) == config``."""
        flat = self.model_dump(mode="json")
        return {"study": {k: flat[k] for k in _STUDY_KEYS}, **{s: flat[s] for s in SECTIONS if s != "study"}}


#: the sections of a study config, in file order ([study] holds the StudyConfig fields that are not sections)
SECTIONS = ("study", "data", "localization", "editing", "hparams", "analysis")
_STUDY_KEYS = tuple(k for k in StudyConfig.model_fields if k not in SECTIONS)


def default_edit_layers(n_layers: int, model_name: str = "") -> tuple[int, ...]:
    """Every 4th layer (0, 4, 8, ...) plus the model profile's default edit layer, as in the paper's layer sweeps."""
    from locedit.tracer.profiles import profile_for

    return tuple(sorted(set(range(0, n_layers, 4)) | {profile_for(model_name).edit_layer(n_layers)}))


def _format(err: ValidationError) -> str:
    lines = []
    errors = err.errors()
    item_locs = {e["loc"][:-1] for e in errors if isinstance(e["loc"][-1], int)}
    for e in errors:
        if e["type"] == "too_short" and e["loc"] in item_locs:
            continue  # "no valid items left" after a bad item was already reported
        where = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown keys {[e['loc'][-1]]} (not a config key)")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{where}: {msg} (got {e.get('input')!r})")
    return "invalid study config: " + "; ".join(lines)


def parse_config(raw: dict[str, Any]) -> StudyConfig:
    """Validate a parsed TOML mapping into a :class:`StudyConfig` (:class:`ConfigError` listing every problem)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a study config is a TOML table, got {type(raw).__name__}")
    raw = {k: v for k, v in raw.items() if k != "schema_version"}  # config.json's; the run directory checks it
    if "tracing" in raw:
        raise ConfigError("[tracing] is now called [localization] (and a bare noise scale multiplies the s3 rule's "
                          "std unless noise_scale_rule says otherwise): rename the section; for a run directory "
                          "written by an older locedit, run `locedit migrate RUN_DIR` once")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
    for name in SECTIONS:
        if name in raw and not isinstance(raw[name], dict):
            raise ConfigError(f"[{name}] must be a table")
    flat = {**raw.get("study", {}), **{k: v for k, v in raw.items() if k != "study"}}
    try:
        return StudyConfig.model_validate(flat)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def check_against_model(config: StudyConfig, n_layers: int) -> None:
    """Edit layers within the model's depth (:class:`ConfigError` naming every bad one)."""
    bad = [layer for layer in (config.editing.layers or ()) if layer >= n_layers]
    if bad:
        raise ConfigError(f"[editing] layers {bad} are out of range: the model has {n_layers} layers (0..{n_layers - 1})")


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return parse_config(raw)
