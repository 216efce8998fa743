"""Constrained finetuning of one request at several layer sets in lockstep (``editors.finetune.optimize_ft``: each
set its own weight copies, Adam state, clamp and early stop; rows join at each set's lowest layer) equals finetuning
each set alone (``execute_ft``, the reference loop) on every architecture family (issue 24), with and without
subject noise, maximizing and minimizing; a study gets it through the memo (``run_edit(..., targets=memo)``)."""

import dataclasses

import pytest
import torch

from locedit.editors import EditRequest, default_hparams
from locedit.editors.deltas import load_snapshot, snapshot
from locedit.editors.finetune import execute_ft, optimize_ft
from locedit.tracer.corruption import GaussianNoise
from rows import assert_rows_equal
from test_families import FAMILIES, tiny  # noqa: F401  (the module fixture)

REQ = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
SETS = [(2,), (0,), (1,), (0, 1, 2), (1, 2)]  # FT-1's layers and FT-5-like windows, given out of order


def _hp(m, skip_loss=1e-12):  # a random model's p(target) is ~1e-5: no early stop unless asked
    return dataclasses.replace(default_hparams("ft-1", m), lr=2e-2, num_steps=6, norm_constraint=5e-3,
                               skip_loss=skip_loss)


def _alone(m, layers, hp, objective, noise):
    names = [f"blocks.{x}.mlp.{w}" for x in layers for w in ("W_out", "b_out")]
    snap = snapshot(m, names)
    try:
        res = execute_ft(m, REQ, layers, hp, objective, noise)
        final = {n: dict(m.named_parameters())[n].detach().clone() for n in names}
    finally:
        load_snapshot(m, snap)
    return res, final


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("family,noised,objective", [(f, True, "maximize") for f in FAMILIES] +
                         [("gpt2", False, "maximize"), ("llama", False, "minimize")])
def test_lockstep_equals_each_layer_set_alone(tiny, family, noised, objective):  # noqa: F811
    m = tiny[family]
    noise = GaussianNoise(sigma=0.5, samples=3, seed=1) if noised else None
    hp = _hp(m)
    before = snapshot(m, [n for n, _ in m.named_parameters()])
    together = optimize_ft(m, REQ, SETS, hp, objective, noise)
    for n, p in m.named_parameters():  # the model itself is left as it was, bit for bit
        assert torch.equal(p, before[n]), n
    assert set(together) == set(SETS)
    for s in SETS:
        alone, final = _alone(m, s, hp, objective, noise)
        got = together[s]
        assert len(got.losses) == len(alone.losses) == hp.num_steps, (family, s)
        assert got.losses == pytest.approx(alone.losses, rel=1e-5, abs=1e-7), (family, s)
        assert got.p_target == pytest.approx(alone.convergence.p_target, rel=1e-5, abs=1e-8)
        assert got.bound_share == pytest.approx(alone.convergence.bound_share, abs=2e-3)
        assert got.noise_samples == (3 if noised else 1)
        for name, w in final.items():
            moved = (w.double() - before[name].double()).norm()
            assert moved > 0, (family, s, name)  # the finetuning moved the weights
            # float32 reduction order differs between the batched and the single path; on an AMD EPYC (AVX-512)
            # machine GPT-2's b_out differed by 2.6e-4 relative (one entry just inside the L-inf bound), on earlier
            # machines < 1e-4; 1e-3 is still far below what a wrong update gives (O(1))
            assert _rel(got.params[name] - before[name], w - before[name]) < 1e-3, (family, s, name)
            assert (got.params[name].double() - before[name].double()).abs().max() <= hp.norm_constraint


@pytest.mark.parametrize("family", ["llama"])
def test_each_layer_set_stops_early_on_its_own(tiny, family):  # noqa: F811
    m = tiny[family]
    hp = _hp(m)
    finals = sorted(min(_alone(m, s, hp, "maximize", None)[0].losses) for s in SETS)
    stop = (finals[0] + finals[-1]) / 2  # between the sets' best losses: some stop early, others run every step
    hp = _hp(m, skip_loss=stop)
    alone = {s: _alone(m, s, hp, "maximize", None) for s in SETS}
    assert len({len(r.losses) for r, _ in alone.values()}) > 1  # the sets did stop at different steps
    together = optimize_ft(m, REQ, SETS, hp)
    for s, (res, final) in alone.items():
        assert len(together[s].losses) == len(res.losses), s
        assert together[s].losses == pytest.approx(res.losses, rel=1e-5, abs=1e-7)
        for name, w in final.items():
            before = dict(m.named_parameters())[name].detach()
            assert _rel(together[s].params[name] - before, w - before) < 1e-4, (s, name)


def test_layer_sets_must_be_nonempty(tiny):  # noqa: F811
    with pytest.raises(ValueError, match="non-empty"):
        optimize_ft(tiny["gpt2"], REQ, [()], _hp(tiny["gpt2"]))


@pytest.mark.parametrize("family,problem", [("llama", "fact_forcing"), ("gemma3", "fact_erasure")])
def test_study_edits_through_the_memo_equal_edits_alone(tiny, family, problem, tmp_path, monkeypatch):  # noqa: F811
    """run_edit with a fact's memo (the study's path: FT-1 at every layer and FT-5's windows, each group finetuned in
    one lockstep batch) gives the rows of edits that finetune alone, within 1e-5; each group was optimised once."""
    from locedit.editors.methods import target_groups
    from locedit.editors.targets import TargetMemo
    from locedit.problems import load_dataset
    from locedit.problems.run import pre_edit, run_edit

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    m = tiny[family]
    fact = next(f for f in load_dataset("counterfact") if f.id == "cf:0")
    noise = GaussianNoise(sigma=0.3, samples=2, seed=0)
    groups = target_groups(["ft-1", "ft-5"], m.cfg.n_layers, (0, 1, 2))
    assert groups == {"ft-1": ((0,), (1,), (2,)), "ft-5": ((0, 1, 2),)}  # FT-5's windows clip to the 3 layers
    memo = TargetMemo(groups)
    pre = pre_edit(m, fact, problem, noise, essence=False)
    before = snapshot(m, [n for n, _ in m.named_parameters()])
    for meth in ("ft-1", "ft-5"):
        hp = dataclasses.replace(default_hparams(meth, m), lr=2e-2, num_steps=4, norm_constraint=5e-3)
        for layer in (0, 1, 2):
            kw = dict(hparams=hp, noise=noise, essence=False, pre=pre)
            shared = run_edit(m, fact, problem, meth, layer, targets=memo, **kw).as_row()
            alone = run_edit(m, fact, problem, meth, layer, **kw).as_row()
            assert_rows_equal(shared, alone, rel=1e-5, abs_=1e-7, context=(family, meth, layer))
    for n, p in m.named_parameters():  # every edit restored bit for bit
        assert torch.equal(p, before[n]), n
    assert memo.computed == 3 + 1  # FT-1's three layers in one batch, FT-5's one window
    assert memo.reused == 2 + 2  # FT-1 at layers 1, 2; FT-5 centred at 1 and 2 (the same clipped window)
