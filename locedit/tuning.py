"""Editors tuned for the model they edit, by Hase et al.'s rule (App. A), and the layer to edit.

The paper tuned each edit method × problem on GPT-J "to have high rewrite scores while not trading off too aggressively
against paraphrase and neighborhood scores ... rewrite scores no higher than 99 %", on the first 100 CounterFact points
at the default layer, over the KL weight ∈ {0.0625, 0.9, 1} (ROME, MEMIT) and the L∞ bound ∈ {1e-4, 5e-5, 2e-5, 1e-5}
(FT). Those values do not transfer to a 135M model (FT's bounds leave it unchanged; ROME's Fact Forcing learning rate
leaves v* short of its target). :func:`tune` applies the same rule to any model and records how it got there.

**The rule implemented** (:func:`choose_setting`, :class:`TuningRule`): a grid point is *admissible* when its mean
rewrite score over the tuning facts is ≤ ``ceiling`` (0.99) and its mean neighborhood score is within
``neighborhood_tolerance`` (0.05) of the best mean neighborhood score on the grid (the paper's "not trading off too
aggressively", made explicit; paraphrase is reported, not constrained: it moves with the rewrite). The chosen point is
the admissible one with the highest mean rewrite (ties: the earlier grid point). If none is admissible the point with
the lowest mean rewrite is returned, flagged ``within_rule=False``. **Widening**: when the chosen point's mean rewrite is
below ``reach`` (0.9; ROME reaches 0.99 at GPT-J's default layer and > 0.96 at every layer but the last, Hase et al.
§4), the search is widened to the optimizer budget (:data:`BUDGET_GRIDS`: v*/z learning rate and steps; FT's steps):
every combination of the budget fields, each with its base value, crossed with the paper grid's monotone fields (FT's
L∞ bound) and at the paper stage's chosen value of the others (the KL weight); the rule is then applied to the whole
table (``widened=True``). Within one budget combination the bounds are scanned *downward* from the largest, stopping
at the first admissible one (since 2026-12-03, session 15): the rewrite grows along a monotone field (the assumption
the paper stage's upward scan already makes when it stops above the ceiling), so a smaller bound under the same
budget edits less and cannot be the chosen point; the paper stage's smallest bounds fix the neighborhood reference
before any budget row is measured. The widened rows are listed in grid order whatever order measured them. (Until
2026-12-03 the budget was searched one field at a time, learning rate first, and could miss a better combination: the
SmolLM2 entries tuned then say so in their ``stage`` column.)

Rewrite score: (p* − p)/(1 − p) for maximizing problems, max(0, (p − p*)/p) for Fact Erasure (Hase et al. §3.3), as
:func:`problems.run.run_edit` reports it. Every outcome is journalled (one JSON line per fact × grid point,
:class:`locedit.journal.Journal`): a killed run resumes without recomputing a finished edit and reaches the same table.

:func:`sweep_layers` answers "which layer should I edit on this model?": per-layer mean rewrite with 95 % intervals over
facts, the best layer, the layers a paired test does not distinguish from it (Holm-adjusted), and where the same facts'
causal traces peak.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl
from transformer_lens import HookedTransformer

from locedit.editors.hparams import FTHyperParams, MEMITHyperParams, ROMEHyperParams
from locedit.editors.methods import EDIT_METHODS, resolve_method
from locedit.problems.facts import Fact
from locedit.problems.filters import first_passing
from locedit.problems.variants import problem_hparams, resolve_problem
from locedit.stats.tables import mean_half_width
from locedit.stopping import StopRequest

__all__ = [
    "BUDGET_GRIDS",
    "FT_METHODS",
    "PAPER_GRIDS",
    "LayerSweep",
    "TuningConfigMismatch",
    "TuningResult",
    "TuningRule",
    "admissible_rows",
    "budget_axes",
    "choose_setting",
    "evaluate",
    "first_known",
    "grid_points",
    "known_sample",
    "sweep_layers",
    "tune",
    "write_tuned_table",
]

FT_METHODS: tuple[str, ...] = tuple(n for n, e in EDIT_METHODS.items() if e.hparams is FTHyperParams)
"""The edit methods with an L∞ bound to tune (constrained finetuning)."""

PAPER_GRIDS: Mapping[type, Mapping[str, tuple]] = {
    ROMEHyperParams: {"kl_factor": (0.0625, 0.9, 1.0)},
    MEMITHyperParams: {"kl_factor": (0.0625, 0.9, 1.0)},
    # the paper's {1e-5, 2e-5, 5e-5, 1e-4}, extended upward by half-decades: a 135M model's W_out entries need
    # larger moves (SmolLM2's FT-1 rewrite at 1e-4 is 0.002); with Adam at lr 5e-4 × 25 steps no entry moves more than
    # ~1.3e-2, so 1e-2 is effectively unconstrained
    FTHyperParams: {"norm_constraint": (1e-5, 2e-5, 5e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},
}
"""Per hyper-parameter class, the paper's App. A grid (the field searched first)."""

BUDGET_GRIDS: Mapping[type, Mapping[str, tuple]] = {
    ROMEHyperParams: {"v_lr": (0.05, 0.1, 0.2, 0.5), "v_num_grad_steps": (25, 50)},
    MEMITHyperParams: {"v_lr": (0.05, 0.1, 0.2, 0.5), "v_num_grad_steps": (25, 50)},
    FTHyperParams: {"num_steps": (25, 50, 100)},
}
"""Per hyper-parameter class, the optimizer budget searched when the paper's grid does not reach ``reach`` (the base
value of each field is always included)."""

MONOTONE_FIELDS = frozenset({"norm_constraint"})
"""Grid fields along which the rewrite score grows (scanned upward; a scan stops after its first mean above the
ceiling, as larger values only edit more)."""


