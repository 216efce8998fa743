"""stats: collapse rules, join, regressions recovering known generating models, tables, figures, report.

All synthetic; no model. Tolerances are computed from the sampling distributions, not tuned by hand.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.stats as sps
import polars as pl
import pytest
import torch

from locedit import stats
from locedit.stats import (
    concentrated_facts,
    fig_peak_layers,
    fig_r2_bars,
    fig_score_vs_trace,
    fig_scores_by_layer,
    fig_trace_heatmap,
    fig_window_effects,
    fit_regression,
    fractional_effect,
    is_concentrated,
    join_trace,
    layer_correlations,
    paper_tables,
    peak_cell,
    peak_layers,
    per_layer_effect,
    per_layer_effects,
    r2_table,
    regression_table,
    report_html,
    table1,
    to_markdown,
)
from locedit.stats.regressions import FitStats, RegressionResult, results_frame

# ------------------------------------------------------------------------------------------------------------------
# synthetic builders
# ------------------------------------------------------------------------------------------------------------------


def long_trace(
    grids: dict[str, np.ndarray],
    *,
    p_clean: float = 0.9,
    p_noised: float = 0.1,
    subject: tuple[int, int] = (0, 2),
    kind: str = "mlp",
    window: int = 5,
) -> pl.DataFrame:
    """Long tracing table from fractional [T, L] grids: prob = p_noised + frac·(p_clean − p_noised)."""
    rows = []
    for fid, g in grids.items():
        T, L = g.shape
        for t in range(T):
            for layer in range(L):
                prob = p_noised + g[t, layer] * (p_clean - p_noised)
                rows.append(dict(fact_id=fid, kind=kind, window=window, token_index=t, token=f"tok{t}",
                                 is_subject=subject[0] <= t < subject[1], is_last_subject=t == subject[1] - 1,
                                 layer=layer, prob=prob, p_clean=p_clean, p_noised=p_noised, fractional=g[t, layer]))
    return pl.DataFrame(rows)


def synthetic_analysis(
    *, n_per_layer: int, layer_effect: np.ndarray, beta: float, sigma: float, seed: int,
    problem: str = "error_injection", method: str = "rome",
) -> pl.DataFrame:
    """score = layer_effect[layer] + beta·trace + N(0, σ²), trace ~ U(0, 1) independent of layer (balanced)."""
    rng = np.random.default_rng(seed)
    L = len(layer_effect)
    layer = np.repeat(np.arange(L), n_per_layer)
    trace = rng.uniform(0, 1, layer.size)
    score = layer_effect[layer] + beta * trace + rng.normal(0, sigma, layer.size)
    return pl.DataFrame({
        "fact_id": [f"f{i % n_per_layer}" for i in range(layer.size)], "problem": problem, "method": method,
        "layer": layer, "trace": trace, "rewrite_score": score,
    })


LAYER_EFFECT = np.array([0.1, 0.5, 0.9, 0.95, 0.8, 0.6, 0.3, 0.2])


# ------------------------------------------------------------------------------------------------------------------
# collapse
# ------------------------------------------------------------------------------------------------------------------

GRID = np.array([
    # L = 4 layers; T = 4 tokens; subject tokens 0, 1 (last subject = 1)
    [0.00, 0.10, 0.20, 0.05],
    [0.30, 0.70, 0.10, 0.00],
    [0.20, 0.40, 0.90, 0.10],
    [0.10, 0.00, 0.00, 0.60],
])


def test_fractional_effect_formula_and_abs_denominator():
    # ordinary case: (0.5 − 0.1)/(0.9 − 0.1) = 0.5; below noised → clipped to 0
    np.testing.assert_allclose(fractional_effect(np.array([0.5, 0.05, 0.9]), 0.9, 0.1), [0.5, 0.0, 1.0])
    # reference quirk: |p_clean − p_noised| in the denominator (noise *raised* p): (0.5 − 0.3)/0.2 = 1
    np.testing.assert_allclose(fractional_effect(np.array([0.5, 0.2]), 0.1, 0.3), [1.0, 0.0])
    assert np.isnan(fractional_effect(np.array([0.5]), 0.3, 0.3)[0])
    t = fractional_effect(torch.tensor([0.5, 0.05]), 0.9, 0.1)
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor([0.5, 0.0]))


def test_per_layer_effect_grid_max_and_last_subject():
    np.testing.assert_allclose(per_layer_effect(GRID, "max"), [0.3, 0.7, 0.9, 0.6])
    np.testing.assert_allclose(per_layer_effect(GRID, "last_subject", last_subject_index=1), [0.3, 0.7, 0.1, 0.0])
    out = per_layer_effect(torch.tensor(GRID, dtype=torch.float32), "max")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.3, 0.7, 0.9, 0.6]))
    g = GRID.copy()
    g[:, 0] = np.nan
    g[2, 2] = np.nan
    res = per_layer_effect(g)
    assert np.isnan(res[0]) and res[2] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        per_layer_effect(GRID, "last_subject")
    with pytest.raises(ValueError):
        per_layer_effect(GRID, "mean")  # type: ignore[arg-type]


def test_peak_cell_and_ties():
    assert peak_cell(GRID) == (2, 2)
    tie = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert peak_cell(tie) == (0, 1)  # first max in row-major [T, L] order, like TraceResult.peak
    ties = long_trace({"t": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])})
    assert peak_layers(ties).select("peak_token_index", "peak_layer").row(0) == (0, 1)
    assert peak_cell(np.full((2, 2), np.nan)) is None
    assert peak_cell(torch.tensor(GRID)) == (2, 2)


@pytest.mark.parametrize(
    "curve, expected",
    [
        ([0.1, 1.0, 0.2, 0.1, 0.0], True),  # no other layer ≥ 50%
        ([0.49, 0.5, 0.5, 1.0, 0.5, 0.0], True),  # exactly 3 others at ≥ 50% (0.5 counts, 0.49 not)
        ([0.5, 0.5, 0.5, 1.0, 0.5, 0.1], False),  # 4 others
        ([1.0, 1.0, 0.0, 0.0], True),  # tie at the max: 1 other
        ([0.0, 0.0, 0.0, 0.0, 0.0], False),  # no effect at all
        ([np.nan, 0.2, 1.0, np.nan], True),
    ],
)
def test_is_concentrated_rule(curve, expected):
    assert is_concentrated(np.array(curve)) is expected


def test_long_table_collapse_peak_and_concentrated():
    flat = np.array([[0.6, 0.7, 0.8, 0.9, 1.0, 0.9]])  # every layer ≥ 50% of max → diffuse
    sharp = np.array([[0.0, 0.1, 1.0, 0.2, 0.0, 0.0], [0.0, 0.6, 0.3, 0.0, 0.0, 0.0]])
    trace = pl.concat([long_trace({"a": np.vstack([GRID, np.zeros((0, 4))])}),
                       long_trace({"b": np.pad(flat, ((0, 1), (0, 0))), "c": sharp}, subject=(0, 1))],
                      how="vertical")
    eff = per_layer_effects(trace.filter(pl.col("fact_id") == "a"))
    np.testing.assert_allclose(eff.sort("layer")["effect"].to_numpy(), [0.3, 0.7, 0.9, 0.6], atol=1e-12)
    last = per_layer_effects(trace.filter(pl.col("fact_id") == "a"), collapse="last_subject")
    np.testing.assert_allclose(last.sort("layer")["effect"].to_numpy(), [0.3, 0.7, 0.1, 0.0], atol=1e-12)
    # the frame rule equals the grid rule
    np.testing.assert_allclose(per_layer_effect(GRID, "last_subject", last_subject_index=1),
                               last.sort("layer")["effect"].to_numpy(), atol=1e-12)
    peaks = {r["fact_id"]: r for r in peak_layers(trace).iter_rows(named=True)}
    assert (peaks["a"]["peak_token_index"], peaks["a"]["peak_layer"]) == (2, 2)
    assert peaks["b"]["peak_layer"] == 4 and peaks["c"]["peak_layer"] == 2
    conc = {r["fact_id"]: r for r in concentrated_facts(per_layer_effects(trace)).iter_rows(named=True)}
    # a: [0.3, 0.7, 0.9, 0.6] → 0.7 and 0.6 ≥ 0.45 → 2 others → concentrated
    assert conc["a"]["n_near_peak"] == 2 and conc["a"]["concentrated"]
    assert conc["b"]["n_near_peak"] == 5 and not conc["b"]["concentrated"]
    assert conc["c"]["n_near_peak"] == 1 and conc["c"]["concentrated"]  # c: [0, 0.6, 1.0, 0.2, 0, 0]
    # recompute ignores a wrong tracer column; recompute=False uses it
    wrong = trace.with_columns(pl.lit(0.0).alias("fractional"))
    assert per_layer_effects(wrong)["effect"].max() == pytest.approx(1.0)
    assert per_layer_effects(wrong, recompute=False)["effect"].max() == 0.0
    with pytest.raises(ValueError, match="window"):
        per_layer_effects(trace, window=7)


# ------------------------------------------------------------------------------------------------------------------
# join
# ------------------------------------------------------------------------------------------------------------------


def test_join_trace_picks_effect_at_edit_layer():
    rng = np.random.default_rng(0)
    grids = {f"f{i}": rng.uniform(0, 1, (3, 6)) for i in range(4)}
    trace = pl.concat([long_trace(grids, window=5), long_trace(grids, window=10, kind="mlp"),
                       long_trace({k: v * 0 for k, v in grids.items()}, kind="attn")])
    edits = pl.DataFrame([
        dict(fact_id=f, problem=p, method=m, layer=layer, layers=[layer], rewrite_score=0.5, paraphrase_score=0.2,
             neighborhood_score=0.9, overall_score=0.53, essence_score=1.0)
        for f in [*grids, "untraced"] for p in ("error_injection", "fact_forcing") for m in ("rome", "ft-5")
        for layer in (1, 3, 5)
    ])
    an = join_trace(edits, trace, with_concentrated=True)
    assert an.columns[:5] == ["fact_id", "problem", "method", "layer", "trace"]
    assert {"rewrite_score", "essence_score", "concentrated"} <= set(an.columns)
    assert an.height == 4 * 2 * 2 * 3  # untraced fact dropped
    for r in an.iter_rows(named=True):
        assert r["trace"] == pytest.approx(grids[r["fact_id"]][:, r["layer"]].max())
    an_last = join_trace(edits, trace, collapse="last_subject", scores=["rewrite_score"])
    assert an_last.columns == ["fact_id", "problem", "method", "layer", "trace", "rewrite_score"]
    r = an_last.row(0, named=True)
    assert r["trace"] == pytest.approx(grids[r["fact_id"]][1, r["layer"]])
    with pytest.raises(ValueError, match="kind"):
        join_trace(edits, trace, kind="resid")


# ------------------------------------------------------------------------------------------------------------------
# regressions: recover known generating models
# ------------------------------------------------------------------------------------------------------------------


def _theory(beta: float, sigma: float) -> tuple[float, float, float]:
    """Population R² of Layer and Both models, total variance, for the balanced synthetic design."""
    v_layer = float(np.var(LAYER_EFFECT))  # population variance over equally-weighted layers
    v_trace = beta**2 / 12.0  # Var(U(0,1)) = 1/12
    total = v_layer + v_trace + sigma**2
    return v_layer / total, (v_layer + v_trace) / total, total


def test_null_trace_effect_no_added_r2_and_f_test_not_significant():
    n_per, sigma, L = 200, 0.1, len(LAYER_EFFECT)
    n, k_layer, df_diff = n_per * L, L, L  # Both adds one slope per layer
    r2_layer_true, _, _ = _theory(0.0, sigma)
    # E[R²_both − R²_layer] under H0 = (1 − R²_layer)·df_diff/(n − k_layer)
    expected_diff = (1 - r2_layer_true) * df_diff / (n - k_layer)
    ps, diffs = [], []
    for seed in range(20):
        res = fit_regression(synthetic_analysis(n_per_layer=n_per, layer_effect=LAYER_EFFECT, beta=0.0, sigma=sigma,
                                                seed=seed), "rewrite_score")
        assert res.df_diff == df_diff and res.note == ""
        ps.append(res.p)
        diffs.append(res.r2_diff)
    assert max(diffs) < 6 * expected_diff  # ≈ χ²_8/8 tail: P(> 6× mean) ≈ 1e-7
    assert np.mean(diffs) == pytest.approx(expected_diff, rel=0.5)
    # p ~ U(0, 1) under H0: #(p < .05) ~ Bin(20, .05); P(≥ 5) ≈ 0.003
    assert sum(p < 0.05 for p in ps) <= 4
    assert ps[0] > 0.05  # the fixed seed-0 draw


def test_strong_trace_effect_detected_and_r2_matches_theory():
    n_per, sigma, beta, L = 200, 0.1, 0.5, len(LAYER_EFFECT)
    n = n_per * L
    r2_layer_true, r2_both_true, _ = _theory(beta, sigma)
    res = fit_regression(synthetic_analysis(n_per_layer=n_per, layer_effect=LAYER_EFFECT, beta=beta, sigma=sigma,
                                            seed=1), "rewrite_score")
    assert res.p < 1e-6 and res.f > 50
    # asymptotic SE of a sample R²: sqrt(4 R² (1 − R²)² / n); plus the O(k/n) upward bias of unadjusted R²
    se = lambda r2: math.sqrt(4 * r2 * (1 - r2) ** 2 / n)  # noqa: E731
    assert res.layer.r2 == pytest.approx(r2_layer_true, abs=5 * se(r2_layer_true) + 2 * L / n)
    assert res.both.r2 == pytest.approx(r2_both_true, abs=5 * se(r2_both_true) + 4 * L / n)
    true_diff = r2_both_true - r2_layer_true
    assert res.r2_diff > 0.5 * true_diff and res.r2_diff == pytest.approx(true_diff, rel=0.3)
    # Trace model alone: R² = v_trace / total
    assert res.trace.r2 < res.layer.r2
    # in-sample RMSE of the correct (Both) model: E[SSR] = σ²(n − k) ± σ² sqrt(2(n − k))
    k = 2 * L
    rmse_true = sigma * math.sqrt((n - k) / n)
    assert res.both.rmse == pytest.approx(rmse_true, abs=5 * sigma * math.sqrt(2 * (n - k)) / (2 * n))
    assert res.both.mae == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.08)
    assert res.layer.rmse > res.both.rmse and res.trace.rmse > res.layer.rmse


def test_layer_r2_matches_theoretical_variance_share():
    n_per, sigma, L = 300, 0.2, len(LAYER_EFFECT)
    n = n_per * L
    r2_true, _, _ = _theory(0.0, sigma)
    res = fit_regression(synthetic_analysis(n_per_layer=n_per, layer_effect=LAYER_EFFECT, beta=0.0, sigma=sigma,
                                            seed=7), "rewrite_score")
    tol = 5 * math.sqrt(4 * r2_true * (1 - r2_true) ** 2 / n) + 2 * L / n
    assert res.layer.r2 == pytest.approx(r2_true, abs=tol)
    assert res.layer.rmse == pytest.approx(sigma, rel=0.06)
    assert res.trace.r2 < 0.01
    # statsmodels agrees with a direct group-mean computation
    an = synthetic_analysis(n_per_layer=n_per, layer_effect=LAYER_EFFECT, beta=0.0, sigma=sigma, seed=7)
    y, lay = an["rewrite_score"].to_numpy(), an["layer"].to_numpy()
    fitted = np.array([y[lay == g].mean() for g in range(L)])[lay]
    r2_direct = 1 - np.sum((y - fitted) ** 2) / np.sum((y - y.mean()) ** 2)
    assert res.layer.r2 == pytest.approx(r2_direct, abs=1e-10)


def test_regression_table_groups_and_columns():
    parts = [synthetic_analysis(n_per_layer=50, layer_effect=LAYER_EFFECT[:4], beta=b, sigma=0.1, seed=s,
                                problem=p, method=m)
             for s, (p, m, b) in enumerate([("error_injection", "rome", 0.0), ("fact_forcing", "ft-5", 0.5)])]
    an = pl.concat(parts).with_columns((pl.col("rewrite_score") * 0.5).alias("overall_score"))
    res = regression_table(an)
    assert res.height == 4 and set(res["metric"]) == {"rewrite_score", "overall_score"}
    for col in ("r2_layer", "r2_trace", "r2_both", "r2_diff", "f", "df_diff", "p", "rmse_layer", "mae_both", "note"):
        assert col in res.columns
    ff = res.filter((pl.col("problem") == "fact_forcing") & (pl.col("metric") == "rewrite_score")).row(0, named=True)
    assert ff["p"] < 1e-6 and ff["r2_diff"] == pytest.approx(ff["r2_both"] - ff["r2_layer"])


def test_degenerate_cases_give_nan_and_note():
    base = synthetic_analysis(n_per_layer=30, layer_effect=LAYER_EFFECT[:3], beta=0.3, sigma=0.1, seed=3)
    one = fit_regression(base.filter(pl.col("layer") == 0), "rewrite_score")
    assert math.isnan(one.layer.r2) and math.isnan(one.p) and "single edit layer" in one.note
    assert not math.isnan(one.trace.r2)  # the Trace model is still fit
    const = fit_regression(base.with_columns(pl.lit(0.5).alias("trace")), "rewrite_score")
    assert math.isnan(const.trace.r2) and math.isnan(const.both.r2) and "constant trace" in const.note
    assert not math.isnan(const.layer.r2)
    few = fit_regression(base.group_by("layer").head(2).sort("layer"), "rewrite_score")  # n=6 ≤ 6 Both params
    assert math.isnan(few.both.r2) and math.isnan(few.p) and "too few rows" in few.note
    empty = fit_regression(base.head(0), "rewrite_score")
    assert empty.n == 0 and math.isnan(empty.r2_diff) and "no rows" in empty.note
    flat = fit_regression(base.with_columns(pl.lit(1.0).alias("rewrite_score")), "rewrite_score")
    assert math.isnan(flat.layer.r2) and "constant score" in flat.note
    nulls = fit_regression(base.with_columns(pl.when(pl.col("fact_id") == "f0").then(None).otherwise(pl.col("trace"))
                                             .alias("trace")), "rewrite_score")
    assert nulls.n == base.height - 3 and "dropped 3 rows" in nulls.note
    # trace constant within each layer → collinear with C(layer): no F-test, no crash
    col = base.with_columns((pl.col("layer") * 0.1).cast(pl.Float64).alias("trace"))
    res = fit_regression(col, "rewrite_score")
    assert math.isnan(res.f) and "no degrees of freedom" in res.note
    corr = layer_correlations(base.filter(pl.col("fact_id").is_in(["f0", "f1"])), "rewrite_score")
    assert corr["rho"].is_nan().all() and corr["note"].str.contains("too few").all()


def test_layer_correlations_recover_known_rho():
    rng = np.random.default_rng(11)
    n = 3000
    rhos = {0: 0.8, 1: -0.13, 2: 0.0}
    frames = []
    for layer, rho in rhos.items():
        xy = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
        frames.append(pl.DataFrame({"fact_id": [f"f{i}" for i in range(n)], "problem": "error_injection",
                                    "method": "rome", "layer": layer, "trace": xy[:, 0], "rewrite_score": xy[:, 1]}))
    an = pl.concat(frames)
    corr = layer_correlations(an, "rewrite_score")
    assert corr.columns == ["problem", "method", "metric", "layer", "n", "rho", "p", "ci_low", "ci_high", "spearman",
                            "spearman_p", "spearman_ci_low", "spearman_ci_high", "note"]
    got = dict(zip(corr["layer"].to_list(), corr["rho"].to_list()))
    for layer, rho in rhos.items():
        assert got[layer] == pytest.approx(rho, abs=5 * (1 - rho**2) / math.sqrt(n))
        sub = an.filter(pl.col("layer") == layer)
        assert got[layer] == pytest.approx(np.corrcoef(sub["trace"], sub["rewrite_score"])[0, 1], abs=1e-12)
    ps = dict(zip(corr["layer"].to_list(), corr["p"].to_list()))
    assert ps[0] < 1e-100 and ps[1] < 1e-6 and ps[2] > 1e-3
    for r in corr.iter_rows(named=True):
        sub = an.filter(pl.col("layer") == r["layer"])
        assert r["spearman"] == pytest.approx(sps.spearmanr(sub["trace"], sub["rewrite_score"]).statistic, abs=1e-12)
        assert r["ci_low"] < r["rho"] < r["ci_high"] and r["spearman_ci_low"] < r["spearman"] < r["spearman_ci_high"]


def test_correlation_intervals_are_calibrated():
    """Over 2,000 samples of 40 bivariate-normal pairs (ρ = 0.3) the Fisher-z interval covers ρ and the Bonett–Wright
    interval covers Spearman's population value (6/π·asin(ρ/2)) 95 % of the time, within simulation error; a heavy
    outlier moves Pearson's ρ far more than Spearman's."""
    from locedit.stats.regressions import pearson

    rng = np.random.default_rng(3)
    rho, n, reps = 0.3, 40, 2000
    rho_s = 6 / math.pi * math.asin(rho / 2)
    cover_p = cover_s = 0
    for _ in range(reps):
        xy = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
        c = pearson(xy[:, 0], xy[:, 1])
        cover_p += c.ci_low <= rho <= c.ci_high
        cover_s += c.spearman_ci_low <= rho_s <= c.spearman_ci_high
    assert abs(cover_p / reps - 0.95) < 0.015 and abs(cover_s / reps - 0.95) < 0.02, (cover_p / reps, cover_s / reps)
    x = rng.normal(size=50)
    y = rng.normal(size=50)
    x[0], y[0] = 300.0, 5.0  # one extreme tracing effect, like a fractional effect of 311
    c = pearson(x, y)
    assert c.rho > 0.5 and abs(c.spearman) < 0.3


# ------------------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------------------


def _result(problem, method, metric, r2l, r2t, r2b, p, rmse=(0.073, 0.315, 0.07), mae=(0.02, 0.206, 0.02)):
    fs = [FitStats(r2=r, rmse=e, mae=a, n=100) for r, e, a in zip((r2l, r2t, r2b), rmse, mae)]
    return RegressionResult(problem, method, metric, 100, 9, *fs, r2_diff=r2b - r2l, f=3.0, df_diff=9.0, p=p)


@pytest.fixture()
def paper_results() -> pl.DataFrame:
    # numbers from Table 3 / Table 7 (GPT-J, CounterFact)
    rows = [
        _result("error_injection", "memit", "rewrite_score", 0.677, 0.024, 0.678, 0.199),
        _result("error_injection", "rome", "rewrite_score", 0.947, 0.016, 0.948, 1e-7),
        _result("error_injection", "ft-1", "rewrite_score", 0.756, 0.062, 0.758, 5e-5),
        _result("fact_forcing", "ft-5", "rewrite_score", 0.634, 0.10, 0.666, 1e-9),
        _result("error_injection", "rome", "overall_score", 0.618, 0.003, 0.629, 1e-6, rmse=(0.133, 0.216, 0.13),
                mae=(0.11, 0.183, 0.1)),
        _result("error_injection", "rome", "paraphrase_score", 0.279, 0.001, 0.303, float("nan")),
    ]
    return results_frame(rows)


def test_table1_and_r2_table_layout(paper_results):
    t1 = table1(paper_results)
    assert t1.columns == ["Method", "Layer", "Tracing Effect", "Both"]
    md1 = to_markdown(t1)
    assert "| ROME | 0.947 | 0.016 | 0.948 |" in md1
    t3 = r2_table(paper_results, "rewrite_score")
    assert t3.columns == ["Editing Problem", "Method", "Layer", "Trace", "Both", "Diff", "Diff / (1 − Layer)",
                          "p-value"]
    # paper order: problems, then FT-1, FT-5, ROME, MEMIT
    assert t3["Method"].to_list() == ["FT (1 layer)", "ROME (1 layer)", "MEMIT (5 layers)", "FT (5 layers)"]
    md = to_markdown(t3, blank_repeats=("Editing Problem",))
    assert "| Error Injection | FT (1 layer) | 0.756 | 0.062 | 0.758 | 0.002 | 0.008 | <1e-4 |" in md
    assert "|  | ROME (1 layer) | 0.947 | 0.016 | 0.948 | 0.001 | 0.019 | <1e-4 |" in md
    assert "|  | MEMIT (5 layers) | 0.677 | 0.024 | 0.678 | 0.001 | 0.003 | 0.199 |" in md
    assert "| Fact Forcing | FT (5 layers) | 0.634 | 0.100 | 0.666 | 0.032 | 0.087 | <1e-4 |" in md
    md4 = to_markdown(r2_table(paper_results, "paraphrase_score"))
    assert "0.024 | 0.033 | n/a |" in md4  # Diff / (1 − Layer) = 0.024 / (1 − 0.279)


def test_error_table_and_paper_tables(paper_results):
    t7 = stats.error_table(paper_results)
    assert t7.height == 12 and t7.columns == ["Edit Metric", "Regression Metric", "Predictor(s)", "Value"]
    md = to_markdown(t7, blank_repeats=("Edit Metric", "Regression Metric"))
    assert "| Rewrite Score | R^2 | Layer | 0.947 |" in md
    assert "|  | RMSE | Layer | 0.073 |" in md and "|  |  | Tracing Effect | 0.315 |" in md
    assert "| Overall Score | R^2 | Layer | 0.618 |" in md
    assert "|  | MAE | Layer | 0.110 |\n|  |  | Tracing Effect | 0.183 |" in md
    tabs = paper_tables(paper_results)
    assert {"Table 1", "Table 3 (rewrite)", "Table 4 (paraphrase)", "Table 6 (overall)", "Table 7"} <= set(tabs)
    assert "Table 5 (neighborhood)" not in tabs  # metric absent → skipped
    assert stats.format_p(3e-5) == "<1e-4" and stats.format_p(0.0001) == "0.000" and stats.format_p(0.55) == "0.550"


# ------------------------------------------------------------------------------------------------------------------
# figures and report
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline():
    rng = np.random.default_rng(5)
    L, facts = 6, [f"f{i}" for i in range(12)]
    grids = {f: rng.uniform(0, 1, (4, L)) ** 3 for f in facts}
    trace = pl.concat([long_trace(grids, window=w) for w in (1, 5, 10)])
    edits = pl.DataFrame([
        dict(fact_id=f, problem=p, method=m, layer=layer, layers=[layer],
             rewrite_score=float(rng.uniform()), paraphrase_score=float(rng.uniform()),
             neighborhood_score=float(rng.uniform()), overall_score=float(rng.uniform()))
        for f in facts for p in ("error_injection", "fact_forcing") for m in ("ft-1", "rome", "memit")
        for layer in (0, 2, 4)
    ])
    an = join_trace(edits, trace, with_concentrated=True)
    return trace, edits, an, regression_table(an)


def test_figures_build_with_expected_traces(pipeline):
    trace, edits, an, res = pipeline
    f1 = fig_peak_layers(trace, windows=(10,))
    assert len(f1.data) == 1 and sum(f1.data[0].y) == 12
    assert len(fig_peak_layers(trace).data) == 3  # Fig. 11: one panel per window
    f4 = fig_score_vs_trace(an)
    assert len(f4.data) == 2 * 3  # scatter + y=x per edit layer
    titles = [a.text for a in f4.layout.annotations]
    assert len(titles) == 3 and all("ρ =" in t for t in titles)
    assert any(d.line.dash == "dash" for d in f4.data if d.mode == "lines")
    f6 = fig_r2_bars(res)
    assert [d.name for d in f6.data] == ["Layer", "Layer + Tracing"] and len(f6.data[0].y) == 6
    assert f6.data[0].text[0] == f"{f6.data[0].y[0]:.3f}"
    f7 = fig_scores_by_layer(edits)
    assert len(f7.data) == 3 * 3 and len(f7.layout.annotations) == 3  # 3 methods × 3 panels
    f10 = fig_window_effects(trace)
    assert [d.name for d in f10.data] == ["window 1", "window 5", "window 10"]
    hm = fig_trace_heatmap(trace, "f0", window=10)
    assert len(hm.data) == 1 and list(hm.data[0].y[:2]) == ["tok0*", "tok1*"] and hm.data[0].y[2] == "tok2"
    assert np.asarray(hm.data[0].z).shape == (4, 6)


def test_report_html_self_contained(pipeline, tmp_path):
    trace, edits, an, res = pipeline
    tabs = paper_tables(res, concentrated_results=regression_table(an.filter(pl.col("concentrated"))))
    tabs["Correlations"] = stats.correlation_table(layer_correlations(an, "rewrite_score"))
    figs = {"Fig. 6": fig_r2_bars(res), "Fig. 15": fig_score_vs_trace(an)}
    html = report_html(tabs, figs, title="synthetic <run>", meta={"model": "test", "n": an.height})
    assert html.count("* plotly.js v") == 1  # plotly.js inlined exactly once
    assert 'src="https://cdn' not in html
    assert html.count('class="plotly-graph-div"') == 2
    assert html.count('<table class="stats">') == len(tabs)
    assert "ROME (1 layer)" in html and "<th>Editing Problem</th>" in html and "synthetic &lt;run&gt;" in html
    r = res.filter((pl.col("problem") == "error_injection") & (pl.col("method") == "rome")
                   & (pl.col("metric") == "rewrite_score")).row(0, named=True)
    assert f"<td class=\"num\">{r['r2_layer']:.3f}</td>" in html
    out = stats.write_report(tmp_path / "r.html", tabs, figs)
    assert out.stat().st_size > 1_000_000


def test_png_export_degrades_without_kaleido(tmp_path):
    if stats.png_available():
        pytest.skip("kaleido installed")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert stats.save_png(fig_window_effects(long_trace({"a": GRID})), tmp_path / "x.png") is False
    assert any("kaleido" in str(x.message) for x in w)
    assert stats.save_html(fig_window_effects(long_trace({"a": GRID})), tmp_path / "x.html").exists()


# ------------------------------------------------------------------------------------------------------------------
# agreement with the tracer's TraceResult, BLAS helper
# ------------------------------------------------------------------------------------------------------------------


def test_agrees_with_trace_result():
    result = pytest.importorskip("locedit.tracer.result")
    rng = np.random.default_rng(2)
    T, L, p_clean, p_noised = 6, 5, 0.8, 0.05
    grid = torch.tensor(rng.uniform(0, 0.9, (T, L)))
    grid[:2] = p_noised  # tokens before the subject hold p_noised
    res = result.TraceResult(tokens=tuple(f"t{i}" for i in range(T)), subject_span=(2, 4), grid=grid,
                             p_clean=p_clean, p_noised=p_noised, kind="mlp", window=5, algorithm="exact", sigma=0.1)
    frac = fractional_effect(grid, p_clean, p_noised)
    torch.testing.assert_close(frac, res.fractional())
    torch.testing.assert_close(per_layer_effect(frac, "max"), res.per_layer("max"))
    last = per_layer_effect(frac, "last_subject", last_subject_index=3)
    torch.testing.assert_close(last, res.per_layer("last_subject"))
    assert peak_cell(frac) == res.peak()
    frame = res.to_frame("x")
    np.testing.assert_allclose(per_layer_effects(frame).sort("layer")["effect"].to_numpy(), res.per_layer().numpy())
    row = peak_layers(frame).row(0, named=True)
    assert (row["peak_token_index"], row["peak_layer"]) == res.peak()


def test_single_blas_thread_is_transparent():
    an = synthetic_analysis(n_per_layer=40, layer_effect=LAYER_EFFECT[:3], beta=0.2, sigma=0.1, seed=4)
    a = fit_regression(an, "rewrite_score")
    with stats.regressions.single_blas_thread():
        with stats.regressions.single_blas_thread():  # nests
            b = fit_regression(an, "rewrite_score")
    assert a == b


def test_score_summary_means_and_order():
    import polars as pl

    from locedit.stats.tables import score_summary

    edits = pl.DataFrame(
        {
            "problem": ["fact_forcing", "error_injection", "error_injection", "error_injection"],
            "method": ["rome", "rome", "rome", "ft-1"],
            "layer": [4, 12, 12, 12],
            "rewrite_score": [0.1, 0.2, float("nan"), 0.9],
            "edit_seconds": [1.0, 2.0, 4.0, 3.0],
        }
    )
    t = score_summary(edits)
    assert t["problem"].to_list() == ["error_injection", "error_injection", "fact_forcing"]
    assert t["method"].to_list() == ["ft-1", "rome", "rome"]
    assert t["n"].to_list() == [1, 2, 1]
    assert t["rewrite_score"].to_list() == pytest.approx([0.9, 0.2, 0.1])  # NaN ignored
    assert t["edit_seconds"].to_list() == pytest.approx([3.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="no column"):
        score_summary(edits, by=["nope"])


def test_concentrated_top_is_the_ten_percent_with_the_sharpest_peak():
    """The rank-defined subset (the paper's "10 % most concentrated"): of 20 facts whose curves put a growing share of
    their effect at the peak, the two sharpest are in, ties at the cut are in, and a curve with no positive effect
    never is; App. B's rule is computed beside it, unchanged."""
    from locedit.stats import concentrated_facts

    rows = []
    for i in range(20):
        curve = [0.1] * 10
        curve[4] = 0.1 + 0.05 * i  # fact 19 has the sharpest peak, then 18, ...
        rows += [{"fact_id": f"f{i:02d}", "kind": "mlp", "window": 5, "layer": lay, "effect": e}
                 for lay, e in enumerate(curve)]
    rows += [{"fact_id": "neg", "kind": "mlp", "window": 5, "layer": lay, "effect": -0.2} for lay in range(10)]
    c = concentrated_facts(pl.DataFrame(rows))
    top = sorted(c.filter(pl.col("concentrated_top"))["fact_id"].to_list())
    assert top == ["f18", "f19"]  # ceil(0.1 × 20 facts with a positive peak) = 2
    assert "neg" not in top and c.filter(pl.col("fact_id") == "neg")["peak_share"].is_null().all()
    share = c.filter(pl.col("fact_id") == "f19")["peak_share"].item()
    assert share == pytest.approx(1.05 / (1.05 + 0.9))
    tied = pl.DataFrame([{"fact_id": f"t{i}", "kind": "mlp", "window": 5, "layer": lay, "effect": 1.0 if lay == 0 else 0.0}
                         for i in range(5) for lay in range(3)])
    assert concentrated_facts(tied)["concentrated_top"].all()  # all tie at the cut


def test_convergence_panel_share_that_reached_the_target():
    edits = pl.DataFrame({"problem": ["error_injection"] * 5, "method": ["rome"] * 5, "layer": [0, 0, 0, 1, 1],
                          "opt_p_target": [0.95, 0.5, 0.9, float("nan"), None]})
    got = stats.with_reached(edits)
    assert got["opt_reached"].to_list() == [1.0, 0.0, 1.0, None, None]  # NaN / missing: no record, not "failed"
    panel = stats.score_summary(got, columns=stats.CONVERGENCE_COLUMNS)
    assert panel["opt_reached"].to_list() == [pytest.approx(2 / 3), None]
    assert panel["n"].to_list() == [3, 2]
    assert stats.with_reached(edits.drop("opt_p_target")).columns == ["problem", "method", "layer"]


def test_mean_half_width_is_the_t_interval():
    x = np.random.default_rng(0).normal(size=12)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert stats.mean_half_width(float(x.std(ddof=1)), len(x)) == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert math.isnan(stats.mean_half_width(1.0, 1)) and math.isnan(stats.mean_half_width(None, 5))
