"""Every localization method in the study (issue 15): the exact zeroing and flip grids equal naive ones, flip
partners are deterministic / same relation / different object, the σ rules, the config section, the tracing table's
new columns, and the comparison statistics recover a planted relation."""

import numpy as np
import polars as pl
import pytest
import statsmodels.formula.api as smf
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from locedit.problems import load_dataset
from locedit.problems.localize import NotEnoughPartnersError, flip_partners, localize
from locedit.stats import delta_r2, localization_table, paired_differences
from locedit.tracer import trace, zero
from locedit.tracer.result import TRACING_COLUMNS, tracing_frame

# subject at the start / middle / end of the prompt, 1 to 5 tokens long
CASES = [
    ("Danielle Darrieux speaks the language", "Danielle Darrieux", " French", "Barack Obama"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French", "Pelé"),
    ("In Paris, the language is", "Paris", " French", "Berlin"),
    ("The capital city of France is named", "France", " Paris", "the United Kingdom of Great Britain"),
]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    out = {}
    for name, extra in {
        "llama": dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                      gated_mlp=True, n_key_value_heads=2, d_mlp=48),
        "gptj": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4,
                     parallel_attn_mlp=True, d_mlp=64),
        "gemma3": dict(act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary",
                       rotary_dim=8, gated_mlp=True, n_key_value_heads=2, d_mlp=48, use_qk_norm=True,
                       use_normalization_before_and_after=True, use_local_attn=True,
                       attn_types=["local", "global", "local", "global"], window_size=4,
                       original_architecture="Gemma3ForCausalLM"),
    }.items():
        cfg = HookedTransformerConfig(n_layers=4, d_model=32, d_head=8, n_heads=4, n_ctx=64, seed=0,
                                      d_vocab=len(tokenizer), model_name=f"tiny-{name}", **extra)
        torch.manual_seed(0)
        out[name] = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right").eval()
    return out


@pytest.mark.parametrize("family,kind", [("llama", "mlp"), ("llama", "attn"), ("llama", "resid"), ("gptj", "mlp"),
                                         ("gemma3", "mlp")])
def test_exact_zeroing_equals_naive(tiny, family, kind):
    """Several prompts (subject at the start / middle / end, 1-5 tokens); every family is also in test_families."""
    m, w = tiny[family], (1 if kind == "resid" else 3)
    for prompt, subject, target, _ in CASES:
        for per_token in (False, True):
            e = zero(m, prompt, subject, target, kind=kind, window=w, per_token=per_token)
            n = zero(m, prompt, subject, target, kind=kind, window=w, per_token=per_token, algorithm="naive")
            assert e.algorithm == "exact" and n.algorithm == "naive"
            rel = ((e.grid - n.grid).abs().max() / n.grid.abs().max()).item()
            assert rel < 1e-5, (family, kind, prompt, per_token, rel)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_exact_flip_equals_naive_with_logit_difference(tiny, family):
    m = tiny[family]
    for prompt, subject, target, flip in CASES:
        kw = dict(kind="mlp", window=3, corrupt="flip", flip_subject=flip, contrast=" English")
        e, n = trace(m, prompt, subject, target, **kw), trace(m, prompt, subject, target, algorithm="naive", **kw)
        assert ((e.grid - n.grid).abs().max() / n.grid.abs().max()).item() < 1e-5
        le, ln = (torch.tensor(r.extra["logit_diff"]["grid"]) for r in (e, n))
        traced = torch.isfinite(ln)
        assert torch.equal(torch.isfinite(le), traced) and traced.any()
        assert (le[traced] - ln[traced]).abs().max().item() < 1e-4
        assert e.extra["logit_diff"]["clean"] == pytest.approx(n.extra["logit_diff"]["clean"], abs=1e-5)


def test_flip_partners_deterministic_same_relation_other_object(tiny):
    m = tiny["llama"]
    facts = load_dataset("counterfact")
    fact = facts[0]
    a = flip_partners(m, fact, facts, 10, seed=0)
    assert [p.id for p in a] == [p.id for p in flip_partners(m, fact, facts, 10, seed=0)]
    assert [p.id for p in a] != [p.id for p in flip_partners(m, fact, facts, 10, seed=1)]
    assert len({p.subject for p in a}) == 10
    assert all(p.relation == fact.relation and p.o_true != fact.o_true and p.subject != fact.subject for p in a)
    with pytest.raises(NotEnoughPartnersError, match="eligible flip partners"):
        flip_partners(m, fact, facts[:50], 10)
    res = localize(m, fact, "flip", kind="mlp", window=3, partners=a[:2])
    singles = [trace(m, fact.prompt, fact.subject, fact.o_true, kind="mlp", window=3, corrupt="flip",
                     flip_subject=p.subject) for p in a[:2]]
    torch.testing.assert_close(res.grid, (singles[0].grid + singles[1].grid) / 2)
    assert res.p_noised == pytest.approx((singles[0].p_noised + singles[1].p_noised) / 2)
    frame = tracing_frame([{**res.to_record(), "fact_id": fact.id, "localization": "flip"}])
    assert tuple(frame.columns) == TRACING_COLUMNS
    assert frame["flip_partner"][0] == f"{a[0].id};{a[1].id}" and frame["localization"][0] == "flip"
    assert frame["logit_diff"].drop_nulls().len() > 0 and frame["sigma"].null_count() == frame.height