class TuningConfigMismatch(ValueError):
    """A tuning directory holds a run with another request (model, facts, layer, grids or rule)."""


@dataclass(frozen=True)
class TuningRule:
    """Hase et al.'s App. A rule, made explicit (module docstring).

    Attributes:
        ceiling: the highest admissible mean rewrite score (0.99: "no higher than 99 %").
        neighborhood_tolerance: admissible points keep their mean neighborhood score within this of the grid's best.
        reach: widen to the optimizer budget when the chosen mean rewrite is below this.
    """

    ceiling: float = 0.99
    neighborhood_tolerance: float = 0.05
    reach: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.ceiling <= 1:
            raise ValueError(f"ceiling must be in (0, 1], got {self.ceiling}")
        if not 0 <= self.neighborhood_tolerance <= 1:
            raise ValueError(f"neighborhood_tolerance must be in [0, 1], got {self.neighborhood_tolerance}")
        if not 0 <= self.reach <= self.ceiling:
            raise ValueError(f"reach must be in [0, ceiling], got {self.reach}")


_FLOAT_SLACK = 1e-12
"""A neighborhood this close below the rule's bound is still within it (0.95 − 0.05 is 0.8999999999999999 in floats:
a neighborhood of exactly 0.9 stays admissible). Both rules read it: the grid one and the layer one."""


def _keeps_neighborhood(nb, best: float, tolerance: float) -> bool:
    """``nb`` is finite and within ``tolerance`` of ``best`` (with :data:`_FLOAT_SLACK`)."""
    return nb is not None and not math.isnan(nb) and nb >= best - tolerance - _FLOAT_SLACK


def admissible_rows(table: pl.DataFrame, rule: TuningRule = TuningRule()) -> list[int]:
    """The row indices of ``table`` (one row per grid point, with ``rewrite_mean`` and ``neighborhood_mean``) that
    ``rule`` admits: rewrite ≤ ceiling and neighborhood ≥ max(neighborhood over the table) − tolerance.

    Raises:
        ValueError: an empty table or a missing column.
    """
    missing = {"rewrite_mean", "neighborhood_mean"} - set(table.columns)
    if table.height == 0 or missing:
        raise ValueError(f"need a non-empty grid with rewrite_mean and neighborhood_mean (missing {sorted(missing)})")
    rewrite = table["rewrite_mean"].to_list()
    neighborhood = table["neighborhood_mean"].to_list()
    best_nb = max((x for x in neighborhood if x is not None and not math.isnan(x)), default=math.nan)
    return [
        i for i, (r, nb) in enumerate(zip(rewrite, neighborhood))
        if r is not None and not math.isnan(r) and r <= rule.ceiling
        and (math.isnan(best_nb) or _keeps_neighborhood(nb, best_nb, rule.neighborhood_tolerance))
    ]


def choose_setting(table: pl.DataFrame, rule: TuningRule = TuningRule()) -> tuple[int, bool]:
    """The rule on a measured grid: ``(row index of the chosen point, within_rule)``.

    ``table``: one row per grid point in grid order, with ``rewrite_mean`` and ``neighborhood_mean``. Admissible:
    rewrite ≤ ceiling and neighborhood ≥ max(neighborhood) − tolerance; chosen: the admissible row with the highest
    rewrite (first on ties); none admissible: the row with the lowest rewrite, ``within_rule=False``.

    Raises:
        ValueError: an empty table or a missing column.
    """
    admissible = admissible_rows(table, rule)
    rewrite = table["rewrite_mean"].to_list()
    if admissible:
        return max(admissible, key=lambda i: (rewrite[i], -i)), True
    finite = [i for i, r in enumerate(rewrite) if not math.isnan(r)]
    if not finite:
        return 0, False
    return min(finite, key=lambda i: (rewrite[i], i)), False


def first_known(model: HookedTransformer, facts: Sequence[Fact], n: int, skip: int = 0) -> list[Fact]:
    """Known facts in dataset order (the paper's "first 100 points"), after the first ``skip`` known ones (so that a
    tuning sample can be disjoint from a study's first known facts): :func:`problems.filters.first_passing` with
    the cached :func:`problems.filters.known_mask`."""
    return first_passing(model, facts, n + skip)[skip:]


def known_sample(model: HookedTransformer, facts: Sequence[Fact], n: int, skip: int = 0, *,
                 record: str | Path | None = None, dataset: str = "") -> list[Fact]:
    """:func:`first_known`, remembered in ``record`` (a JSON file; a tuning directory's ``facts.json``): the ids
    and content digests of the selection, keyed by model, dataset, ``skip`` and ``n``. A resume on a machine
    without the known filter's cache (it lives in the per-machine cache, and decoding a dataset until 120 facts
    pass takes ~25 min for Gemma 3 270M on one thread) reads the selection back instead of decoding again; a fact
    whose content changed since makes it select afresh (and the tuning journal's request check then refuses a
    changed sample)."""
    from locedit.rundir import fact_digests
    from locedit.tracer.atomic import read_checked_json, write_checked_json
    from locedit.tracer.models import model_id

    key = f"{model_id(model)}|{dataset}|skip={skip}|n={n}"
    path = None if record is None else Path(record)
    saved: dict[str, Any] = {}
    if path is not None and path.exists():
        saved = read_checked_json(path)
        if key in saved:
            by_id = {f.id: f for f in facts}
            ids = list(saved[key])
            chosen = [by_id[i] for i in ids if i in by_id]
            if len(chosen) == len(ids) and fact_digests(chosen) == saved[key]:
                return chosen
    chosen = first_known(model, facts, n, skip=skip)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checked_json(path, {**saved, key: fact_digests(chosen)})
    return chosen


