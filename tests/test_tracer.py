"""Tests of tracer.tracing: causal tracing (exact / naive / attribution), zeroing, flipping, results and pictures.

Kept small: naive-vs-exact equality is checked on a handful of cells per configuration (``cells=``), 1-3 noise
samples, short prompts, one torch thread (the CI machine's cores are shared).
"""

import math

import pytest
import torch

from locedit.tracer import EmptyTargetError, SubjectNotFoundError
from locedit.tracer.tracing import (
    FlipAlignmentError,
    UnknownKindError,
    UnknownAlgorithmError,
    flop_fraction,
    trace,
    window_layers,
    zero,
)

P, S, O = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French"
# tokens: 'The',' mother',' tongue',' of',' Daniel','le',' Dar','rie','ux',' is' — subject (4, 9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def resid_full(model):
    """A full exact grid (cheapest kind: resid, window 1), 1 noise sample."""
    return trace(model, P, S, O, kind="resid", samples=1)


def test_window_layers():
    assert list(window_layers(10, 10, 30)) == list(range(5, 15))
    assert list(window_layers(10, 5, 30)) == list(range(8, 13))
    assert list(window_layers(0, 5, 30)) == [0, 1, 2]
    assert list(window_layers(29, 5, 30)) == [27, 28, 29]
    assert list(window_layers(3, 1, 30)) == [3]


def test_full_grid_basics(resid_full):
    r = resid_full
    assert r.subject_span == (4, 9)
    assert r.tokens[4:9] == (" Daniel", "le", " Dar", "rie", "ux")
    assert r.grid.shape == (10, 30)
    assert r.p_clean > 0.1 > r.p_noised
    assert torch.equal(r.grid[:4], torch.full((4, 30), r.p_noised, dtype=r.grid.dtype))
    frac = r.fractional()
    assert torch.isfinite(frac).all()
    # clipped at 0 only (reference formula); restoring one layer's residual can overshoot p_clean a little
    assert frac.min() >= 0 and frac.max() <= 1.2
    assert frac[9, 29] == pytest.approx(1.0, abs=1e-4)
    # identity: restoring the whole residual stream of the last token at the last layer gives p_clean
    assert abs(r.grid[-1, -1].item() - r.p_clean) < 1e-5
    assert abs(frac[-1, -1].item() - 1.0) < 1e-4
    pl_max, pl_last = r.per_layer("max"), r.per_layer("last_subject")
    assert pl_max.shape == (30,) and pl_last.shape == (30,)
    assert (pl_max >= pl_last - 1e-12).all()
    t, l = r.peak()
    assert r.peak_layer() == l and frac[t, l] == frac.max()
    with pytest.raises(ValueError):
        r.per_layer("mean")


def test_to_frame(resid_full):
    df = resid_full.to_frame(fact_id="0")
    assert df.columns == [
        "fact_id", "localization", "kind", "window", "corruption", "sigma", "flip_partner", "token_index", "token",
        "is_subject", "is_last_subject", "layer", "prob", "p_clean", "p_noised", "fractional", "logit_diff",
    ]
    assert df["localization"].unique().to_list() == ["noise"] and df["sigma"][0] == pytest.approx(resid_full.sigma)
    assert df["logit_diff"].null_count() == df.height and df["flip_partner"].null_count() == df.height
    assert df.height == 10 * 30
    assert df.filter(df["is_last_subject"])["token_index"].unique().to_list() == [8]
    assert df["is_subject"].sum() == 5 * 30


def test_pictures(resid_full, tmp_path):
    html = str(resid_full.heatmap())
    assert "Daniel" in html and "Dar" in html
    fig = resid_full.plot()
    assert "p_clean" in fig.layout.title.text
    assert any("Dar*" in str(y) for y in fig.data[0].y)
    resid_full.save_html(tmp_path / "p.html")
    resid_full.save_html(tmp_path / "c.html", which="circuitsvis")
    assert "mother" in (tmp_path / "p.html").read_text()
    assert "mother" in (tmp_path / "c.html").read_text()


CELLS = {4: [0], 8: [15], 9: [29]}


