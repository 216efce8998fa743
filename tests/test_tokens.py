"""Edit at any token (issue 16): the token rules, the editors at every rule (fast == plain, the key read where the
rule says), typed errors for positions outside the prompt, the study's token dimension, and the token-level
statistics (cell join, best-cell rate with its chance rate)."""

import hashlib
import itertools

import numpy as np
import polars as pl
import pytest
import torch

from locedit.editors import EditRequest, apply, default_hparams, restore
from locedit.stats import best_cell_rate, join_cells, poisson_binomial_sf, token_regressions
from locedit.tracer import locate_subject
from locedit.editors.tokens import TokenPositionError, token_position
from locedit.editors.tokens import EDIT_TOKENS, check_edit_token

REQ = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
EYE = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731  (no corpus pass)
RULES = ["subject_first", "subject_last", "after_subject", "prompt_last", -1]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama(n_ctx=64)


def _hp(model, method, **kw):
    hp = default_hparams(method, model)
    return type(hp)(**{**hp.__dict__, "v_num_grad_steps": 5, "context_lengths": (), **kw})


def _hash(result) -> str:
    return hashlib.sha256(b"".join(result.deltas[n].double().numpy().tobytes() for n in sorted(result.deltas))).hexdigest()[:16]


def test_rules_name_the_positions(tiny):
    pt = locate_subject(tiny, REQ.text, REQ.subject)  # The mother tongue of | Dan iel le Dar rieux | is
    s, e = pt.subject_span
    assert (s, e, pt.n_tokens) == (4, 9, 10)
    got = {r: token_position(pt, r) for r in RULES}
    assert got == {"subject_first": 4, "subject_last": 8, "after_subject": 9, "prompt_last": 9, -1: 7}
    assert token_position(pt, 0) == token_position(pt, "subject_last") and token_position(pt, "1") == 9
    assert {spec.reference for spec in EDIT_TOKENS.values()} == {"subject_first", "subject_last",
                                                                  "subject_first_after_last", "last"}


@pytest.mark.parametrize("token", [2, -9, "after_subject"])
def test_positions_outside_the_prompt_are_typed_errors(tiny, token):
    req = EditRequest("{} speaks", "Danielle Darrieux", " English") if token != "after_subject" else \
        EditRequest("The mother tongue of {}", "Danielle Darrieux", " English")
    with pytest.raises(TokenPositionError, match=r"position -?\d+ of prompt '.*Danielle Darrieux.*'"):
        apply(tiny, req, "rome", [1], hparams=_hp(tiny, "rome"), covariance=EYE, token=token)
    with pytest.raises(ValueError, match="edit token rule"):
        check_edit_token("subject_middle")


def test_subject_last_reproduces_the_edits_before_token_rules(tiny):
    """No token, ``"subject_last"`` and offset 0 give bit-identical ΔW (the edits before token rules existed read
    the last subject token). The frozen checksums this test once held (commit 00d2a63) depend on the tokenizer's
    vocabulary size, which sizes the tiny model's random embedding, and moved with a transformers release."""
    for method, layers in [("rome", [1]), ("memit", [0, 1, 2])]:
        results = []
        for kw in ({}, {"token": "subject_last"}, {"token": 0}, {"token": "subject_first"}):
            results.append(apply(tiny, REQ, method, layers, hparams=_hp(tiny, method), covariance=EYE, **kw))
            restore(tiny, results[-1])
        hashes = [_hash(r) for r in results]
        assert len(set(hashes[:3])) == 1, method
        assert hashes[3] != hashes[0], method  # another position gives another edit: the check can fail
        assert any(float(d.abs().max()) > 0 for d in results[0].deltas.values())


@pytest.mark.parametrize("token", RULES)
def test_each_rule_reads_its_key_where_it_says_and_fast_equals_plain(tiny, token):
    pt = locate_subject(tiny, REQ.text, REQ.subject)
    pos = token_position(pt, token)
    _, cache = tiny.run_with_cache(pt.tokens[None], names_filter="blocks.1.mlp.hook_post")
    fast = apply(tiny, REQ, "rome", [1], hparams=_hp(tiny, "rome"), covariance=EYE, token=token)
    restore(tiny, fast)
    plain = apply(tiny, REQ, "rome", [1], hparams=_hp(tiny, "rome"), covariance=EYE, token=token, fast=False)
    restore(tiny, plain)
    torch.testing.assert_close(fast.info["k"], cache["blocks.1.mlp.hook_post"][0, pos].cpu(), rtol=1e-5, atol=1e-6)
    assert fast.info["token"] == token
    for name in fast.deltas:
        rel = (fast.deltas[name] - plain.deltas[name]).norm() / plain.deltas[name].norm()
        assert rel.item() < 1e-3, (token, rel.item())
    if token != "subject_last":  # a different key gives a different edit
        ref = apply(tiny, REQ, "rome", [1], hparams=_hp(tiny, "rome"), covariance=EYE)
        restore(tiny, ref)
        assert not torch.equal(ref.deltas["blocks.1.mlp.W_out"], fast.deltas["blocks.1.mlp.W_out"])