def grid_points(method: str, base, grids: Mapping[str, Sequence] | None = None,
                extra: Mapping[str, Sequence] | None = None) -> list[dict[str, Any]]:
    """The grid points of ``method`` in scan order: the paper's grid (``grids`` replaces it), crossed with ``extra``
    axes (field → values; optimizer-budget fields while widening). Monotone fields scan upward; the extra axes vary
    slowest (so a monotone scan can stop early within each combination)."""
    cls = resolve_method(method, aliases=False).hparams
    primary = dict(PAPER_GRIDS[cls] if grids is None else grids)
    if not primary:
        raise ValueError(f"{method}: an empty tuning grid")
    axes = {**primary, **dict(extra or {})}
    for f, values in axes.items():
        if not hasattr(base, f) or not values:
            raise ValueError(f"{method}: {f!r} is not a hyper-parameter of {cls.__name__} or has no values")
        if f in MONOTONE_FIELDS:
            axes[f] = tuple(sorted(values))
    order = [f for f in axes if f not in primary] + list(primary)
    return [dict(zip(order, combo)) for combo in itertools.product(*(axes[f] for f in order))]


def budget_axes(method: str, base, budget: Mapping[str, Sequence] | None = None) -> dict[str, tuple]:
    """The optimizer-budget fields searched while widening, in search order, each with its base value included
    (:data:`BUDGET_GRIDS` unless ``budget`` replaces it)."""
    cls = resolve_method(method, aliases=False).hparams
    out = {}
    for f, values in (BUDGET_GRIDS[cls] if budget is None else budget).items():
        if not hasattr(base, f):
            raise ValueError(f"{method}: {f!r} is not a hyper-parameter of {cls.__name__}")
        out[f] = tuple(sorted({*values, getattr(base, f)}))
    return out


def _in_run_order(methods: Sequence[str]) -> list[str]:
    """Method names, deduplicated, with r-ROME right after ROME (it reuses ROME's v* per setting)."""
    names = dict.fromkeys(resolve_method(m, aliases=False).name for m in methods)
    return sorted(names, key=lambda m: {"rome": 0, "r-rome": 1}.get(m, 2))


def _point_label(point: Mapping[str, Any]) -> str:
    return json.dumps({k: point[k] for k in sorted(point)}, sort_keys=True)


@dataclass(frozen=True)
class TuningResult:
    """One method × problem tuned by :func:`tune`.

    Attributes:
        problem, method, layer: what was tuned, at which (centre) layer.
        rule: the :class:`TuningRule` applied.
        chosen: the chosen grid point (field → value), the overrides the tuned profile stores.
        within_rule: False when no grid point was admissible (then ``chosen`` is the lowest-rewrite point).
        widened: the optimizer budget was searched because the paper's grid stayed below ``rule.reach``.
        table: one row per measured grid point (scan order): ``point`` (JSON), the grid fields, ``n``,
            ``rewrite_mean``, ``rewrite_sd``, ``paraphrase_mean``, ``neighborhood_mean``, ``p_post_mean``,
            ``opt_p_target_mean``, ``opt_steps_mean``, ``edit_seconds_mean``, ``stage`` ("paper" / "budget:<field>"),
            ``chosen``.
        fact_ids: the tuning facts.
    """

    problem: str
    method: str
    layer: int
    rule: TuningRule
    chosen: dict[str, Any]
    within_rule: bool
    widened: bool
    table: pl.DataFrame
    fact_ids: tuple[str, ...]

    @property
    def chosen_row(self) -> dict[str, Any]:
        return self.table.filter(pl.col("chosen")).row(0, named=True)

    def entry(self, model_name: str, date: str | None = None) -> dict[str, Any]:
        """This result as a tuned-table entry (:func:`tracer.profiles.read_tuned_table`), with its provenance."""
        from locedit import __version__

        row = self.chosen_row
        return {
            "problem": self.problem, "method": self.method, "overrides": dict(self.chosen),
            "within_rule": self.within_rule, "widened": self.widened,
            "rewrite_mean": row["rewrite_mean"], "neighborhood_mean": row["neighborhood_mean"],
            "paraphrase_mean": row["paraphrase_mean"],
            "provenance": {
                "model": model_name, "layer": self.layer, "facts": list(self.fact_ids), "rule": asdict(self.rule),
                "date": date or _dt.date.today().isoformat(), "locedit": __version__,
                "table": self.table.drop("chosen").to_dicts(),
            },
        }


def _summarise(rows: list[dict[str, Any]], point: dict[str, Any], stage: str) -> dict[str, Any]:
    def mean(col):
        xs = [r[col] for r in rows if r.get(col) is not None and not math.isnan(r[col])]
        return sum(xs) / len(xs) if xs else math.nan

    rw = [r["rewrite_score"] for r in rows]
    m = mean("rewrite_score")
    sd = math.sqrt(sum((x - m) ** 2 for x in rw) / (len(rw) - 1)) if len(rw) > 1 else math.nan
    return {"point": _point_label(point), **{k: float(v) for k, v in point.items()}, "n": len(rows),
            "rewrite_mean": m, "rewrite_sd": sd, "paraphrase_mean": mean("paraphrase_score"),
            "neighborhood_mean": mean("neighborhood_score"), "p_post_mean": mean("p_rewrite_post"),
            "opt_p_target_mean": mean("opt_p_target"), "opt_steps_mean": mean("opt_steps"),
            "rewrite_heldout_noise_mean": mean("rewrite_score_heldout_noise"),
            "edit_seconds_mean": mean("edit_seconds"), "stage": stage}