@pytest.mark.parametrize(
    "kind,window,target",
    [
        ("mlp", 5, O),
        ("mlp", 1, " French language"),
        ("attn", 10, O),
        ("resid", 1, " French language"),
    ],
)
def test_exact_equals_naive(model, kind, window, target):
    kw = dict(kind=kind, window=window, samples=2, cells=CELLS)
    e = trace(model, P, S, target, algorithm="exact", **kw)
    n = trace(model, P, S, target, algorithm="naive", **kw)
    assert e.p_noised == pytest.approx(n.p_noised, abs=1e-7)
    assert torch.equal(e.grid.isnan(), n.grid.isnan())
    computed = ~e.grid.isnan()
    assert computed.sum() == 4 * 30 + 3
    assert (e.grid[computed] - n.grid[computed]).abs().max() < 1e-5


@pytest.mark.parametrize(
    "prompt,subject,cells",
    [
        ("Danielle Darrieux spoke", "Danielle Darrieux", {0: [0, 14], 2: [3], 5: [29]}),  # subject at start
        ("The native language of Danielle Darrieux", "Danielle Darrieux", {4: [1], 8: [27, 29]}),  # at end
    ],
)
def test_exact_equals_naive_subject_position(model, prompt, subject, cells):
    kw = dict(kind="mlp", window=5, samples=2, cells=cells)
    e = trace(model, prompt, subject, O, algorithm="exact", **kw)
    n = trace(model, prompt, subject, O, algorithm="naive", **kw)
    computed = ~e.grid.isnan()
    assert torch.equal(computed, ~n.grid.isnan())
    assert (e.grid[computed] - n.grid[computed]).abs().max() < 1e-5