def test_localization_config_section():
    from locedit.config import ConfigError, parse_config

    cfg = parse_config({"study": {"name": "x"}, "localization": {"methods": ["noise", "flip", "zero", "attribution"],
                                                                   "flips": 4}})
    loc = cfg.localization
    assert loc.methods == ("noise", "flip", "zero", "attribution") and loc.flips == 4
    assert loc.noise_scale_rule == "s3" and loc.corruption().rule == "s3"
    with pytest.raises(ConfigError, match="localization.methods"):
        parse_config({"localization": {"methods": ["noise", "gradient"]}})
    with pytest.raises(ConfigError, match=r"\[tracing\] is now called \[localization\].*locedit migrate"):
        parse_config({"tracing": {}})  # the older name is gone: one line that says what to do
    from locedit.plan import TraceUnit, method_tokens, plan_units

    keys = [u.key() for u in plan_units(cfg, method_tokens(cfg), (5,), ["cf:1"]) if isinstance(u, TraceUnit)]
    assert keys == ["trace|cf:1|mlp|w5|noise", "trace|cf:1|mlp|w5|flip", "trace|cf:1|mlp|w5|zero",
                    "trace|cf:1|mlp|w5|attribution"]


def test_delta_r2_equals_the_formula_fit():
    rng = np.random.default_rng(0)
    df = pl.DataFrame({"layer": rng.integers(0, 4, 200), "trace": rng.random(200), "score": rng.random(200)})
    pdf = df.to_pandas()
    ref = smf.ols("score ~ C(layer) * trace", pdf).fit().rsquared - smf.ols("score ~ C(layer)", pdf).fit().rsquared
    assert delta_r2(df["layer"].to_numpy(), df["trace"].to_numpy(), df["score"].to_numpy()) == pytest.approx(ref, abs=1e-10)
    both, lay = smf.ols("score ~ C(layer) * trace", pdf).fit(), smf.ols("score ~ C(layer)", pdf).fit()
    assert delta_r2(df["layer"].to_numpy(), df["trace"].to_numpy(), df["score"].to_numpy(), adjusted=True) == \
        pytest.approx(both.rsquared_adj - lay.rsquared_adj, abs=1e-10)


def _planted(n_facts=80, seed=0):
    """Edits at 4 layers; the rewrite score depends on method A's per-layer effect, not on B's (noise)."""
    rng = np.random.default_rng(seed)
    trace_rows, edit_rows = [], []
    for f in range(n_facts):
        for layer in range(4):
            a, b = rng.random(), rng.random()
            for loc, eff in (("flip", a), ("noise", b)):
                trace_rows.append({"fact_id": f"f{f}", "localization": loc, "kind": "mlp", "window": 5,
                                   "corruption": loc, "token_index": 0, "token": "x", "is_subject": True,
                                   "is_last_subject": True, "layer": layer, "prob": 0.1 + 0.8 * eff, "p_clean": 0.9,
                                   "p_noised": 0.1, "fractional": eff})
            edit_rows.append({"fact_id": f"f{f}", "problem": "error_injection", "method": "rome", "layer": layer,
                              "rewrite_score": 0.1 * layer + 0.5 * a + 0.05 * rng.standard_normal()})
    return pl.DataFrame(edit_rows), pl.DataFrame(trace_rows)


def test_comparison_recovers_a_planted_relation():
    edits, trace_tab = _planted()
    table = localization_table(edits, trace_tab, collapses=("max",), n_boot=300)
    row = {r["localization"]: r for r in table.filter(pl.col("subset") == "all").iter_rows(named=True)}
    assert row["flip"]["ci_low"] > 0.1 and row["flip"]["r2_diff"] > 0.3
    assert row["noise"]["ci_low"] < 0 < row["noise"]["ci_high"]  # adjusted ΔR²: the null's interval contains 0
    assert row["noise"]["r2_diff"] > 0  # while the plain ΔR² of a nested model is positive on any data
    assert row["noise"]["n_facts"] == 80 and row["flip"]["p"] < 1e-6
    (d,) = paired_differences(edits, trace_tab, n_boot=300)
    assert d.localization == "flip" and d.baseline == "noise" and d.ci_low > 0.1
    assert "input flipping explains" in d.sentence and "more points of variance" in d.sentence
    assert "excludes 0" in d.sentence


