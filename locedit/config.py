"""Study configuration: a TOML file parsed into small frozen dataclasses.

Example (``configs/default.toml``)::

    [study]
    name = "default"
    model = "smollm2-135m"

    [data]
    dataset = "counterfact"     # counterfact | zsre | known | a path to a CounterFact-schema JSON
    filter = "known"            # none | known | min_target_prob
    sample = 20                 # facts drawn (after filtering) with `seed`
    seed = 0

    [tracing]
    kinds = ["mlp"]
    windows = [5]
    samples = 10
    noise = 3.0                 # GaussianNoise scale (multiplier of std(W_E)); or `sigma = 0.094` for an absolute sigma

    [editing]
    problems = [...]            # names from problems.PROBLEMS (default: the first, Error Injection)
    methods = ["rome"]
    layers = [0, 4, 8, 12, 16, 20]   # default: every 4th layer plus the model profile's default edit layer
    essence = true

    [hparams.rome]               # overrides of the editors' defaults, per edit method (editors.EDIT_METHODS)
    v_num_grad_steps = 20

Every name is checked against its registry (problems: ``problems.PROBLEMS``; methods: ``editors.EDIT_METHODS``;
kinds: ``tracer.TRACING_KINDS``; datasets: ``problems.DATASETS``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editors.methods import DEFAULT_METHOD
from problems.variants import DEFAULT_PROBLEM

__all__ = ["DataConfig", "TracingConfig", "EditingConfig", "StudyConfig", "load_config", "default_edit_layers"]

FILTERS = ("none", "known", "min_target_prob")


class ConfigError(ValueError):
    """A study config names an unknown key or value."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "counterfact"
    filter: str = "known"
    sample: int | None = 20
    seed: int = 0


@dataclass(frozen=True)
class TracingConfig:
    kinds: tuple[str, ...] = ("mlp",)
    windows: tuple[int, ...] = (5,)
    samples: int = 10
    noise: float = 3.0  # the GaussianNoise scale (a multiplier of std(W_E))
    sigma: float | None = None  # an absolute sigma instead
    seed: int = 0

    def corruption(self):
        """The study's one corruption object (tracing, o_noise and Fact Forcing all use it)."""
        from tracer.corruption import GaussianNoise

        return GaussianNoise(scale=self.noise, sigma=self.sigma, samples=self.samples, seed=self.seed)


@dataclass(frozen=True)
class EditingConfig:
    problems: tuple[str, ...] = (DEFAULT_PROBLEM,)
    methods: tuple[str, ...] = (DEFAULT_METHOD,)
    layers: tuple[int, ...] | None = None  # None: default_edit_layers(n_layers)
    essence: bool = True
    forcing_edit_samples: int | None = None  # Fact Forcing: noise samples the edit optimizes over (None: all)
    generation: bool = False  # fluency (generation entropy) before/after each edit: slow, off by default
    covariance_tokens: int | None = None  # WikiText tokens for ROME/MEMIT's key second moment (None: the default)


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    model: str = "smollm2-135m"
    data: DataConfig = field(default_factory=DataConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    editing: EditingConfig = field(default_factory=EditingConfig)
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def default_edit_layers(n_layers: int, model_name: str = "") -> tuple[int, ...]:
    """Every 4th layer (0, 4, 8, ...) plus the model profile's default edit layer, as in the paper's layer sweeps."""
    from tracer.profiles import profile_for

    return tuple(sorted(set(range(0, n_layers, 4)) | {profile_for(model_name).edit_layer(n_layers)}))


def _check(values, registry, what):
    from tracer.vocab import check_choice

    for v in values:
        check_choice(v, registry, what, ConfigError)


def _section(raw: dict, name: str, cls):
    sec = dict(raw.get(name, {}))
    fields = set(cls.__dataclass_fields__)
    unknown = set(sec) - fields
    if unknown:
        raise ConfigError(f"[{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    for k, v in sec.items():
        if isinstance(v, list):
            sec[k] = tuple(v)
    return cls(**sec)


def parse_config(raw: dict[str, Any]) -> StudyConfig:
    """Validate a parsed TOML mapping into a :class:`StudyConfig`."""
    unknown = set(raw) - {"study", "data", "tracing", "editing", "hparams"}
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}")
    study = dict(raw.get("study", {}))
    bad = set(study) - {"name", "model"}
    if bad:
        raise ConfigError(f"[study] has unknown keys {sorted(bad)}")
    data = _section(raw, "data", DataConfig)
    tracing = _section(raw, "tracing", TracingConfig)
    editing = _section(raw, "editing", EditingConfig)
    from editors.methods import EDIT_METHODS
    from problems.variants import PROBLEMS
    from tracer.vocab import TRACING_KINDS

    _check([data.filter], FILTERS, "filter")
    _check(tracing.kinds, TRACING_KINDS, "tracing kind")
    _check(editing.problems, PROBLEMS, "problem")
    _check(editing.methods, EDIT_METHODS, "edit method")
    if any(w < 1 for w in tracing.windows):
        raise ConfigError(f"tracing windows must be >= 1, got {tracing.windows}")
    hparams = {k: dict(v) for k, v in raw.get("hparams", {}).items()}
    _check(hparams, EDIT_METHODS, "[hparams.<edit method>] section")
    return StudyConfig(
        name=study.get("name", "study"),
        model=study.get("model", "smollm2-135m"),
        data=data,
        tracing=tracing,
        editing=editing,
        hparams=hparams,
    )


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file."""
    with open(path, "rb") as f:
        return parse_config(tomllib.load(f))
