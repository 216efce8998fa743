"""Architecture families on tiny random HookedTransformers (seconds): exact tracing == naive tracing and the editors'
fast path == plain path, on the lean backend (GPT-2, GPT-J parallel attention, NeoX, Llama/GQA, and a Gemma-3-like
block: QK-norm, pre+post norms, local/global attention with a 4-token window) and the TransformerLens backend (the
Gemma-3-like block with the lean path switched off). This caught the TransformerLens backend feeding pre-QK-norm keys
to its KV cache (exact was off by 5-11 % on QK-norm models), and the lean backend's late join of an attention
restoration leaving out Gemma's MLP post-norm (off by 39 %)."""

import dataclasses

import pytest
import torch
from rows import assert_rows_equal
from transformer_lens import HookedTransformer, HookedTransformerConfig

from locedit.editors import EditRequest, UnsupportedArchitectureError, apply, default_hparams, restore
from locedit.tracer import target_probs, trace, zero
from locedit.tracer.lean import lean_supported

BASE = dict(n_layers=3, d_model=32, d_head=8, n_heads=4, n_ctx=64, seed=0)
FAMILIES = {
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", d_mlp=64),
    "gptj": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4,
                 parallel_attn_mlp=True, d_mlp=64),
    "neox": dict(act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=2,
                 parallel_attn_mlp=True, d_mlp=64),
    "llama": dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                  gated_mlp=True, n_key_value_heads=2, d_mlp=48),
    "gemma3": dict(act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary",
                   rotary_dim=8, gated_mlp=True, n_key_value_heads=2, d_mlp=48, use_qk_norm=True,
                   use_normalization_before_and_after=True, use_local_attn=True,
                   attn_types=["local", "global", "local"], window_size=4, original_architecture="Gemma3ForCausalLM"),
}
LEAN = {"gpt2": True, "gptj": True, "neox": True, "llama": True, "gemma3": True}
P, S, O = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French"


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """One tiny random model per family, sharing the embedded model's tokenizer (its vocabulary size)."""
    out = {}
    for name, extra in FAMILIES.items():
        cfg = HookedTransformerConfig(**BASE, **extra, d_vocab=len(tokenizer), model_name=f"tiny-{name}")
        torch.manual_seed(0)
        m = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
        out[name] = m.eval()
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backend_choice(tiny, family):
    assert lean_supported(tiny[family]) == LEAN[family]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["mlp", "attn", "resid"])
def test_exact_tracing_equals_naive(tiny, family, kind):
    m = tiny[family]
    for corruption in ({"noise": 3.0, "samples": 3}, {"corrupt": "flip", "flip_subject": "Barack Obama"}):
        e = trace(m, P, S, O, kind=kind, algorithm="exact", **corruption)
        n = trace(m, P, S, O, kind=kind, algorithm="naive", **corruption)
        rel = (e.grid - n.grid).abs().max() / n.grid.abs().max()
        assert rel.item() < 1e-5, (family, kind, corruption, rel.item())
        assert e.p_noised == pytest.approx(n.p_noised, rel=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "attn", "resid"])
def test_transformerlens_backend_equals_naive_on_gemma3(tiny, kind, tmp_path, monkeypatch):
    """The suffix runner's TransformerLens backend (kept for models the lean blocks do not reproduce: OLMo's
    full-vector QK-norm, Gemma 2's soft cap, ...) on the Gemma-3-like block: exact tracing == naive, ROME's fast path
    == plain."""
    from locedit.tracer import suffix, tracing

    monkeypatch.setattr(suffix, "lean_supported", lambda model: False)
    monkeypatch.setattr(tracing, "lean_supported", lambda model: False)
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    m = tiny["gemma3"]
    assert not suffix.SuffixRunner(m).is_lean
    e = trace(m, P, S, O, kind=kind, algorithm="exact", noise=3.0, samples=3)
    n = trace(m, P, S, O, kind=kind, algorithm="naive", noise=3.0, samples=3)
    assert ((e.grid - n.grid).abs().max() / n.grid.abs().max()).item() < 1e-5
    if kind == "mlp":
        hp = default_hparams("rome", m)
        hp = type(hp)(**{**hp.__dict__, "v_num_grad_steps": 5, "context_lengths": ((3, 2),)})
        eye = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731
        req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
        fast = apply(m, req, "rome", [1], hparams=hp, covariance=eye, fast=True)
        restore(m, fast)
        plain = apply(m, req, "rome", [1], hparams=hp, covariance=eye, fast=False)
        restore(m, plain)
        for name in fast.deltas:
            assert ((fast.deltas[name] - plain.deltas[name]).norm() / plain.deltas[name].norm()).item() < 1e-3