def test_explicit_noise_and_sigma(model):
    eps = torch.randn(2, 5, model.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 0.1
    a = trace(model, P, S, O, noise=eps, cells={9: [29]})
    assert a.samples == 2
    b = trace(model, P, S, O, sigma=0.1, samples=2, seed=1, cells={9: [29]})
    # GaussianNoise(sigma=..., seed=1) draws exactly randn(seed 1) * sigma: the explicit tensor reproduces it
    assert b.sigma == 0.1 and a.p_noised == pytest.approx(b.p_noised, abs=1e-7)
    assert a.grid[9, 29] == pytest.approx(b.grid[9, 29].item(), abs=1e-6)
    assert math.isclose(a.p_clean, b.p_clean)


def test_bad_inputs(model):
    with pytest.raises(SubjectNotFoundError):
        trace(model, P, "Marie Curie", O)
    with pytest.raises(EmptyTargetError):
        trace(model, P, S, "")
    with pytest.raises(UnknownKindError):
        trace(model, P, S, O, kind="heads")
    with pytest.raises(UnknownAlgorithmError):
        trace(model, P, S, O, algorithm="fast")
    with pytest.raises(ValueError):
        trace(model, P, S, O, window=0)
    with pytest.raises(ValueError):
        trace(model, P, S, O, kind="resid", window=5)
    with pytest.raises(ValueError):
        trace(model, P, S, O, corrupt="blur")
    with pytest.raises(ValueError):
        trace(model, P, S, O, corrupt="flip")  # no flip_subject
    with pytest.raises(ValueError):
        trace(model, P, S, O, noise=torch.zeros(2, 3, model.cfg.d_model))  # wrong subject length
    with pytest.raises(ValueError):
        zero(model, P, S, O, kind="nope")
    assert issubclass(FlipAlignmentError, ValueError)


def test_zero(model):
    z = zero(model, P, S, O, window=30)
    assert z.corrupt == "zero" and z.p_noised is None and z.grid.shape == (10, 30)
    frac = z.fractional()
    assert frac.min() >= 0 and frac.max() <= 1
    # zeroing the MLP outputs of all subject tokens in (almost) every layer deletes nearly all of p_clean
    assert frac[4:9, 12:18].min() > 0.9
    assert torch.equal(frac[:4], torch.zeros(4, 30, dtype=frac.dtype))  # untouched rows
    assert (z.grid[4] == z.grid[8]).all()  # one "subject" row repeated


def test_flip(model):
    f = trace(model, P, S, O, corrupt="flip", flip_subject="Barack Obama", cells={7: [5], 9: [29]})
    # ' Barack',' Obama' align with ' rie','ux'; ' Daniel','le',' Dar' have no counterpart
    assert f.traced.tolist() == [False] * 7 + [True] * 3
    assert f.samples == 1 and f.sigma is None
    assert f.p_clean > f.p_noised
    n = trace(model, P, S, O, corrupt="flip", flip_subject="Barack Obama", cells={7: [5], 9: [29]}, algorithm="naive")
    ok = ~f.grid.isnan()
    assert (f.grid[ok] - n.grid[ok]).abs().max() < 1e-5
    with pytest.raises(FlipAlignmentError):
        trace(model, P, S, O, corrupt="flip", flip_subject="mother")  # occurs before the subject


def test_flip_resid_identity(model):
    f = trace(model, P, S, O, kind="resid", corrupt="flip", flip_subject="Barack Obama", cells={9: [29]})
    assert abs(f.grid[9, 29].item() - f.p_clean) < 1e-5


def test_attribution_agrees_with_exact(model, resid_full):
    a = trace(model, P, S, O, kind="resid", samples=1, algorithm="attribution")
    assert a.algorithm == "attribution" and torch.isfinite(a.grid).all()
    assert torch.equal(a.grid[:4], torch.full((4, 30), a.p_noised, dtype=a.grid.dtype))
    assert a.p_noised == pytest.approx(resid_full.p_noised, abs=1e-7)
    # measured: Pearson 0.80 over the 6x30 traced cells (Spearman only 0.31), peak at the last token
    x, y = resid_full.grid[4:].flatten(), a.grid[4:].flatten()
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.5
    assert a.peak()[0] == 9


def test_flop_fraction():
    # hand count, L=2, w=1, N=2, d_model=d_vocab=1, 1 param per block: block(q, k) = 2q + 4qk, unembed = 2;
    # clean+corrupted = 2·(2·block(2,2) + 2·2) = 88; naive 4 cells × 44; exact (t=0: 22 + 2, t=1: 12 + 2)
    f = flop_fraction(2, 1, n_prompt=2, subject_start=0, n_target=1, d_model=1, n_block_params=2, d_vocab=1)
    assert f == pytest.approx((88 + 38) / (88 + 176))
    f = flop_fraction(30, 5, n_prompt=10, subject_start=4, n_target=1, d_model=576, n_block_params=106_000_000,
                      d_vocab=49152)
    assert 0.1 < f < 0.3


def test_exact_tl_fallback_equals_naive(model, monkeypatch):
    """Models the lean blocks do not support use TransformerLens blocks with a frozen KV-cache entry."""
    import locedit.tracer.tracing as tracing
    kw = dict(kind="mlp", window=5, samples=2, cells={4: [0, 13], 9: [29]})
    n = trace(model, P, S, O, algorithm="naive", **kw)
    monkeypatch.setattr(tracing, "lean_supported", lambda m: False)
    e = trace(model, P, S, O, algorithm="exact", **kw)
    ok = ~n.grid.isnan()
    assert (e.grid[ok] - n.grid[ok]).abs().max() < 1e-5


def test_lean_block_matches_transformer_lens(model):
    """LeanBlocks.block on a suffix with a rotated prefix cache = model.blocks[j] on the whole sequence."""
    from locedit.tracer.lean import LeanBlocks

    torch.manual_seed(0)
    x = torch.randn(3, 9, model.cfg.d_model)
    j, p = 7, 4
    lean = LeanBlocks(model, layers=[j])
    _, cache = model.run_with_cache(x, start_at_layer=j, stop_at_layer=j + 1)
    full = model.blocks[j](x)
    pk, pv = lean.prefix_keys_values(j, cache[f"blocks.{j}.attn.hook_k"][:, :p], cache[f"blocks.{j}.attn.hook_v"][:, :p])
    out = lean.block(j, x[:, p:], pk, pv)
    assert (out - full[:, p:]).abs().max() < 1e-4
    last = lean.block(j, x[:, p:], pk, pv, query_positions=torch.tensor([4]))
    assert (last[:, 0] - full[:, -1]).abs().max() < 1e-4
    assert (lean.block(j, x) - full).abs().max() < 1e-4