@pytest.mark.parametrize("token", ["subject_first", "prompt_last"])
def test_memit_fast_equals_plain_at_other_tokens(tiny, token):
    fast = apply(tiny, REQ, "memit", [0, 1, 2], hparams=_hp(tiny, "memit"), covariance=EYE, token=token)
    restore(tiny, fast)
    plain = apply(tiny, REQ, "memit", [0, 1, 2], hparams=_hp(tiny, "memit"), covariance=EYE, token=token, fast=False)
    restore(tiny, plain)
    for name in fast.deltas:
        rel = (fast.deltas[name] - plain.deltas[name]).norm() / plain.deltas[name].norm()
        assert rel.item() < 1e-3, (token, name, rel.item())


def test_study_units_have_a_token_dimension_and_ft_has_none():
    from locedit.config import parse_config
    from locedit.plan import EditUnit, method_tokens, parse_key, plan_units

    cfg = parse_config({"study": {"name": "t", "model": "smollm2-135m"},
                        "editing": {"methods": ["rome", "ft-1"], "layers": [3, 4],
                                    "tokens": ["subject_last", "prompt_last", "-1"]}})
    assert cfg.editing.tokens == ("subject_last", "prompt_last", -1)
    units = [u for u in plan_units(cfg, method_tokens(cfg), (3, 4), ["cf:1"]) if isinstance(u, EditUnit)]
    keys = [u.key() for u in units]
    assert all(parse_key(u.key()) == u for u in units)  # one key format, both ways
    assert "edit|cf:1|error_injection|rome|L3|Tsubject_last" in keys  # every ROME key names its token
    assert "edit|cf:1|error_injection|rome|L3|Tprompt_last" in keys and "edit|cf:1|error_injection|rome|L4|T-1" in keys
    assert [k for k in keys if "ft-1" in k] == ["edit|cf:1|error_injection|ft-1|L3", "edit|cf:1|error_injection|ft-1|L4"]
    assert len(keys) == 3 * 2 + 2
    with pytest.raises(Exception, match="edit token rule"):
        parse_config({"study": {"name": "t"}, "editing": {"tokens": ["middle"]}})


def _trace_rows(fact, n_tokens, n_layers, last, effect):
    """Long tracing rows of one fact whose fractional effect is effect(t, l)."""
    rows = []
    for t, l in itertools.product(range(n_tokens), range(n_layers)):
        e = effect(t, l)
        rows.append({"fact_id": fact, "kind": "mlp", "window": 5, "corruption": "noise", "token_index": t,
                     "token": f"t{t}", "is_subject": t <= last, "is_last_subject": t == last, "layer": l,
                     "prob": 0.1 + 0.8 * e, "p_clean": 0.9, "p_noised": 0.1, "fractional": e})
    return rows


def test_cell_join_picks_the_named_cell():
    trace = pl.DataFrame(_trace_rows("f1", 5, 4, last=2, effect=lambda t, l: (10 * t + l) / 100))
    edits = pl.DataFrame([
        {"fact_id": "f1", "problem": "error_injection", "method": "rome", "layer": 3, "token": "subject_first",
         "token_index": 0, "rewrite_score": 0.5},
        {"fact_id": "f1", "problem": "error_injection", "method": "rome", "layer": 1, "token": "prompt_last",
         "token_index": 4, "rewrite_score": 0.7},
        {"fact_id": "f1", "problem": "error_injection", "method": "rome", "layer": 2, "token": "subject_last",
         "token_index": 2, "rewrite_score": 0.9},
    ])
    cells = join_cells(edits, trace).sort("layer")
    assert cells["effect"].to_list() == pytest.approx([0.41, 0.22, 0.03])
    assert cells["token"].to_list() == ["prompt_last", "subject_last", "subject_first"]
    assert cells["token_index"].to_list() == [4, 2, 0]