class _Runner:
    """Runs (and journals) edits for :func:`tune` / :func:`sweep_layers`: a fact's pre-edit scores per problem and
    its v* optimisations are computed once and shared by every grid point and method that can use them, and the key
    statistics of every layer the edits read are computed in one corpus pass before the first edit that needs them
    (as a study's :func:`locedit.study.key_statistics`; not one pass per layer as each is first reached)."""

    def __init__(self, model, facts, journal, methods: Sequence[str], layers: Sequence[int], noise,
                 covariance_tokens: int | None, progress, edit_samples: int | None = None,
                 stop: StopRequest | None = None):
        from locedit.editors.methods import lowest_edited_layers, method_layers, resolve_method, target_groups

        self.model, self.facts, self.journal, self.noise = model, list(facts), journal, noise
        n = model.cfg.n_layers
        self.checkpoints = lowest_edited_layers(methods, n, layers)
        self._groups = target_groups(methods, n, layers)
        self.key_methods = {m for m in methods if resolve_method(m, aliases=False).key_statistics}
        self.key_layers = tuple(sorted({x for m in self.key_methods for layer in layers
                                        for x in method_layers(m, n, layer)}))
        self._statistics_ready = False
        self.n_tokens, self.progress, self.edit_samples = covariance_tokens, progress, edit_samples
        self.stop = stop  # checked after each new edit (a tune's or held-out check's clean boundary)
        self.records: dict[str, dict[str, Any]] = {}
        self._pre: dict[tuple[str, str], Any] = {}
        self._memo: dict[str, Any] = {}
        if journal is not None:
            from locedit.journal import read_journal

            for r in read_journal(journal.path):
                self.records[r["key"]] = r

    def journaled_point(self, problem: str, method: str, layer: int, base, point: Mapping[str, Any]) -> dict:
        """``point`` under the label an earlier run journalled the same setting with, else with its values typed as
        ``base``'s fields: two labels of one setting (a base value written out, ``50`` vs ``50.0``, a grid searched
        in another order) must not run an edit twice."""
        want = _effective(base, point)
        prefix = f"{method}|{problem}|L{layer}|"
        labels = Counter(rec["point"] for key, rec in self.records.items() if key.startswith(prefix))
        for label, _ in labels.most_common():  # the label with the most journalled facts first
            old = json.loads(label)
            if all(hasattr(base, k) for k in old) and _effective(base, old) == want:
                return old
        return {k: _typed(base, k, v) for k, v in point.items()}

    def outcome(self, fact: Fact, problem: str, method: str, layer: int, hp, point: Mapping[str, Any]) -> dict:
        from locedit.editors import key_second_moment
        from locedit.editors.targets import TargetMemo
        from locedit.problems.run import pre_edit, run_edit

        key = f"{method}|{problem}|L{layer}|{_point_label(point)}|{fact.id}"
        if key in self.records:
            return self.records[key]
        if (fact.id, problem) not in self._pre:
            self._pre[(fact.id, problem)] = pre_edit(self.model, fact, problem, self.noise, essence=False,
                                                     checkpoint_layers=self.checkpoints,
                                                     edit_samples=self.edit_samples)
        memo = self._memo.setdefault(fact.id, TargetMemo(self._groups))
        n = self.n_tokens
        if method in self.key_methods and not self._statistics_ready:
            from locedit.editors import key_second_moments

            key_second_moments(self.model, self.key_layers, n_tokens=n, progress=False)  # cached on disk
            self._statistics_ready = True
        out = run_edit(self.model, fact, problem, method, layer, hparams=hp, noise=self.noise, essence=False,
                       pre=self._pre[(fact.id, problem)], targets=memo, edit_samples=self.edit_samples,
                       covariance=lambda m, lay: key_second_moment(m, lay, n_tokens=n, progress=False))
        rec = {"key": key, "point": _point_label(point), **out.as_row()}
        if self.journal is not None:
            self.journal.append(rec)
        self.records[key] = rec
        if self.stop is not None:
            self.stop.raise_if_requested(f"after an edit ({key}, journalled)")
        return rec


def _check_request(directory: Path, request: dict[str, Any], bases: Mapping[str, str] | None = None) -> None:
    """Refuse a directory whose journal was written for other edits. ``request``: what determines every journalled
    row besides its key (model, facts, layer(s), noise, ...) — it must equal the stored one; ``bases``: per
    "problem|method" the base hyper-parameters the grid points apply to — equal where both have the entry, new
    entries are added (a later run may tune more methods or problems, widen, or change the rule and grids in the same
    directory: those choose which rows run, not what a row holds)."""
    from locedit.tracer.atomic import write_atomic

    path = directory / "request.json"
    bases = dict(bases or {})
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        old_bases = old.pop("bases", {})
        diff = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
        diff += sorted(f"base hyper-parameters of {k}" for k in set(old_bases) & set(bases) if old_bases[k] != bases[k])
        if diff:
            raise TuningConfigMismatch(f"{directory} holds a tuning run with another {', '.join(diff)}; use a new "
                                       f"directory (or the same request to resume)")
        if set(bases) <= set(old_bases):
            return
        bases = {**old_bases, **bases}
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({**request, **({"bases": bases} if bases else {})}, indent=1, sort_keys=True) + "\n")