POST_NORM = {"gemma3"}  # MEMIT refuses post-MLP-norm blocks (UnsupportedArchitectureError)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,layers", [("rome", [1]), ("r-rome", [1]), ("memit", [0, 1]), ("ft-1", [1])])
def test_editor_fast_path_equals_plain_and_restores(tiny, family, method, layers, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))  # context templates of the tiny models stay out of the cache
    m = tiny[family]
    if method == "memit" and family in POST_NORM:
        with pytest.raises(UnsupportedArchitectureError, match="ln2_post"):
            apply(m, EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English"), method, layers)
        return
    eye = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731  (no corpus pass)
    hp = default_hparams(method, m)
    if method.startswith("ft"):
        hp = type(hp)(**{**hp.__dict__, "num_steps": 5, "norm_constraint": 1e-2})
    else:
        hp = type(hp)(**{**hp.__dict__, "v_num_grad_steps": 5, "context_lengths": ((3, 2),)})
    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fast = apply(m, req, method, layers, hparams=hp, covariance=eye, fast=True)
    restore(m, fast)
    plain = apply(m, req, method, layers, hparams=hp, covariance=eye, fast=False)
    restore(m, plain)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # bit-identical after restore
    for name in fast.deltas:
        rel = (fast.deltas[name] - plain.deltas[name]).norm() / plain.deltas[name].norm()
        assert rel.item() < 1e-3, (family, method, name, rel.item())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["mlp", "attn", "resid"])
def test_exact_zeroing_equals_naive(tiny, family, kind):
    m, w = tiny[family], (1 if kind == "resid" else 3)
    for per_token in (False, True):
        e = zero(m, P, S, O, kind=kind, window=w, per_token=per_token)
        n = zero(m, P, S, O, kind=kind, window=w, per_token=per_token, algorithm="naive")
        assert ((e.grid - n.grid).abs().max() / n.grid.abs().max()).item() < 1e-5, (family, kind, per_token)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rome_raises_the_target_and_restores_bit_exactly(tiny, family, tmp_path, monkeypatch):
    """On a random model the reference clamp (||delta|| <= 4 ||v_init||) and weight decay keep v* near v_init, so the
    optimisation is let loose here (no clamp, decay or KL; 20 steps), and the edited layer must carry v* into the
    model's prediction. A random 49k-token unembedding bounds every logit, so p(target) can only rise by a factor
    (GPT-2-like: 6.8e-6 -> 8.1e-6, the v* optimisation's own NLL 12.29 -> 11.36), not to a large probability."""
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    m = tiny[family]
    eye = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731
    hp = default_hparams("rome", m)
    # the plain prompt alone (no context templates): v* is then optimised for exactly the prompt scored below
    hp = type(hp)(**{**hp.__dict__, "v_num_grad_steps": 20, "context_lengths": (), "clamp_norm_factor": 1e6,
                     "v_weight_decay": 0.0, "kl_factor": 0.0})
    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    p0 = float(target_probs(m, [req.text], [req.target])[0])
    res = apply(m, req, "rome", [1], hparams=hp, covariance=eye)
    p1 = float(target_probs(m, [req.text], [req.target])[0])
    restore(m, res)
    assert p1 > 1.1 * p0, (family, p0, p1)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("problem,method", [("error_injection", "ft-1"), ("fact_forcing", "ft-1")])