@pytest.mark.slow
def test_s3_rule_reproduces_rome_sigma(model):
    from locedit.tracer.corruption import GaussianNoise, noise_std

    assert 3 * noise_std(model, "s3") == pytest.approx(0.3500, abs=5e-4)
    assert 3 * noise_std(model, "embedding") == pytest.approx(0.4067, abs=5e-4)
    assert GaussianNoise(rule="s3").resolve(model).sigma == pytest.approx(0.3500, abs=5e-4)


def test_agreement_separates_fact_specific_from_shared_profiles():
    """Same-fact agreement is tested against other-fact pairs: curves that share a fact's own peak agree beyond the
    baseline (p = 1/1000); curves that only share the profile common to all facts agree as much with other facts
    (p large), although their same-fact r alone looks high."""
    import numpy as np

    from locedit.stats import agreement

    rng = np.random.default_rng(0)
    L, n = 30, 40
    layers = np.arange(L)
    peaks = rng.integers(3, 27, size=n)
    bump = lambda c: np.exp(-0.5 * ((layers - c) / 2.0) ** 2)  # noqa: E731
    a = {f"f{i}": bump(peaks[i]) + 0.05 * rng.normal(size=L) for i in range(n)}
    b = {f"f{i}": bump(peaks[i]) + 0.05 * rng.normal(size=L) for i in range(n)}
    g = agreement(a, b)
    assert g.n_facts == n and g.median_r > 0.9 and g.cross_median_r < 0.3 and g.p_r == pytest.approx(1 / 1000)
    assert g.close_share == 1.0 and g.p_close == pytest.approx(1 / 1000)
    shared = bump(15.0)
    a2 = {f: shared + 0.05 * rng.normal(size=L) for f in a}
    b2 = {f: shared + 0.05 * rng.normal(size=L) for f in a}
    g2 = agreement(a2, b2)
    assert g2.median_r > 0.9 and abs(g2.median_r - g2.cross_median_r) < 0.05 and g2.p_r > 0.05
    assert agreement({"x": np.ones(L)}, {"x": np.ones(L)}).n_facts == 0


def test_is_a_fact_best_edited_where_it_traces():
    """edit_layer_agreement on analysis frames: edit-success curves that peak at each fact's own tracing peak agree
    beyond other-fact pairs; curves unrelated to the fact's tracing do not; peaks are compared in layers, not
    positions (layers 0, 4, 8, ...: adjacent positions are 4 layers apart); facts missing a layer are left out."""
    import numpy as np

    from locedit.stats import agreement, edit_layer_agreement

    rng = np.random.default_rng(1)
    layers = [0, 4, 8, 12, 16, 20, 24, 29]
    n = 40
    peaks = rng.integers(0, len(layers), size=n)
    bump = lambda c: np.exp(-0.5 * ((np.arange(len(layers)) - c) / 1.0) ** 2)  # noqa: E731

    def frame(score_of):
        rows = [{"fact_id": f"f{i}", "problem": "error_injection", "method": "rome", "layer": lay,
                 "trace": float(bump(peaks[i])[k] + 0.05 * rng.normal()), "rewrite_score": float(score_of(i)[k])}
                for i in range(n) for k, lay in enumerate(layers)]
        return pl.DataFrame(rows)

    planted = frame(lambda i: bump(peaks[i]) + 0.05 * rng.normal(size=len(layers)))
    unrelated = frame(lambda i: rng.normal(size=len(layers)))
    short = planted.filter(~((pl.col("fact_id") == "f0") & (pl.col("layer") == 29)))  # f0 lacks a layer
    t = edit_layer_agreement({"noise": planted, "flip": unrelated, "zero": short}, n_permutations=199)
    got = {r["localization"]: r for r in t.iter_rows(named=True)}
    assert got["noise"]["n_facts"] == n and got["noise"]["n_layers"] == len(layers)
    assert got["noise"]["median_r"] > 0.8 and got["noise"]["p_r"] == pytest.approx(1 / 200)
    assert got["noise"]["close_share"] == 1.0 and got["noise"]["p_close"] == pytest.approx(1 / 200)
    assert got["flip"]["p_r"] > 0.01 and abs(got["flip"]["median_r"]) < 0.3
    assert got["zero"]["n_facts"] == n - 1
    # "within 2 layers" counts layers: peaks at adjacent positions of layers (0, 4) are 4 layers apart
    one = {"x": np.array([1.0, 0.0, 0.0]), "y": np.array([0.0, 1.0, 0.0])}
    two = {"x": np.array([0.0, 1.0, 0.0]), "y": np.array([1.0, 0.0, 0.0])}
    assert agreement(one, two, layers=[0, 4, 8]).close_share == 0.0
    assert agreement(one, two).close_share == 1.0