def tune(
    model: HookedTransformer,
    facts: Sequence[Fact],
    problems: Sequence[str],
    methods: Sequence[str],
    layer: int,
    *,
    rule: TuningRule = TuningRule(),
    grids: Mapping[str, Mapping[str, Sequence]] | None = None,
    budget: Mapping[str, Mapping[str, Sequence]] | None = None,
    widen: bool = True,
    directory: str | Path | None = None,
    noise=None,
    covariance_tokens: int | None = None,
    edit_samples: int | None = None,
    progress: Callable[[str], None] | None = None,
    stop: StopRequest | None = None,
) -> list[TuningResult]:
    """Tune every ``method`` × ``problem`` at ``layer`` over ``facts`` by the rule (module docstring).

    Args:
        facts: the tuning facts (the paper: the first 100 known; :func:`first_known`).
        problems, methods: names from ``problems.PROBLEMS`` and ``editors.EDIT_METHODS``.
        layer: the (centre) edit layer (the paper: the model's default).
        grids, budget: per method, replacements for :data:`PAPER_GRIDS` / :data:`BUDGET_GRIDS` (field → values).
        widen: search the optimizer budget when the paper's grid stays below ``rule.reach``.
        directory: journal and request here (resumable; a different request there raises
            :class:`TuningConfigMismatch`); None: nothing written.
        noise: the subject noise of Fact Forcing / Tracing Reversal (``problems.default_noise``'s default: scale 3).
        covariance_tokens: WikiText tokens of the key second moment (default: the editors').
        edit_samples: Fact Forcing's edit optimises over the first ``edit_samples`` noise draws (the study's
            ``forcing_edit_samples``, a cost knob; default all); tune with the value the study will use.
        progress: called with one line per measured grid point.
        stop: a :func:`locedit.stopping.stop_on_signal` request, checked after each new edit.

    Every other hyper-parameter is the problem's un-tuned base (``problem_hparams(..., tuned=False)``: the editors'
    defaults for the model with the paper's App. A overrides). Essence is not scored (not part of the rule).

    Raises:
        ValueError: unknown problem or method, no facts, a grid field the method does not have.
        RunStopped: ``stop`` was requested (every finished edit is journalled; the same call resumes).
    """
    from locedit.problems.variants import default_noise

    if not facts:
        raise ValueError("no facts to tune on")
    for p in problems:
        resolve_problem(p)
    methods = _in_run_order(methods)
    journal = None
    if directory is not None:
        from locedit.journal import Journal

        directory = Path(directory)
        _check_request(directory, {
            "model": model.cfg.model_name, "facts": [f.id for f in facts], "layer": int(layer),
            "covariance_tokens": covariance_tokens, "noise": None if noise is None else repr(noise),
            "edit_samples": edit_samples,
        }, {f"{p}|{m}": repr(problem_hparams(p, m, model, tuned=False)) for p in problems for m in methods})
        journal = Journal(directory / "tune.jsonl")
    runner = _Runner(model, facts, journal, methods, [layer], default_noise(model, noise), covariance_tokens,
                     progress, edit_samples, stop)
    results = []
    for problem in problems:
        for method in methods:
            base = problem_hparams(problem, method, model, tuned=False)
            mine = None if grids is None else grids.get(method)
            table = _scan(runner, problem, method, layer, base, grid_points(method, base, mine), "paper", rule)
            idx, within = choose_setting(table, rule)
            widened = False
            if widen and table["rewrite_mean"][idx] < rule.reach:
                # every combination of the budget fields (each with its base value), crossed with the paper grid's
                # monotone fields (FT's bound: more budget moves where the ceiling falls) and at the paper stage's
                # chosen value of the others (the KL weight: its effect is what that stage measured)
                widened = True
                axes = budget_axes(method, base, None if budget is None else budget.get(method))
                primary = dict(PAPER_GRIDS[resolve_method(method, aliases=False).hparams] if mine is None else mine)
                chosen_paper = json.loads(table["point"][idx])
                grid = {f: (values if f in MONOTONE_FIELDS else (chosen_paper.get(f, getattr(base, f)),))
                        for f, values in primary.items()}
                seen = {_effective(base, json.loads(p)) for p in table["point"]}
                points = grid_points(method, base, grid, axes)
                more = _scan(runner, problem, method, layer, base,
                             [p for p in points if _effective(base, p) not in seen], "budget:" + "×".join(axes), rule,
                             downward_after=table)
                if more.height:
                    table = pl.concat([table, more], how="diagonal_relaxed")
                table = table.with_columns(pl.col(c).fill_null(float(getattr(base, c)))
                                           for c in axes if c in table.columns)
                idx, within = choose_setting(table, rule)
            table = table.with_columns(pl.Series("chosen", [i == idx for i in range(table.height)]))
            chosen = json.loads(table["point"][idx])
            chosen = {k: _typed(base, k, v) for k, v in chosen.items()}
            results.append(TuningResult(problem, method, int(layer), rule, chosen, within, widened, table,
                                        tuple(f.id for f in facts)))
            if progress is not None:
                flag = "" if within else " (no admissible point: the lowest rewrite)"
                progress(f"{problem} {method} L{layer}: chosen {chosen}{flag}{' [budget widened]' if widened else ''}")
    return results


def _effective(base, point: Mapping[str, Any]):
    """The hyper-parameters a grid point runs with (two labels, one setting: the same)."""
    return replace(base, **{k: _typed(base, k, v) for k, v in point.items()})


def _typed(base, name: str, value):
    """A grid value with its dataclass field's type (JSON reads 25.0 back for an int step count)."""
    return type(getattr(base, name))(value)


