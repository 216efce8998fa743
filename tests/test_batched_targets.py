"""v*/z optimisations of several edit layers run as one lockstep batch (``editors.vstar.optimize_targets``) equal the
one-layer-at-a-time optimisation on every architecture family (issue 24): ROME's v* at ``hook_mlp_out`` (Gemma:
before the post-MLP norm), MEMIT's z at ``hook_resid_post``, with and without subject noise (Fact Forcing), layers
given out of order and including the last layer (whose rows run no block), and per-layer early stopping."""

import pytest
import torch

from locedit.editors.inputs import build_batch
from locedit.editors.templates import context_templates
from locedit.editors.vstar import optimize_target, optimize_targets
from locedit.tracer.corruption import GaussianNoise
from locedit.tracer.tokens import target_tokens
from rows import assert_rows_equal
from test_families import FAMILIES, tiny  # noqa: F401  (the module fixture)

KW = dict(steps=6, lr=0.5, weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625)


def _batch(m, noise=None):
    texts = [t.format("The mother tongue of Danielle Darrieux is") for t in context_templates(m, ((3, 2),), cache=False)]
    tgt = target_tokens(m, " English")
    b = build_batch(m, texts + ["Danielle Darrieux is a"], "Danielle Darrieux", [tgt] * len(texts) + [None], noise)
    return b, int(tgt.shape[0])


def _close(a, b, tol=1e-5):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < tol


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("v_hook", ["hook_mlp_out", "hook_resid_post"])
@pytest.mark.parametrize("noised", [False, True])
def test_lockstep_batch_equals_one_layer_at_a_time(tiny, family, v_hook, noised):  # noqa: F811
    m = tiny[family]
    for p in m.parameters():
        p.requires_grad_(False)
    noise = GaussianNoise(sigma=0.5, samples=3, seed=1) if noised else None
    batch, n_target = _batch(m, noise)
    layers = (2, 0, 1)  # out of order; 2 is the last layer: its rows run no block
    together = optimize_targets(m, batch, layers, n_target, v_hook=v_hook, **KW)
    for layer, got in zip(layers, together):
        alone = optimize_target(m, batch, layer, n_target, v_hook=v_hook, **KW)
        assert len(got.losses) == len(alone.losses) == KW["steps"]
        assert _close(got.delta, alone.delta), (family, v_hook, layer)
        assert _close(got.v_init, alone.v_init, 1e-6)
        assert got.losses == pytest.approx(alone.losses, rel=1e-5)
        assert got.delta.norm() > 0  # the optimisation moved


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_each_layer_stops_early_on_its_own(tiny, family):  # noqa: F811
    m = tiny[family]
    batch, n_target = _batch(m)
    alone = {x: optimize_target(m, batch, x, n_target, **{**KW, "steps": 12}) for x in (0, 1, 2)}
    # a threshold between the layers' losses: some stop early, others run every step
    finals = sorted(min(o.losses) for o in alone.values())
    stop = (finals[0] + finals[-1]) / 2
    alone = {x: optimize_target(m, batch, x, n_target, **{**KW, "steps": 12, "early_stop_loss": stop})
             for x in (0, 1, 2)}
    lengths = {len(o.losses) for o in alone.values()}
    assert len(lengths) > 1, lengths  # the layers did stop at different steps
    together = optimize_targets(m, batch, (0, 1, 2), n_target, **{**KW, "steps": 12, "early_stop_loss": stop})
    for x, got in zip((0, 1, 2), together):
        assert len(got.losses) == len(alone[x].losses)
        assert _close(got.delta, alone[x].delta)


def test_layers_must_be_distinct(tiny):  # noqa: F811
    m = tiny["gpt2"]
    batch, n_target = _batch(m)
    with pytest.raises(ValueError, match="distinct"):
        optimize_targets(m, batch, (1, 1), n_target, **KW)


@pytest.mark.parametrize("family,problem", [(f, "error_injection") for f in FAMILIES] +
                         [("llama", "fact_forcing"), ("gemma3", "fact_forcing")])  # noise rows, post-norm blocks
def test_shared_and_batched_edits_equal_edits_alone(tiny, family, problem, tmp_path, monkeypatch):  # noqa: F811
    """A study's edits of one fact with a TargetMemo (ROME and r-ROME share v*, every layer's v* / MEMIT's z in one
    batch) give the rows of edits that each optimise alone, within 1e-5; the memo optimised each vector once."""
    from locedit.editors import default_hparams
    from locedit.editors.targets import TargetMemo
    from locedit.problems import load_dataset
    from locedit.problems.run import pre_edit, run_edit

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    m = tiny[family]
    fact = next(f for f in load_dataset("counterfact") if f.id == "cf:0")
    noise = GaussianNoise(sigma=0.3, samples=2, seed=0)
    eye = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731
    methods = ["rome", "r-rome"] + ([] if family == "gemma3" else ["memit"])  # MEMIT refuses post-norm blocks
    hps = {meth: type(h)(**{**h.__dict__, "v_num_grad_steps": 4, "context_lengths": ((3, 2),)})
           for meth in methods for h in [default_hparams(meth, m)]}
    memo = TargetMemo({"hook_mlp_out": (0, 1, 2), "hook_resid_post": (2,)})
    pre = pre_edit(m, fact, problem, noise, essence=False)
    for meth in methods:
        for layer in (0, 1, 2):
            kw = dict(hparams=hps[meth], noise=noise, essence=False, pre=pre, covariance=eye)
            shared = run_edit(m, fact, problem, meth, layer, targets=memo, **kw).as_row()
            alone = run_edit(m, fact, problem, meth, layer, **kw).as_row()
            assert_rows_equal(shared, alone, rel=1e-5, abs_=1e-9, context=(family, meth, layer))
    assert memo.computed == 3 + ("memit" in methods)  # three v* (one batch), one z
    # ROME's layers 1, 2 and r-ROME's three from the batch; MEMIT's windows all end at layer 2
    assert memo.reused == 5 + 2 * ("memit" in methods)


def test_memo_computes_alone_and_keeps_nothing_while_an_edit_is_active(tiny, tmp_path, monkeypatch):  # noqa: F811
    from locedit.editors import EditRequest, default_hparams, edit
    from locedit.editors.targets import TargetMemo

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    m = tiny["llama"]
    hp = default_hparams("rome", m)
    hp = type(hp)(**{**hp.__dict__, "v_num_grad_steps": 3, "context_lengths": ((3, 2),), "mom2_adjustment": False})
    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    memo = TargetMemo({"hook_mlp_out": (0, 1, 2)})
    with edit(m, req, "rome", [1], hparams=hp, targets=memo) as first:
        assert (memo.computed, len(memo)) == (3, 3)
        other = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " German")
        with edit(m, other, "rome", [2], hparams=hp, targets=memo):  # the model is edited: alone, not stored
            assert (memo.computed, len(memo)) == (4, 3)
    with edit(m, req, "rome", [1], hparams=hp, targets=memo) as again:  # restored bit-exactly: the store is valid
        assert memo.reused == 1
    assert torch.equal(first.deltas["blocks.1.mlp.W_out"], again.deltas["blocks.1.mlp.W_out"])
