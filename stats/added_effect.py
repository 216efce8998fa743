"""The primary test of "does localization inform editing?" at the level the question is asked: within facts.

Hase et al.'s pooled analysis regresses edit success on the edit layer with and without the tracing effect, over
every edit, and reads ΔR² with an F-test. A study edits each fact at several layers, so its rows are not independent,
and the pooled model mixes *between-fact* association (facts that trace strongly may be easier or harder to edit) into
the *within-fact* question the paper asks: does the tracing effect at a layer tell you which layer of *this* fact to
edit? :func:`added_effect` answers that question.

Model (two-way fixed effects, one row per edit of fact f at layer l)::

    score_fl = α_f + β_l + γ · trace_fl + ε_fl            (slopes="common"; "per_layer": γ_l · trace_fl)

The fact effects α_f absorb everything about a fact (its difficulty, its mean tracing effect), the layer effects β_l
the layer's average; γ is identified by within-fact, within-layer variation only (Frisch–Waugh–Lovell: the
statistic depends on trace only through its two-way-demeaned residual). Reported:

* ``partial_r2`` — the tracing term's share of the variance left after fact and layer:
  (SSR_{fact+layer} − SSR_{fact+layer+trace}) / SSR_{fact+layer};
* ``p_value`` — a permutation test that respects the clustering: the tracing *curves* (a fact's trace values at all
  its layers, kept together) are permuted across facts (within sets of facts edited at the same layers). Each
  fact's scores, and the dependence between its edits, stay intact; under H0 (no within-fact relation between a
  layer's tracing effect and its edit success) a fact's curve is exchangeable with another fact's, whatever the
  facts' difficulties. p = (1 + #{perm ≥ observed}) / (1 + n_permutations);
* ``ci`` — a cluster bootstrap over facts (facts resampled with replacement; a drawn fact keeps its own effect) with
  BCa correction (bias z₀ from the share of replicates below the estimate, acceleration from the jackknife over
  facts): the naive percentile interval of a bounded, upward-biased statistic like partial R² is not calibrated;
* ``mde`` — the smallest partial R² the frame's own design detects with 80 % power at α (noncentral F with the
  design's degrees of freedom, λ = f²·n);
* the equivalence verdict against a declared smallest effect of interest ``sesoi`` (one-sided: partial R² ≥ 0):
  "effect" when p < α; "equivalent" when the upper bound of the (1 − 2α) interval is below the SESOI (the TOST
  convention); otherwise "inconclusive";
* ``delta_r2`` — the paper's pooled ΔR² = R²(score ~ C(layer) · trace) − R²(score ~ C(layer)) for comparison, and
  ``pooled_partial_r2`` = ΔR² / (1 − R²_layer), comparable across models whose layer R² differs;
* ``mixed`` — a robustness check: a linear mixed model with a random fact intercept (statsmodels ``MixedLM``, ML),
  ``score ~ C(layer) + trace`` vs ``score ~ C(layer)``, likelihood-ratio test.

The tracing covariate can be bounded first (``bound``): "none", "clip" (to [0, 1]: fractional effects above 1
arise where noise barely lowers p) or "rank" (ranks over all rows).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import polars as pl
from scipy import stats as sps

__all__ = ["AddedEffect", "MixedCheck", "PairedAddedEffect", "UnsuitableFrameError", "added_effect",
           "minimum_detectable_effect", "paired_added_effect", "pooled_partial_r2"]

Bound = Literal["none", "clip", "rank"]
Slopes = Literal["common", "per_layer"]
_GROUP_COLUMNS = ("problem", "method", "localization", "kind", "window", "token")
_NAN = float("nan")


class UnsuitableFrameError(ValueError):
    """The frame holds several analyses, or lacks a column the test needs."""


@dataclass(frozen=True)
class MixedCheck:
    """Random-fact-intercept model, ML: ``score ~ C(layer) + trace`` vs ``score ~ C(layer)``."""

    coef: float
    lr_stat: float
    p_value: float
    note: str = ""


@dataclass(frozen=True)
class AddedEffect:
    """The within-fact added effect of the tracing effect on edit success (see the module docstring)."""

    test: str
    metric: str
    partial_r2: float
    slope: float
    p_value: float
    ci: tuple[float, float]
    ci_level: float
    mde: float
    sesoi: float
    alpha: float
    verdict: str
    delta_r2: float
    pooled_partial_r2: float
    r2_layer: float
    n_facts: int
    n_edits: int
    n_layers: int
    n_permutations: int
    bound: str
    slopes: str
    mixed: MixedCheck | None
    note: str = ""

    def as_row(self) -> dict:
        d = asdict(self)
        d["ci_low"], d["ci_high"] = self.ci
        del d["ci"]
        mixed = d.pop("mixed") or {}
        d.update({f"mixed_{k}": v for k, v in mixed.items()})
        return d

    @property
    def sentence(self) -> str:
        """One sentence that says only what the numbers support."""
        if not math.isfinite(self.partial_r2):
            return f"No estimate: {self.note}"
        lo, hi = self.ci
        base = (f"within facts, the tracing effect adds a partial R² of {self.partial_r2:.3f} "
                f"[{100 * self.ci_level:.0f}% CI {lo:.3f}, {hi:.3f}] to fact and layer (permutation p = "
                f"{self.p_value:.3g}; n = {self.n_facts} facts, {self.n_edits} edits; detectable with 80% power: "
                f"≥ {self.mde:.3f})")
        if self.verdict == "effect":
            return f"{base}: evidence of an added effect."
        if self.verdict == "equivalent":
            return f"{base}: an added effect of {self.sesoi:g} or more is ruled out (equivalence at α = {self.alpha})."
        return (f"{base}: no evidence of an added effect, and the data cannot rule out one of {self.sesoi:g} "
                "(inconclusive).")


# ------------------------------------------------------------------------------------------------ frame handling
def _single_group(frame: pl.DataFrame) -> None:
    cols = [c for c in _GROUP_COLUMNS if c in frame.columns]
    if not cols:
        return
    groups = frame.select(cols).unique()
    if groups.height > 1:
        found = "; ".join(", ".join(f"{c}={r[c]}" for c in cols) for r in groups.head(6).to_dicts())
        raise UnsuitableFrameError(f"added_effect tests one analysis (one problem × method × localization); this "
                                   f"frame holds {groups.height}: {found}{' ...' if groups.height > 6 else ''} — "
                                   "filter it first")


def _bounded(trace: np.ndarray, bound: Bound) -> np.ndarray:
    if bound == "none":
        return trace
    if bound == "clip":
        return np.clip(trace, 0.0, 1.0)
    if bound == "rank":
        return sps.rankdata(trace) / len(trace)
    raise ValueError(f"bound must be 'none', 'clip' or 'rank', got {bound!r}")


@dataclass
class _Panel:
    fact: np.ndarray  # int codes
    layer: np.ndarray  # int codes
    trace: np.ndarray
    score: np.ndarray
    n_facts: int
    n_layers: int
    layers: np.ndarray  # the layer values


def _panel(frame: pl.DataFrame, metric: str, bound: Bound) -> tuple[_Panel | None, str]:
    need = {"fact_id", "layer", "trace", metric}
    missing = sorted(need - set(frame.columns))
    if missing:
        raise UnsuitableFrameError(f"added_effect needs columns {sorted(need)}; missing {missing}")
    _single_group(frame)
    sub = frame.select(pl.col("fact_id").cast(pl.String), pl.col("layer").cast(pl.Int64),
                       pl.col("trace").cast(pl.Float64).fill_nan(None), pl.col(metric).cast(pl.Float64).fill_nan(None))
    n_all = sub.height
    sub = sub.drop_nulls()
    notes = []
    if sub.height < n_all:
        notes.append(f"{n_all - sub.height} edits without a finite trace or score dropped")
    if sub.height and sub["layer"].n_unique() < 2:
        return None, "; ".join(notes + ["one edit layer: the layer and the fact explain every row"])
    counts = sub.group_by("fact_id").len()
    single = counts.filter(pl.col("len") < 2)["fact_id"]
    if single.len():
        sub = sub.filter(~pl.col("fact_id").is_in(single.implode()))
        notes.append(f"{single.len()} fact(s) with a single edit dropped (no within-fact contrast)")
    if sub.height == 0:
        return None, "; ".join(notes + ["no edits left"])
    facts, fcode = np.unique(sub["fact_id"].to_numpy(), return_inverse=True)
    layers, lcode = np.unique(sub["layer"].to_numpy(), return_inverse=True)
    if len(facts) < 3:
        return None, "; ".join(notes + [f"{len(facts)} fact(s): a within-fact test needs at least 3"])
    if len(layers) < 2:
        return None, "; ".join(notes + ["one edit layer: the layer and the fact explain every row"])
    trace = _bounded(sub["trace"].to_numpy(), bound)
    return _Panel(fcode, lcode, trace, sub[metric].to_numpy(), len(facts), len(layers), layers), "; ".join(notes)


# ------------------------------------------------------------------------------------------------ linear algebra
def _design_basis(fact: np.ndarray, layer: np.ndarray, n_layers: int) -> np.ndarray:
    n = len(fact)
    n_f = int(fact.max()) + 1
    X = np.zeros((n, n_f + n_layers))
    X[np.arange(n), fact] = 1.0
    X[np.arange(n), n_f + layer] = 1.0
    q, r = np.linalg.qr(X)
    d = np.abs(np.diag(r))
    return q[:, d > 1e-10 * max(1.0, float(d.max()))]


def _resid(Q: np.ndarray, V: np.ndarray) -> np.ndarray:
    return V - Q @ (Q.T @ V)


def _regressors(trace: np.ndarray, layer: np.ndarray, n_layers: int, slopes: Slopes) -> np.ndarray:
    """[n, k] (k = 1 or n_layers) or [n, k, B] for a batch of traces [n, B]."""
    if slopes == "common":
        return trace[:, None] if trace.ndim == 1 else trace[:, None, :]
    onehot = (layer[:, None] == np.arange(n_layers)[None, :]).astype(float)
    return onehot * trace[:, None] if trace.ndim == 1 else onehot[:, :, None] * trace[:, None, :]


def _partial_r2(Q: np.ndarray, y_res: np.ndarray, Z: np.ndarray) -> float:
    """Share of ‖y_res‖² explained by the residualized regressors Z [n, k]."""
    Zr = _resid(Q, Z)
    ss = float(y_res @ y_res)
    if ss <= 0:
        return _NAN
    beta, *_ = np.linalg.lstsq(Zr, y_res, rcond=None)
    fit = Zr @ beta
    return float(fit @ fit) / ss


def _partial_r2_batch(Q: np.ndarray, y_res: np.ndarray, traces: np.ndarray, layer: np.ndarray, n_layers: int,
                      slopes: Slopes) -> np.ndarray:
    """Partial R² for each column of ``traces`` [n, B] (the permutation null)."""
    ss = float(y_res @ y_res)
    if slopes == "common":
        Tr = _resid(Q, traces)  # [n, B]
        num = (y_res @ Tr) ** 2
        den = np.einsum("nb,nb->b", Tr, Tr) * ss
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)
    out = np.empty(traces.shape[1])
    for b in range(traces.shape[1]):
        out[b] = _partial_r2(Q, y_res, _regressors(traces[:, b], layer, n_layers, "per_layer"))
    return out


def _fit(Q: np.ndarray, layer, trace, score, n_layers, slopes) -> tuple[float, float, np.ndarray]:
    """(partial R², common slope γ, the score's residual on fact + layer) given the fact + layer basis ``Q``."""
    y_res = _resid(Q, score)
    t_res = _resid(Q, trace)
    tt = float(t_res @ t_res)
    slope = float(t_res @ y_res) / tt if tt > 0 else _NAN
    return _partial_r2(Q, y_res, _regressors(trace, layer, n_layers, slopes)), slope, y_res


def _statistic(fact, layer, trace, score, n_layers, slopes) -> tuple[float, float]:
    """(partial R², common slope γ) of one panel."""
    return _fit(_design_basis(fact, layer, n_layers), layer, trace, score, n_layers, slopes)[:2]


# ------------------------------------------------------------------------------------------------ inference
def _strata(panel: _Panel) -> list[np.ndarray]:
    """Facts grouped by their set of edit layers; per stratum an [n_facts_in_stratum, n_its_layers] array of row
    indices, each fact's rows in layer order (a fact with a layer twice keeps both rows, in order)."""
    order = np.lexsort((panel.layer, panel.fact))
    by_fact = np.split(order, np.flatnonzero(np.diff(panel.fact[order])) + 1)
    groups: dict[tuple, list[np.ndarray]] = {}
    for rows in by_fact:
        groups.setdefault(tuple(panel.layer[rows]), []).append(rows)
    return [np.stack(g) for g in groups.values()]


def _permutation_traces(panel: _Panel, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """[n, B]: each column the panel's trace with whole curves permuted across facts that share a layer set."""
    out = np.empty((len(panel.trace), n_permutations))
    for rows in _strata(panel):
        curves = panel.trace[rows]  # [m, k]
        perms = np.argsort(rng.random((n_permutations, rows.shape[0])), axis=1)  # [B, m]
        out[rows.reshape(-1), :] = curves[perms].reshape(n_permutations, -1).T
    return out


def _balanced(panel: _Panel) -> np.ndarray | None:
    """[n_facts, n_layers] row indices when every fact has exactly one edit at every layer, else None."""
    strata = _strata(panel)
    if len(strata) == 1 and strata[0].shape[1] == panel.n_layers:
        return strata[0]
    return None


def _two_way(x: np.ndarray) -> np.ndarray:
    """Residual of x [..., F, L] on fact and layer effects in a balanced panel: x − x̄_f − x̄_l + x̄."""
    return x - x.mean(-1, keepdims=True) - x.mean(-2, keepdims=True) + x.mean((-2, -1), keepdims=True)


def _common_r2(t: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Partial R² of a common slope in balanced panels t, y [..., F, L]."""
    tr, yr = _two_way(t), _two_way(y)
    num = np.einsum("...fl,...fl->...", tr, yr) ** 2
    den = np.einsum("...fl,...fl->...", tr, tr) * np.einsum("...fl,...fl->...", yr, yr)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _bca(theta: float, boots: np.ndarray, jack: np.ndarray, level: float) -> tuple[float, float]:
    ok = boots[np.isfinite(boots)]
    if len(ok) < 20 or not math.isfinite(theta):
        return _NAN, _NAN
    prop = (np.sum(ok < theta) + 0.5 * np.sum(ok == theta)) / len(ok)
    prop = min(max(prop, 1.0 / (len(ok) + 1)), len(ok) / (len(ok) + 1))
    z0 = sps.norm.ppf(prop)
    jk = jack[np.isfinite(jack)]
    d = jk.mean() - jk
    denom = 6.0 * (np.sum(d ** 2) ** 1.5)
    a = float(np.sum(d ** 3) / denom) if denom > 0 else 0.0
    alpha = (1 - level) / 2
    qs = []
    for z in (sps.norm.ppf(alpha), sps.norm.ppf(1 - alpha)):
        adj = sps.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
        qs.append(float(np.quantile(ok, min(max(adj, 0.0), 1.0))))
    return qs[0], qs[1]


def _cluster_bootstrap(panel: _Panel, slopes: Slopes, n_boot: int, rng: np.random.Generator):
    grid = _balanced(panel)
    if grid is not None and slopes == "common":  # closed form, all replicates at once
        T, Y = panel.trace[grid], panel.score[grid]  # [F, L]
        picks = rng.integers(0, panel.n_facts, (n_boot, panel.n_facts))
        boots = _common_r2(T[picks], Y[picks])
        keep = ~np.eye(panel.n_facts, dtype=bool)
        jack = _common_r2(np.stack([T[k] for k in keep]), np.stack([Y[k] for k in keep]))
        return boots, jack
    rows_of = [np.flatnonzero(panel.fact == f) for f in range(panel.n_facts)]
    boots = np.full(n_boot, np.nan)
    for b in range(n_boot):
        pick = rng.integers(0, panel.n_facts, panel.n_facts)
        idx = np.concatenate([rows_of[f] for f in pick])
        fact = np.concatenate([np.full(len(rows_of[f]), i) for i, f in enumerate(pick)])
        boots[b] = _statistic(fact, panel.layer[idx], panel.trace[idx], panel.score[idx], panel.n_layers, slopes)[0]
    jack = np.full(panel.n_facts, np.nan)
    for f in range(panel.n_facts):
        keep = panel.fact != f
        fact = panel.fact[keep]
        fact = np.where(fact > f, fact - 1, fact)
        jack[f] = _statistic(fact, panel.layer[keep], panel.trace[keep], panel.score[keep], panel.n_layers,
                             slopes)[0]
    return boots, jack


def minimum_detectable_effect(n_edits: int, n_facts: int, n_layers: int, *, k: int = 1, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest partial R² a fixed-effects F-test of ``k`` added terms detects with ``power`` at ``alpha`` in a
    design of ``n_edits`` rows, ``n_facts`` fact and ``n_layers`` layer effects (noncentral F, λ = f²·n)."""
    df2 = n_edits - n_facts - n_layers + 1 - k
    if df2 < 1:
        return _NAN
    crit = sps.f.ppf(1 - alpha, k, df2)
    lo, hi = 0.0, 10.0
    for _ in range(80):  # bisection on f²
        mid = (lo + hi) / 2
        if sps.ncf.sf(crit, k, df2, mid * n_edits) < power:
            lo = mid
        else:
            hi = mid
    f2 = (lo + hi) / 2
    return f2 / (1 + f2)


def _mixed(panel: _Panel) -> MixedCheck | None:
    try:
        import pandas as pd
        import statsmodels.formula.api as smf
    except ImportError:  # pragma: no cover
        return None
    df = pd.DataFrame({"score": panel.score, "trace": panel.trace, "layer": panel.layers[panel.layer],
                       "fact": panel.fact})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = smf.mixedlm("score ~ C(layer) + trace", df, groups=df["fact"]).fit(reml=False)
            null = smf.mixedlm("score ~ C(layer)", df, groups=df["fact"]).fit(reml=False)
        lr = max(0.0, 2.0 * (full.llf - null.llf))
        return MixedCheck(float(full.params["trace"]), float(lr), float(sps.chi2.sf(lr, 1)),
                          "" if full.converged and null.converged else "not converged")
    except Exception as e:  # noqa: BLE001 - a robustness check never sinks the primary test
        return MixedCheck(_NAN, _NAN, _NAN, f"{type(e).__name__}: {e}")


def pooled_partial_r2(delta_r2: float, r2_layer: float) -> float:
    """The paper's pooled added effect as a share of what the layer leaves unexplained: ΔR² / (1 − R²_layer), the
    quantity comparable across models whose layer R² differs (GPT-J, the paper's Table 3: ROME / Error Injection
    0.001 / (1 − 0.947) = 1.9 %, FT-1 / Fact Forcing 8.9 %). NaN when the layer explains everything."""
    return delta_r2 / (1.0 - r2_layer) if r2_layer < 1.0 else _NAN


def _pooled(panel: _Panel) -> tuple[float, float]:
    from locedit.stats.localization import _design, _r2

    lay = panel.layers[panel.layer]
    levels = np.unique(lay)
    r2_layer = _r2(_design(lay, None, levels), panel.score, False)
    r2_both = _r2(_design(lay, panel.trace, levels), panel.score, False)
    return r2_both - r2_layer, r2_layer


def added_effect(
    frame: pl.DataFrame,
    *,
    metric: str = "rewrite_score",
    n_permutations: int = 999,
    n_boot: int = 999,
    seed: int = 0,
    alpha: float = 0.05,
    sesoi: float = 0.01,
    bound: Bound = "none",
    slopes: Slopes = "common",
    ci_level: float = 0.95,
    mixed: bool = True,
) -> AddedEffect:
    """The primary test on an analysis frame (one row per edit: ``fact_id``, ``layer``, ``trace``, ``metric``; one
    problem × method × localization — :class:`UnsuitableFrameError` naming the groups otherwise). See the module
    docstring for the model, the permutation null, the BCa cluster-bootstrap interval, the MDE and the verdict.

    ``n_boot=0`` skips the interval (and with it the equivalence verdict: "inconclusive" unless p < α);
    ``mixed=False`` skips the mixed-model check. Degenerate frames (one layer, fewer than 3 facts, a constant or
    all-missing trace, facts with a single edit) give NaN statistics with the reason in ``note``.
    """
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if n_permutations < 1 or n_boot < 0:
        raise ValueError("n_permutations must be >= 1 and n_boot >= 0")
    if slopes not in ("common", "per_layer"):
        raise ValueError(f"slopes must be 'common' or 'per_layer', got {slopes!r}")
    panel, note = _panel(frame, metric, bound)
    nan_result = dict(test=f"two-way FE ({slopes} slope), curve permutation across facts", metric=metric,
                      slope=_NAN, p_value=_NAN, ci=(_NAN, _NAN), ci_level=ci_level, sesoi=sesoi, alpha=alpha,
                      verdict="no estimate", delta_r2=_NAN, pooled_partial_r2=_NAN, r2_layer=_NAN,
                      n_permutations=n_permutations, bound=bound, slopes=slopes, mixed=None)
    if panel is None:
        return AddedEffect(partial_r2=_NAN, mde=_NAN, n_facts=0, n_edits=0, n_layers=0, note=note, **nan_result)
    n = len(panel.score)
    k = 1 if slopes == "common" else panel.n_layers
    mde = minimum_detectable_effect(n, panel.n_facts, panel.n_layers, k=k, alpha=alpha)
    Q = _design_basis(panel.fact, panel.layer, panel.n_layers)
    t_res = _resid(Q, panel.trace)
    if float(t_res @ t_res) <= 1e-12 * max(1.0, float(panel.trace @ panel.trace)):
        return AddedEffect(partial_r2=_NAN, mde=mde, n_facts=panel.n_facts, n_edits=n, n_layers=panel.n_layers,
                           note="; ".join(filter(None, [note, "the trace has no within-fact, within-layer variation"
                                                        " (constant, or a function of fact and layer)"])),
                           **nan_result)
    theta, slope, y_res = _fit(Q, panel.layer, panel.trace, panel.score, panel.n_layers, slopes)
    rng = np.random.default_rng(seed)
    null = _partial_r2_batch(Q, y_res, _permutation_traces(panel, n_permutations, rng), panel.layer,
                             panel.n_layers, slopes)
    p = float((1 + np.sum(null >= theta - 1e-12)) / (1 + n_permutations))
    ci, upper_tost = (_NAN, _NAN), _NAN
    if n_boot:
        boots, jack = _cluster_bootstrap(panel, slopes, n_boot, rng)
        ci = _bca(theta, boots, jack, ci_level)
        upper_tost = _bca(theta, boots, jack, 1 - 2 * alpha)[1]
    verdict = "effect" if p < alpha else ("equivalent" if math.isfinite(upper_tost) and upper_tost < sesoi
                                          else "inconclusive")
    d_r2, r2_layer = _pooled(panel)
    return AddedEffect(
        test=nan_result["test"], metric=metric, partial_r2=theta, slope=slope, p_value=p, ci=ci, ci_level=ci_level,
        mde=mde, sesoi=sesoi, alpha=alpha, verdict=verdict, delta_r2=d_r2,
        pooled_partial_r2=pooled_partial_r2(d_r2, r2_layer), r2_layer=r2_layer,
        n_facts=panel.n_facts, n_edits=n, n_layers=panel.n_layers, n_permutations=n_permutations, bound=bound,
        slopes=slopes, mixed=_mixed(panel) if mixed else None, note=note,
    )


@dataclass(frozen=True)
class PairedAddedEffect:
    """Within-fact partial R² of localization ``a`` minus that of ``b`` on the same facts and edits, with a paired
    BCa cluster-bootstrap interval (facts resampled once for both)."""

    a: str
    b: str
    difference: float
    ci: tuple[float, float]
    ci_level: float
    n_facts: int
    note: str = ""

    @property
    def excludes_zero(self) -> bool:
        lo, hi = self.ci
        return math.isfinite(lo) and (lo > 0 or hi < 0)

    @property
    def sentence(self) -> str:
        if not math.isfinite(self.difference):
            return f"{self.a} vs {self.b}: no estimate ({self.note})"
        lo, hi = self.ci
        verdict = ("the interval excludes 0" if self.excludes_zero else
                   "the interval includes 0: no evidence that one localizes edit success better than the other")
        return (f"{self.a} − {self.b}: within-fact partial R² difference {self.difference:+.3f} "
                f"[{100 * self.ci_level:.0f}% paired cluster CI {lo:+.3f}, {hi:+.3f}] over {self.n_facts} facts; "
                f"{verdict}.")


def paired_added_effect(frame_a: pl.DataFrame, frame_b: pl.DataFrame, *, a: str, b: str,
                        metric: str = "rewrite_score", bound: Bound = "none", n_boot: int = 999, seed: int = 0,
                        ci_level: float = 0.95) -> PairedAddedEffect:
    """Reber's question within facts: does localization ``a``'s tracing effect add more to fact and layer than
    ``b``'s? Both frames are analysis frames of one problem × method (as :func:`added_effect` takes); only the
    (fact, layer) edits present in both are compared, and only when every shared fact has every shared layer once
    (a balanced panel; else NaN with the reason)."""
    keys = ["fact_id", "layer"]
    left = frame_a.select(*keys, pl.col("trace").alias("trace_a"), pl.col(metric).alias("score"))
    right = frame_b.select(*keys, pl.col("trace").alias("trace_b"))
    both = left.join(right, on=keys, how="inner")
    both = both.filter(pl.all_horizontal(pl.col("trace_a", "trace_b", "score").cast(pl.Float64).is_finite()))
    nan = PairedAddedEffect(a, b, _NAN, (_NAN, _NAN), ci_level, 0)
    if both.height == 0:
        return replace(nan, note="no shared edits")
    facts = sorted(both["fact_id"].unique().to_list())
    layers = sorted(both["layer"].unique().to_list())
    if both.height != len(facts) * len(layers) or len(facts) < 3 or len(layers) < 2:
        return replace(nan, n_facts=len(facts), note="not a balanced panel of >= 3 facts x >= 2 layers")
    both = both.sort(keys)
    shape = (len(facts), len(layers))
    ta = _bounded(both["trace_a"].to_numpy(), bound).reshape(shape)
    tb = _bounded(both["trace_b"].to_numpy(), bound).reshape(shape)
    y = both["score"].to_numpy().reshape(shape)
    theta = float(_common_r2(ta, y) - _common_r2(tb, y))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, shape[0], (n_boot, shape[0]))
    boots = _common_r2(ta[picks], y[picks]) - _common_r2(tb[picks], y[picks])
    keep = ~np.eye(shape[0], dtype=bool)
    jack = (_common_r2(np.stack([ta[k] for k in keep]), np.stack([y[k] for k in keep]))
            - _common_r2(np.stack([tb[k] for k in keep]), np.stack([y[k] for k in keep])))
    return PairedAddedEffect(a, b, theta, _bca(theta, boots, jack, ci_level), ci_level, shape[0])