def _scan(runner: _Runner, problem, method, layer, base, points, stage, rule,
          downward_after: pl.DataFrame | None = None) -> pl.DataFrame:
    """Measure ``points`` (grid order) over the runner's facts: one summary row each, in grid order.

    Upward (the paper stage): a budget combination's monotone scan stops after its first mean above the ceiling.
    ``downward_after`` (widening; the table measured so far): within each budget combination the monotone field is
    scanned from its largest value down and stops at the first point the rule admits against that table and the rows
    measured since (module docstring)."""
    rows = []
    stopped: set[str] = set()  # budget combinations whose scan is over

    def budget_of(point) -> str:
        return _point_label({k: v for k, v in point.items() if k not in MONOTONE_FIELDS})

    order = list(points)
    if downward_after is not None:  # budget combinations in grid order, each one's monotone values largest first
        first = {b: i for i, b in reversed(list(enumerate(map(budget_of, points))))}
        order.sort(key=lambda p: (first[budget_of(p)], tuple(-p[k] for k in p if k in MONOTONE_FIELDS)))
    for point in order:
        budget_key = budget_of(point)
        if budget_key in stopped:
            continue
        at = points.index(point)
        point = runner.journaled_point(problem, method, layer, base, point)
        hp = _effective(base, point)
        recs = [runner.outcome(f, problem, method, layer, hp, point) for f in runner.facts]
        row = _summarise(recs, point, stage)
        rows.append((at, row))
        if runner.progress is not None:
            runner.progress(f"{problem} {method} L{layer} {row['point']}: rewrite {row['rewrite_mean']:.3f} "
                            f"(sd {row['rewrite_sd']:.3f}, n {row['n']}), paraphrase {row['paraphrase_mean']:.3f}, "
                            f"neighborhood {row['neighborhood_mean']:.3f}, p(target) at the end of the optimisation "
                            f"{row['opt_p_target_mean']:.3f}, {row['edit_seconds_mean']:.1f} s/edit")
        if not set(point) & MONOTONE_FIELDS:
            continue
        if downward_after is None and row["rewrite_mean"] > rule.ceiling:
            stopped.add(budget_key)
        elif downward_after is not None:
            so_far = pl.concat([downward_after, pl.DataFrame([r for _, r in rows])], how="diagonal_relaxed")
            if so_far.height - 1 in admissible_rows(so_far, rule):
                stopped.add(budget_key)
    return pl.DataFrame([r for _, r in sorted(rows, key=lambda x: x[0])])


def evaluate(
    model: HookedTransformer,
    facts: Sequence[Fact],
    problems: Sequence[str],
    methods: Sequence[str],
    layer: int,
    *,
    directory: str | Path | None = None,
    noise=None,
    covariance_tokens: int | None = None,
    edit_samples: int | None = None,
    progress: Callable[[str], None] | None = None,
    stop: StopRequest | None = None,
) -> pl.DataFrame:
    """The model's current hyper-parameters (``problem_hparams``: tuned where its profile has a tuned table) on
    ``facts`` — held-out facts, not the tuning sample — at ``layer``: one row per problem × method with ``n``,
    ``rewrite_mean`` and its 95 % t-interval over facts (``ci_low``, ``ci_high``), ``paraphrase_mean``,
    ``neighborhood_mean``, ``opt_p_target_mean``, ``edit_seconds_mean``, ``tuned`` (whether a tuned entry was used)
    ``rewrite_heldout_noise_mean`` (Fact Forcing with ``edit_samples``: on the draws the edit did not see) and
    ``hparams`` (repr). ``directory``: journal here (resumable). ``stop``: checked after each new edit
    (:class:`locedit.stopping.RunStopped`)."""
    from locedit.problems.variants import default_noise
    from locedit.tracer.profiles import profile_for

    if not facts:
        raise ValueError("no facts to evaluate on")
    methods = _in_run_order(methods)
    for p in problems:
        resolve_problem(p)
    hps = {(p, m): problem_hparams(p, m, model) for p in problems for m in methods}
    journal = None
    if directory is not None:
        from locedit.journal import Journal

        directory = Path(directory)
        _check_request(directory, {"model": model.cfg.model_name, "facts": [f.id for f in facts], "layer": int(layer),
                                   "problems": list(problems), "methods": methods,
                                   "hparams": {f"{p}|{m}": repr(h) for (p, m), h in hps.items()},
                                   "covariance_tokens": covariance_tokens, "edit_samples": edit_samples,
                                   "noise": None if noise is None else repr(noise)})
        journal = Journal(directory / "evaluate.jsonl")
    runner = _Runner(model, facts, journal, methods, [layer], default_noise(model, noise), covariance_tokens, progress,
                     edit_samples, stop)
    tuned = profile_for(model).tuned
    rows = []
    for problem in problems:
        for method in methods:
            recs = [runner.outcome(f, problem, method, layer, hps[(problem, method)], {"evaluate": 1})
                    for f in runner.facts]
            row = _summarise(recs, {}, "held-out")
            n, sd = row["n"], row["rewrite_sd"]
            half = mean_half_width(sd, n)
            rows.append({"problem": problem, "method": method, "layer": int(layer), "n": n,
                         "rewrite_mean": row["rewrite_mean"], "ci_low": row["rewrite_mean"] - half,
                         "ci_high": row["rewrite_mean"] + half, "paraphrase_mean": row["paraphrase_mean"],
                         "neighborhood_mean": row["neighborhood_mean"], "opt_p_target_mean": row["opt_p_target_mean"],
                         "rewrite_heldout_noise_mean": row["rewrite_heldout_noise_mean"],
                         "edit_seconds_mean": row["edit_seconds_mean"], "tuned": (problem, method) in tuned,
                         "hparams": repr(hps[(problem, method)])})
            if progress is not None:
                r = rows[-1]
                progress(f"held-out {problem} {method} L{layer}: rewrite {r['rewrite_mean']:.3f} "
                         f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n {n}), neighborhood {r['neighborhood_mean']:.3f}")
    return pl.DataFrame(rows)


