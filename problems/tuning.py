"""Tuning constrained finetuning's L∞ bound per model, by Hase et al.'s rule (App. A).

The paper's FT norm constraints (EI FT-1 1e-4, FT-5 2e-5, ...) were tuned for GPT-J "so that the rewrite score is no
higher than 99%, on the first 100 points at the default layer". They do not transfer: on SmolLM2 the GPT-J bounds
leave the model unchanged (rewrite 0.001, `configs/editors_table.toml`). :func:`tune_norm_constraint` applies the
same rule to any model: it runs the problem's FT edit over increasing bounds and keeps the largest bound whose mean
rewrite score stays ≤ the ceiling (:func:`choose_norm_constraint`).

Rewrite score: (p* − p)/(1 − p) for maximizing problems, max(0, (p − p*)/p) for Fact Erasure (Hase et al. §3.3), as
:func:`problems.run_edit` reports it. Scanning stops after the first bound above the ceiling (``stop_above``): with
Adam at a fixed learning rate the reachable set, and in practice the rewrite score, grows with the bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import polars as pl
from transformer_lens import HookedTransformer

from locedit.problems.facts import Fact
from locedit.problems.filters import first_passing
from locedit.problems.run import run_edit
from locedit.editors.hparams import FTHyperParams
from locedit.editors.methods import EDIT_METHODS
from locedit.problems.variants import problem_hparams, resolve_problem

__all__ = ["DEFAULT_BOUNDS", "FT_METHODS", "NormConstraintTuning", "choose_norm_constraint", "first_known", "tune_norm_constraint"]

FT_METHODS: tuple[str, ...] = tuple(n for n, e in EDIT_METHODS.items() if e.hparams is FTHyperParams)
"""The edit methods with an L∞ bound to tune (constrained finetuning)."""

DEFAULT_BOUNDS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
"""Candidate L∞ bounds. With FT's defaults (Adam, lr 5e-4, 25 steps) no entry moves by more than ~25 × 5e-4 ≈ 1.3e-2,
so bounds above 1e-2 are unconstrained."""


@dataclass(frozen=True)
class NormConstraintTuning:
    """Result of :func:`tune_norm_constraint`.

    Attributes:
        problem, method, layer: what was tuned ("ft-1" / "ft-5", centre layer).
        ceiling: the rule's ceiling on the mean rewrite score (0.99).
        chosen: the largest scanned bound with mean rewrite ≤ ceiling (the smallest scanned bound if none is).
        within_ceiling: False when even the smallest bound exceeded the ceiling.
        table: one row per scanned bound: ``norm_constraint, n, rewrite_mean, rewrite_sd, p_post_mean,
            neighborhood_mean, edit_seconds_mean``.
        fact_ids: the facts used.
    """

    problem: str
    method: str
    layer: int
    ceiling: float
    chosen: float
    within_ceiling: bool
    table: pl.DataFrame
    fact_ids: tuple[str, ...]


def choose_norm_constraint(bounds: Sequence[float], mean_rewrites: Sequence[float], ceiling: float = 0.99) -> tuple[float, bool]:
    """The rule: the largest bound whose mean rewrite score is ≤ ``ceiling``; (smallest bound, False) if none is.

    Returns ``(bound, within_ceiling)``.
    """
    if len(bounds) == 0 or len(bounds) != len(mean_rewrites):
        raise ValueError(f"need one mean rewrite per bound, got {len(bounds)} bounds and {len(mean_rewrites)} means")
    ok = [b for b, r in zip(bounds, mean_rewrites) if r <= ceiling]
    if ok:
        return max(ok), True
    return min(bounds), False


def first_known(model: HookedTransformer, facts: Sequence[Fact], n: int) -> list[Fact]:
    """The first ``n`` facts, in dataset order, that the model knows (the paper's "first 100 points";
    :func:`problems.filters.first_passing` with the cached :func:`problems.filters.known_mask`)."""
    return first_passing(model, facts, n)


def tune_norm_constraint(
    model: HookedTransformer,
    facts: Sequence[Fact],
    problem: str,
    method: str,
    layer: int,
    *,
    bounds: Sequence[float] | None = None,
    ceiling: float = 0.99,
    stop_above: bool = True,
    progress: Callable[[str], None] | None = None,
) -> NormConstraintTuning:
    """Scan FT's L∞ bound for ``problem`` × ``method`` at ``layer`` over ``facts`` (Hase et al.'s rule: rewrite score
    no higher than ``ceiling``, tuned on the first 100 facts at the default layer).

    Every other hyper-parameter is the problem's (:func:`problems.variants.problem_hparams`, e.g. 50 steps for Fact
    Forcing). Essence is not scored (not part of the rule). ``progress``: called with one line per bound.

    Raises:
        ValueError: not an FT method, unknown problem, no facts, a non-positive bound or a ceiling outside (0, 1].
    """
    m = str(method).lower()
    if m not in FT_METHODS:
        raise ValueError(f"norm-constraint tuning is for the constrained-finetuning methods {FT_METHODS}, got {method!r}")
    resolve_problem(problem)
    if not facts:
        raise ValueError("no facts to tune on")
    if not 0 < ceiling <= 1:
        raise ValueError(f"ceiling must be in (0, 1], got {ceiling}")
    bounds = DEFAULT_BOUNDS if bounds is None else bounds
    scan = sorted(float(b) for b in bounds)
    if not scan or scan[0] <= 0:
        raise ValueError(f"bounds must be positive, got {list(bounds)}")
    base = problem_hparams(problem, m, model.cfg.model_name)
    rows = []
    for bound in scan:
        hp = replace(base, norm_constraint=bound)
        outs = [run_edit(model, f, problem, m, layer, hparams=hp, essence=False) for f in facts]
        row = pl.DataFrame(
            {
                "rewrite": [o.rewrite_score for o in outs],
                "p_post": [o.p_rewrite_post for o in outs],
                "neighborhood": [o.neighborhood_score for o in outs],
                "edit_seconds": [o.edit_seconds for o in outs],
            }
        ).select(
            pl.lit(bound).alias("norm_constraint"),
            pl.len().alias("n"),
            pl.col("rewrite").mean().alias("rewrite_mean"),
            pl.col("rewrite").std().alias("rewrite_sd"),
            pl.col("p_post").mean().alias("p_post_mean"),
            pl.col("neighborhood").mean().alias("neighborhood_mean"),
            pl.col("edit_seconds").mean().alias("edit_seconds_mean"),
        )
        rows.append(row)
        r = row.row(0, named=True)
        if progress is not None:
            progress(f"{problem} {m} L{layer} bound {bound:.0e}: rewrite {r['rewrite_mean']:.3f} "
                     f"(sd {r['rewrite_sd']:.3f}, n {r['n']}), p* {r['p_post_mean']:.3f}, "
                     f"neighborhood {r['neighborhood_mean']:.3f}, {r['edit_seconds_mean']:.1f} s/edit")
        if stop_above and r["rewrite_mean"] > ceiling:
            break
    table = pl.concat(rows)
    chosen, within = choose_norm_constraint(table["norm_constraint"].to_list(), table["rewrite_mean"].to_list(), ceiling)
    return NormConstraintTuning(problem, m, int(layer), float(ceiling), chosen, within, table,
                                tuple(f.id for f in facts))
