"""Editing fidelity against the reference code (kmeng01/rome, kmeng01/memit, google/belief-localization):
where the KL term is read, how MEMIT averages keys over context templates, and Fact Erasure's objective."""

import math

import pytest
import torch

from locedit.editors import EditRequest, apply, default_hparams, restore
from locedit.editors.inputs import build_batch
from locedit.editors.memit import mean_of_group_means
from locedit.editors.templates import context_templates, template_group_sizes
from locedit.editors.vstar import main_objective
from locedit.tracer import locate_subject, target_tokens

SUBJECT = "Danielle Darrieux"


def test_kl_row_is_scored_at_the_last_subject_token(model):
    """rome/compute_v.py and memit/compute_z.py read the KL prompt "{s} is a" at its lookup index (the last subject
    token), not at its last token."""
    kl = f"{SUBJECT} is a"
    pt = locate_subject(model, kl, SUBJECT)
    assert pt.n_tokens - 1 > pt.last_subject_index  # the two positions differ, so the test can fail
    tgt = target_tokens(model, " English")
    batch = build_batch(model, [f"The mother tongue of {SUBJECT} is", kl], SUBJECT, [tgt, None])
    kl_rows = batch.score_targets < 0
    assert int(kl_rows.sum()) == 1
    assert int(batch.score_pos[kl_rows]) == pt.last_subject_index == int(batch.lookup[1])
    assert "".join(pt.str_tokens[: pt.last_subject_index + 1]).strip().endswith("Darrieux")
    # the rewrite row still scores the teacher-forced target positions after the prompt
    n = locate_subject(model, f"The mother tongue of {SUBJECT} is", SUBJECT).n_tokens
    assert batch.score_pos[~kl_rows].tolist() == list(range(n - 1, n - 1 + len(tgt)))


def test_mean_of_group_means_by_hand():
    x = torch.tensor([[6.0], [0.0], [0.0], [0.0], [0.0], [0.0]])
    assert mean_of_group_means(x, (1, 5)).item() == pytest.approx(3.0)  # plain prompt weighs 1/2
    assert x.mean(0).item() == pytest.approx(1.0)  # the flat mean locedit used before
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 8.0]])
    torch.testing.assert_close(mean_of_group_means(x, (1, 2)), torch.tensor([2.5, 4.0]))
    with pytest.raises(ValueError, match="partition"):
        mean_of_group_means(x, (1, 1))


def test_template_group_sizes():
    assert template_group_sizes(((10, 5),)) == (1, 5)
    assert template_group_sizes(((5, 10), (10, 10))) == (1, 10, 10)


def test_erasure_objective_is_exp_of_minus_mean_nll():
    nll = torch.tensor([math.log(2.0), math.log(8.0)])
    assert main_objective(nll, "minimize").item() == pytest.approx(0.25)  # exp(−mean NLL), the paper's code
    assert main_objective(nll, "maximize").item() == pytest.approx(math.log(4.0))
    with pytest.raises(ValueError):
        main_objective(nll, "sideways")


def test_memit_key_is_the_mean_of_template_group_means(model, monkeypatch):
    """The k passed to MEMIT's update at the first window layer equals the grouped mean of hook_post computed by
    hand (and differs from the flat mean by more than rounding)."""
    import locedit.editors.memit as memit_mod
    seen = []
    real = memit_mod.memit_update
    monkeypatch.setattr(memit_mod, "memit_update", lambda C, k, r, lam: seen.append(k.clone()) or real(C, k, r, lam))
    hp = default_hparams("memit", "smollm2")
    from dataclasses import replace

    hp = replace(hp, v_num_grad_steps=2)
    req = EditRequest("The mother tongue of {} is", SUBJECT, " English")
    layers = [10, 11, 12, 13, 14]
    texts = [t.format(req.text) for t in context_templates(model, hp.context_lengths)]
    keys = []
    with torch.no_grad():
        for text in texts:
            pt = locate_subject(model, text, SUBJECT)
            _, cache = model.run_with_cache(pt.tokens[None], names_filter="blocks.10.mlp.hook_post")
            keys.append(cache["blocks.10.mlp.hook_post"][0, pt.last_subject_index])
    keys = torch.stack(keys)
    res = apply(model, req, "memit", layers, hparams=hp)
    restore(model, res)
    grouped = torch.cat([keys[:1], keys[1:].mean(0, keepdim=True)]).mean(0)
    torch.testing.assert_close(seen[0], grouped, rtol=1e-4, atol=1e-5)
    assert (seen[0] - keys.mean(0)).norm() > 100 * (seen[0] - grouped).norm()


@pytest.mark.parametrize("method,key", [("rome", "k"), ("r-rome", "k_star")])
def test_rome_maps_the_plain_key_and_r_rome_the_mean_key_to_v_star(model, method, key):
    """ROME solves its rank-one update for the plain prompt's key k, r-ROME (Gupta et al. 2024) for the template-mean
    key k* that also gives u: after the edit, ``key @ W_out + b_out == v*`` (and not for the other key)."""
    from dataclasses import replace

    hp = replace(default_hparams("rome", "smollm2"), v_num_grad_steps=3)
    req = EditRequest("The mother tongue of {} is", SUBJECT, " English")
    res = apply(model, req, method, [8], hparams=hp)
    try:
        mlp = model.blocks[8].mlp
        with torch.no_grad():
            out = {k: res.info[k] @ mlp.W_out + mlp.b_out for k in ("k", "k_star")}
        v_star = res.info["v_star"]
        other = "k_star" if key == "k" else "k"
        assert (out[key] - v_star).norm() < 1e-5 * v_star.norm()
        assert (out[other] - v_star).norm() > 1e-2 * v_star.norm()
        assert res.method == method
    finally:
        restore(model, res)


@pytest.mark.parametrize("fact_id", ["cf:307", "cf:780"])
def test_r_rome_shrinks_the_largest_rome_updates_and_their_damage(model, fact_id):
    """cf:307 and cf:780 at layer 15 have the two largest ROME update norms of the 30 known facts measured by
    scripts/edit_norms.py (78.96 and 78.83; 10,240-token key statistics, as in the suite). r-ROME's update is about
    half as large and damages the essence texts' perplexity far less (cf:307 +2.2 -> +0.5, cf:780 +11.0 -> +1.4).
    Its rewrite score is NOT generally as good on this model: 0.970 -> 0.384 on cf:307, 0.997 -> 0.993 on cf:780,
    and not worse (within 0.02) on only 1 of the 10 largest-norm edits (see README, "Editing fidelity")."""
    from locedit.problems import load_counterfact, run_edit

    fact = next(f for f in load_counterfact() if f.id == fact_id)
    rome = run_edit(model, fact, "error_injection", "rome", 15)
    r_rome = run_edit(model, fact, "error_injection", "r-rome", 15)
    assert r_rome.update_norm < 0.7 * rome.update_norm
    assert (r_rome.ppl_post - r_rome.ppl_pre) < 0.5 * (rome.ppl_post - rome.ppl_pre)