def write_tuned_table(path: str | Path, model_name: str, family: str, results: Sequence[TuningResult] = (),
                      edit_layer: LayerSweep | None = None, date: str | None = None) -> dict[str, Any]:
    """Merge ``results`` (and a layer sweep's choice) into the tuned table at ``path`` (created if absent): an entry
    per (problem, method) replaces an earlier one; written atomically. Returns the table written.

    The profile of ``family`` reads ``tracer/data/tuned/<family>.json`` (:func:`tracer.profiles.read_tuned_table`).
    """
    from locedit.journal import json_default
    from locedit.tracer.atomic import write_atomic
    from locedit.tracer.profiles import TUNED_FORMAT, read_tuned_table

    path = Path(path)
    table = read_tuned_table(path) if path.exists() else {"format": TUNED_FORMAT, "family": family,
                                                            "entries": [], "edit_layer": None}
    if table.get("family") != family:
        raise ValueError(f"{path} is the tuned table of {table.get('family')!r}, not {family!r}")
    new = {(r.problem, r.method): r.entry(model_name, date) for r in results}
    kept = [e for e in table["entries"] if (e["problem"], e["method"]) not in new]
    table["entries"] = sorted(kept + list(new.values()), key=lambda e: (e["problem"], e["method"]))
    if edit_layer is not None:
        table["edit_layer"] = edit_layer.entry(model_name, date)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(table, indent=1, sort_keys=True, default=json_default) + "\n")
    return table


@dataclass(frozen=True)
class LayerSweep:
    """Result of :func:`sweep_layers`.

    Attributes:
        problem, method: what was swept.
        table: one row per layer: ``layer, n, rewrite_mean, ci_low, ci_high`` (95 % t-interval over facts),
            ``paraphrase_mean, neighborhood_mean``, ``diff_vs_best`` (mean paired difference to the best layer),
            ``p_vs_best`` / ``p_vs_best_holm`` (paired t-test against the best layer, Holm-adjusted over layers),
            ``admissible`` (the layer rule's verdict, :func:`choose_layer`),
            ``indistinguishable`` (Holm p ≥ 0.05 or the best layer itself), ``trace_peaks`` (facts whose causal trace
            peaks at this layer).
        best_layer: the layer :func:`choose_layer` picks (the highest mean rewrite among the layers that edit
            without giving up more neighborhood than the rule allows).
        fact_ids: the facts.
        hparams: per problem × method, the hyper-parameters used (repr).
        peak_layers: each fact's tracing peak layer, in fact order (swept or not; empty without peaks).
    """

    problem: str
    method: str
    table: pl.DataFrame
    best_layer: int
    fact_ids: tuple[str, ...]
    hparams: str = ""
    peak_kind: str = "mlp"
    peak_layers: tuple[int, ...] = ()
    rule: TuningRule = TuningRule()

    @property
    def indistinguishable(self) -> list[int]:
        return self.table.filter(pl.col("indistinguishable"))["layer"].to_list()

    def entry(self, model_name: str, date: str | None = None) -> dict[str, Any]:
        from locedit import __version__

        return {"layer": int(self.best_layer), "problem": self.problem, "method": self.method,
                "indistinguishable": self.indistinguishable,
                "provenance": {"model": model_name, "facts": list(self.fact_ids), "hparams": self.hparams,
                               "peak_layers": list(self.peak_layers), "rule": asdict(self.rule),
                               "date": date or _dt.date.today().isoformat(), "locedit": __version__,
                               "table": self.table.to_dicts()}}


def choose_layer(table: pl.DataFrame, rule: TuningRule = TuningRule()) -> tuple[int, list[bool]]:
    """The layer rule: App. A's trade-off applied across layers. The *editing* layers are those whose mean rewrite
    reaches ``rule.reach``; a layer is admissible when it edits and its mean neighborhood score is within
    ``rule.neighborhood_tolerance`` of the best among the editing layers (a layer that edits nothing keeps a perfect
    neighborhood, so the reference is taken over the layers that edit); the chosen layer is the admissible one with
    the highest mean rewrite (ties: the lower layer). No layer reaches ``reach``: the highest mean rewrite, none
    admissible. (``rule.ceiling`` guards against over-tuned hyper-parameters and is not applied to layers.)

    ``table``: one row per layer with ``layer``, ``rewrite_mean``, ``neighborhood_mean``. Returns ``(layer,
    admissible per row)``."""
    layers, rw, nb = table["layer"].to_list(), table["rewrite_mean"].to_list(), table["neighborhood_mean"].to_list()
    editing = [i for i, r in enumerate(rw) if r is not None and not math.isnan(r) and r >= rule.reach]
    if not editing:
        i = max(range(len(layers)), key=lambda i: (-math.inf if rw[i] is None or math.isnan(rw[i]) else rw[i],
                                                   -layers[i]))
        return int(layers[i]), [False] * len(layers)
    ref = max(nb[i] for i in editing)
    ok = [i in editing and _keeps_neighborhood(nb[i], ref, rule.neighborhood_tolerance) for i in range(len(layers))]
    best = max((i for i in range(len(layers)) if ok[i]), key=lambda i: (rw[i], -layers[i]))
    return int(layers[best]), ok