def test_pre_edit_scores_computed_once_equal_each_edit_computing_them(tiny, family, problem, method):
    """A study scores a fact's pre-edit probabilities once per problem (``pre=``) and reuses them for every edit:
    the rows equal those of edits that each compute their own, within 1e-6 (here: exactly)."""
    from locedit.problems import load_dataset
    from locedit.problems.run import pre_edit, run_edit
    from locedit.tracer import GaussianNoise

    m = tiny[family]
    fact = next(f for f in load_dataset("counterfact") if f.id == "cf:0")
    noise = GaussianNoise(sigma=0.3, samples=2, seed=0)
    hp = default_hparams(method, m)
    hp = type(hp)(**{**hp.__dict__, "num_steps": 2})
    pre = pre_edit(m, fact, problem, noise, essence=False)
    for layer in (2,):
        shared = run_edit(m, fact, problem, method, layer, hparams=hp, noise=noise, essence=False, pre=pre).as_row()
        alone = run_edit(m, fact, problem, method, layer, hparams=hp, noise=noise, essence=False).as_row()
        assert_rows_equal(shared, alone, rel=1e-6, abs_=1e-12, context=(family,))
    with pytest.raises(ValueError, match="pre= was computed for"):
        run_edit(m, fact, "fact_erasure", method, 0, hparams=hp, noise=noise, essence=False, pre=pre)


@pytest.mark.parametrize("family,problem,method,layer", [(f, "error_injection", "rome", 1) for f in FAMILIES] + [
    ("llama", "fact_forcing", "ft-1", 2), ("gemma3", "fact_forcing", "r-rome", 2), ("gpt2", "error_injection", "memit", 2)])
def test_post_edit_scoring_from_the_lowest_edited_layer_equals_the_whole_model(tiny, family, problem, method, layer,
                                                                               tmp_path, monkeypatch):
    """Post-edit scores rerun only the blocks from the edit's lowest layer, from the unedited passes' residual
    stream recorded there (``pre_edit(checkpoint_layers=...)``): equal to scoring through the whole model within
    1e-6, essence included."""
    from locedit.problems import load_dataset
    from locedit.problems.run import pre_edit, run_edit
    from locedit.tracer import GaussianNoise

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    m = tiny[family]
    if method == "memit" and family in POST_NORM:
        return
    fact = next(f for f in load_dataset("counterfact") if f.id == "cf:0")
    noise = GaussianNoise(sigma=0.3, samples=2, seed=0)
    hp = default_hparams(method, m)
    hp = type(hp)(**({"num_steps": 2} if method.startswith("ft") else {"v_num_grad_steps": 3,
                                                                       "context_lengths": ((3, 2),)}) | {
        k: v for k, v in hp.__dict__.items() if k not in ("num_steps", "v_num_grad_steps", "context_lengths")})
    eye = lambda model, lyr: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731
    kw = dict(hparams=hp, noise=noise, essence=True, covariance=eye)
    whole = run_edit(m, fact, problem, method, layer, pre=pre_edit(m, fact, problem, noise), **kw).as_row()
    pre = pre_edit(m, fact, problem, noise, checkpoint_layers=(0, 1, 2))
    assert len(pre.checkpoints.of(problem == "fact_forcing")) > 0 and len(pre.checkpoints.of("essence")) > 0
    resumed = run_edit(m, fact, problem, method, layer, pre=pre, **kw).as_row()
    assert resumed["p_rewrite_post"] != resumed["p_rewrite_pre"]  # the edit moved what is scored
    assert_rows_equal(resumed, whole, rel=1e-6, abs_=1e-12, context=(family,))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["rome", "r-rome", "memit", "ft-1"])