def _cells(n_facts, peak_is_best, seed=0):
    """4 tokens × 3 layers per fact; the best-editing cell is one random cell (chance 1/12), and the peak-effect
    cell is that cell when ``peak_is_best`` else another random one."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n_facts):
        best, peak = rng.integers(12), rng.integers(12)
        if peak_is_best:
            peak = best
        for c in range(12):
            rows.append({"fact_id": f"f{f}", "problem": "error_injection", "method": "rome",
                         "token": ["subject_first", "subject_last", "after_subject", "prompt_last"][c // 3],
                         "token_index": c // 3, "layer": c % 3, "effect": 0.9 if c == peak else 0.1 * rng.random(),
                         "rewrite_score": 1.0 if c == best else 0.5 * rng.random()})
    return pl.DataFrame(rows)


def test_best_cell_rate_and_its_chance_rate():
    (r,) = best_cell_rate(_cells(40, peak_is_best=True))
    assert (r.n_facts, r.hits, r.rate) == (40, 40, 1.0)
    assert r.chance == pytest.approx(1 / 12) and r.p < 1e-30
    (r,) = best_cell_rate(_cells(400, peak_is_best=False, seed=1))
    assert r.chance == pytest.approx(1 / 12) and abs(r.rate - 1 / 12) < 0.04 and r.p > 0.05
    # ties: two best cells of four → chance 1/2
    two = pl.DataFrame([{"fact_id": "a", "problem": "p", "method": "m", "token": "x", "token_index": i, "layer": 0,
                         "effect": [0.1, 0.9, 0.2, 0.3][i], "rewrite_score": [1.0, 1.0, 0.2, 0.1][i]} for i in range(4)])
    (r,) = best_cell_rate(two)
    assert (r.hits, r.chance) == (1, 0.5)


def test_cross_fact_null_does_not_credit_a_regularity_every_fact_shares():
    """Every fact is best edited at the same cell and traces there: the uniform-chance null calls that a discovery
    (p ~ 1e-40), but another fact's tracing predicts it just as well, so the cross-fact null does not (p = 1). When
    the peak cell is fact-specific and right, both reject; when it is fact-specific and unrelated, neither does, and
    the cross-fact p-value holds its level over 300 null studies."""
    rng = np.random.default_rng(5)

    def cells(n, best_of, peak_of):
        rows = []
        for f in range(n):
            b, pk = best_of(f), peak_of(f)
            for c in range(12):
                rows.append({"fact_id": f"f{f:03d}", "problem": "error_injection", "method": "rome",
                             "token": ["subject_first", "subject_last", "after_subject", "prompt_last"][c // 3],
                             "token_index": c // 3, "layer": c % 3,
                             "effect": 0.9 if c == pk else 0.1 * rng.random(),
                             "rewrite_score": 1.0 if c == b else 0.5 * rng.random()})
        return pl.DataFrame(rows)

    (r,) = best_cell_rate(cells(40, lambda f: 4, lambda f: 4), n_permutations=999)
    assert r.rate == 1.0 and r.p < 1e-30 and r.cross_fact_chance == 1.0 and r.p_cross_fact == 1.0
    specific = [int(x) for x in rng.integers(12, size=40)]
    (r,) = best_cell_rate(cells(40, lambda f: specific[f], lambda f: specific[f]), n_permutations=999)
    assert r.rate == 1.0 and r.p_cross_fact == pytest.approx(1 / 1000) and r.cross_fact_chance < 0.2
    rejections = 0
    for seed in range(300):
        g = np.random.default_rng(seed)
        b, pk = g.integers(12, size=30), g.integers(12, size=30)
        (r,) = best_cell_rate(cells(30, lambda f: int(b[f]), lambda f: int(pk[f])), n_permutations=199, seed=seed)
        rejections += r.p_cross_fact <= 0.05
    assert rejections / 300 <= 0.08, rejections


def test_poisson_binomial_tail_equals_enumeration():
    probs = [0.1, 0.5, 0.25, 0.8]
    for k in range(6):
        brute = sum(np.prod([p if b else 1 - p for p, b in zip(probs, bits)])
                    for bits in itertools.product([0, 1], repeat=4) if sum(bits) >= k)
        assert poisson_binomial_sf(k, probs) == pytest.approx(brute, abs=1e-12)


def test_token_regression_recovers_a_planted_cell_effect():
    rng = np.random.default_rng(0)
    rows = []
    for f in range(60):
        for c in range(12):
            eff = rng.random()
            rows.append({"fact_id": f"f{f}", "problem": "error_injection", "method": "rome",
                         "token": ["subject_first", "subject_last", "after_subject", "prompt_last"][c // 3],
                         "token_index": c // 3, "layer": c % 3, "effect": eff,
                         "rewrite_score": 0.1 * (c % 3) + 0.6 * eff + 0.05 * rng.standard_normal()})
    (r,) = token_regressions(pl.DataFrame(rows), n_boot=100)
    assert r.n_facts == 60 and r.n_tokens == 4 and r.n_layers == 3
    assert r.r2_diff > 0.5 and r.p < 1e-10 and 0 < r.ci_low < r.r2_diff < r.ci_high
    noise = pl.DataFrame(rows).with_columns(pl.Series("effect", rng.random(len(rows))))
    (r0,) = token_regressions(noise, n_boot=100)
    assert r0.ci_low < 0 < r0.ci_high and abs(r0.r2_diff) < 0.02