def layer_table(rows: pl.DataFrame, peaks: Sequence[int] = (), alpha: float = 0.05,
                rule: TuningRule = TuningRule()) -> tuple[pl.DataFrame, int]:
    """Per-layer summary of a sweep's outcomes (``fact_id, layer, rewrite_score, paraphrase_score,
    neighborhood_score``): means with 95 % t-intervals over facts, the best layer (:func:`choose_layer`: the highest
    mean rewrite among the layers that edit without giving up neighborhood; column ``admissible``), paired t-tests of
    every layer's rewrite against it on the facts both have, Holm-adjusted (statsmodels), and the count of ``peaks``
    (one tracing peak layer per fact) at each layer. Returns ``(table, best_layer)``."""
    from scipy import stats as st
    from statsmodels.stats.multitest import multipletests

    agg = rows.group_by("layer").agg(
        pl.len().alias("n"), pl.col("rewrite_score").mean().alias("rewrite_mean"),
        pl.col("rewrite_score").std().alias("rewrite_sd"),
        pl.col("paraphrase_score").mean().alias("paraphrase_mean"),
        pl.col("neighborhood_score").mean().alias("neighborhood_mean"),
    ).sort("layer")
    half = [mean_half_width(sd, n) for n, sd in zip(agg["n"], agg["rewrite_sd"])]
    agg = agg.with_columns((pl.col("rewrite_mean") - pl.Series(half)).alias("ci_low"),
                           (pl.col("rewrite_mean") + pl.Series(half)).alias("ci_high"))
    best, admissible = choose_layer(agg, rule)
    agg = agg.with_columns(pl.Series("admissible", admissible))
    wide = rows.pivot(on="layer", index="fact_id", values="rewrite_score")
    diffs, ps = [], []
    for layer in agg["layer"]:
        pair = wide.select(pl.col(str(layer)).alias("this"), pl.col(str(best)).alias("best")).drop_nulls()
        d = (pair["this"] - pair["best"]).to_numpy()
        diffs.append(float(d.mean()) if len(d) else math.nan)
        if layer == best or len(d) < 2 or float(d.std()) == 0.0:
            ps.append(1.0 if layer == best else (math.nan if len(d) < 2 else (1.0 if d.mean() == 0 else 0.0)))
        else:
            ps.append(float(st.ttest_1samp(d, 0.0).pvalue))
    # the family: every other layer against the best (the best's own "p = 1" is no test and stays out of it)
    finite = [i for i, (p, lay) in enumerate(zip(ps, agg["layer"])) if not math.isnan(p) and lay != best]
    holm = [1.0 if lay == best else math.nan for lay in agg["layer"]]
    if finite:
        adj = multipletests([ps[i] for i in finite], alpha=alpha, method="holm")[1]
        for i, a in zip(finite, adj):
            holm[i] = float(a)
    counts = {layer: 0 for layer in agg["layer"]}
    for p in peaks:
        counts[p] = counts.get(p, 0) + 1
    agg = agg.with_columns(
        pl.Series("diff_vs_best", diffs), pl.Series("p_vs_best", ps), pl.Series("p_vs_best_holm", holm),
        pl.Series("indistinguishable", [lay == best or (not math.isnan(h) and h >= alpha)
                                        for lay, h in zip(agg["layer"], holm)]),
        pl.Series("trace_peaks", [counts[lay] for lay in agg["layer"]]),
    )
    return agg, best


def sweep_layers(
    model: HookedTransformer,
    facts: Sequence[Fact],
    problem: str,
    method: str,
    layers: Sequence[int],
    *,
    hparams=None,
    directory: str | Path | None = None,
    noise=None,
    covariance_tokens: int | None = None,
    peaks: bool = True,
    rule: TuningRule = TuningRule(),
    progress: Callable[[str], None] | None = None,
    stop: StopRequest | None = None,
) -> LayerSweep:
    """Edit every fact at every layer with ``method`` for ``problem`` and summarise by layer (:func:`layer_table`).

    ``hparams``: default the model's (tuned) ``problem_hparams``. A fact's v* at all layers is one lockstep batch.
    ``peaks``: also trace each fact (Causal Tracing of ``hook_mlp_out`` windows, the study's default noise) and count
    where its fractional effect peaks. ``directory``: journal here (resumable). ``stop``: checked after each fact's
    layers (a fact's lockstep v* batch is never cut in two; :class:`locedit.stopping.RunStopped`).
    """
    from locedit.problems.variants import default_noise

    if not facts:
        raise ValueError("no facts to sweep")
    layers = sorted(set(int(x) for x in layers))
    if len(layers) < 2:
        raise ValueError(f"a layer sweep needs at least two layers, got {layers}")
    method = resolve_method(method, aliases=False).name
    resolve_problem(problem)
    hp = problem_hparams(problem, method, model) if hparams is None else hparams
    journal = None
    if directory is not None:
        from locedit.journal import Journal

        directory = Path(directory)
        _check_request(directory, {"model": model.cfg.model_name, "facts": [f.id for f in facts], "layers": layers,
                                   "problem": problem, "method": method, "hparams": repr(hp),
                                   "covariance_tokens": covariance_tokens})
        journal = Journal(directory / "sweep.jsonl")
    snoise = default_noise(model, noise)
    runner = _Runner(model, facts, journal, [method], layers, snoise, covariance_tokens, progress)
    recs = []
    for i, fact in enumerate(facts):
        for layer in layers:
            recs.append(runner.outcome(fact, problem, method, layer, hp, {"sweep": 1}))
        if progress is not None:
            progress(f"fact {i + 1}/{len(facts)} {fact.id}: rewrite by layer "
                     + " ".join(f"{r['rewrite_score']:.2f}" for r in recs[-len(layers):]))
        if stop is not None and i + 1 < len(facts):
            stop.raise_if_requested(f"after fact {fact.id}'s layers (journalled)")
    peak_layers = []
    if peaks:
        peak_layers = [_trace_peak(model, f, snoise, journal, runner.records) for f in facts]
    rows = pl.DataFrame([{k: r[k] for k in ("fact_id", "layer", "rewrite_score", "paraphrase_score",
                                            "neighborhood_score")} for r in recs])
    table, best = layer_table(rows, peak_layers, rule=rule)
    return LayerSweep(problem, method, table, best, tuple(f.id for f in facts), repr(hp),
                      peak_layers=tuple(int(x) for x in peak_layers), rule=rule)


def _trace_peak(model, fact: Fact, noise, journal, records) -> int:
    """The layer where ``fact``'s Causal Tracing (MLP windows) fractional effect peaks (journalled)."""
    from locedit.tracer.tracing import trace

    key = f"trace|{fact.id}"
    if key in records:
        return int(records[key]["peak_layer"])
    res = trace(model, fact.prompt, fact.subject, fact.o_true, kind="mlp", noise=noise)
    rec = {"key": key, "fact_id": fact.id, "peak_layer": int(res.peak_layer())}
    if journal is not None:
        journal.append(rec)
    records[key] = rec
    return rec["peak_layer"]