def test_every_edit_records_how_its_optimisation_ended(tiny, family, method, tmp_path, monkeypatch):
    """``EditResult.convergence`` (and the edits table's ``opt_*`` columns): final loss = the last recorded loss,
    steps, mean p(target) over the optimisation prompts, ‖δ‖/‖v_init‖ and the clamp flag (ROME / MEMIT) or the share
    of entries at the L∞ bound (FT); a tight clamp or bound shows as active."""
    import dataclasses
    import math

    from locedit.problems import load_dataset
    from locedit.problems.run import run_edit

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    m = tiny[family]
    if method == "memit" and family in POST_NORM:
        return
    eye = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731
    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    hp = default_hparams(method, m)
    ft = method.startswith("ft")
    loose = dataclasses.replace(hp, num_steps=4) if ft else dataclasses.replace(hp, v_num_grad_steps=4,
                                                                                context_lengths=((3, 2),))
    tight = dataclasses.replace(loose, norm_constraint=1e-7, lr=1e-2) if ft else dataclasses.replace(
        loose, clamp_norm_factor=1e-3)
    layers = [0, 1] if method == "memit" else [1]
    for hp, active in ((loose, None), (tight, True)):
        res = apply(m, req, method, layers, hparams=hp, covariance=eye)
        restore(m, res)
        c = res.convergence
        assert c.final_loss == res.losses[-1] and c.steps == len(res.losses) == 4
        assert 0 <= c.p_target <= 1
        if ft:
            assert math.isnan(c.delta_ratio) and 0 <= c.bound_share <= 1
            if active:
                assert c.bound_share > 0.5, c.bound_share
        else:
            assert c.delta_ratio > 0 and c.clamped in (0.0, 1.0) and math.isnan(c.bound_share)
            if active:
                assert c.clamped == 1.0 and c.delta_ratio == pytest.approx(1e-3, rel=1e-4)
    fact = next(f for f in load_dataset("counterfact") if f.id == "cf:0")
    row = run_edit(m, fact, "error_injection", method, 1, hparams=loose, essence=False, covariance=eye).as_row()
    assert row["opt_steps"] == 4 and 0 <= row["opt_p_target"] <= 1 and math.isfinite(row["opt_final_loss"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("method,layers", [("rome", [1]), ("memit", [0, 1]), ("ft-1", [1])])
def test_float64_edits_restore_and_reapply_bit_exactly(tokenizer, family, method, layers, tmp_path, monkeypatch):
    """A float64 model (the editors accept float32 and float64): entries that an edit moves across many binades
    (planted here: W_out entries of 1e-15) have a float64 difference that float64 cannot hold exactly, which made
    every such edit raise ArithmeticError. The edit keeps the rounded delta and the XOR of the bit patterns
    (``bit_flips``): restore, a saved result re-applied and restored again, and an ``edit()`` context all leave the
    weights bit-identical."""
    from locedit.editors import EditResult, apply_deltas, edit

    if method == "memit" and family in POST_NORM:
        return
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    cfg = HookedTransformerConfig(**BASE, **FAMILIES[family], d_vocab=len(tokenizer), model_name=f"tiny64-{family}",
                                  dtype=torch.float64)
    torch.manual_seed(0)
    m = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right").eval()
    with torch.no_grad():
        for layer in layers:
            m.blocks[layer].mlp.W_out[:, :8] = 1e-15  # entries the edit moves by ~1e-3: 40 binades
    eye = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731
    hp = default_hparams(method, m)
    if method.startswith("ft"):
        hp = type(hp)(**{**hp.__dict__, "num_steps": 3, "norm_constraint": 1e-2})
    else:
        hp = type(hp)(**{**hp.__dict__, "v_num_grad_steps": 3, "context_lengths": ((3, 2),)})
    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = apply(m, req, method, layers, hparams=hp, covariance=eye)
    after = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert res.bit_flips and set(res.bit_flips) <= set(res.deltas)  # the planted entries are not exact in float64
    for name, d in res.deltas.items():  # the numeric delta stays the (rounded) difference
        assert torch.allclose(before[name] + d, after[name], rtol=0, atol=1e-15)
    restore(m, res)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    res.save(tmp_path / "edit.pt")
    loaded = EditResult.load(tmp_path / "edit.pt")
    apply_deltas(m, loaded.deltas, bit_flips=loaded.bit_flips)
    assert all(torch.equal(p, after[n]) for n, p in m.named_parameters())
    restore(m, dataclasses.replace(loaded, edited_hashes=res.edited_hashes))
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    with edit(m, req, method, layers, hparams=hp, covariance=eye):
        assert not torch.equal(m.blocks[layers[-1]].mlp.W_out, before[f"blocks.{layers[-1]}.mlp.W_out"])
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
