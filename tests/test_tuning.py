"""FT norm-constraint tuning (Hase et al. App. A rule): the choice rule on synthetic scans, and a real scan on the
embedded model where a looser bound really edits more."""

import pytest

from locedit.problems import load_counterfact
from locedit.problems.tuning import choose_norm_constraint, tune_norm_constraint


def test_choose_largest_bound_within_ceiling():
    bounds = [1e-5, 1e-4, 1e-3, 1e-2]
    assert choose_norm_constraint(bounds, [0.01, 0.5, 0.98, 0.999]) == (1e-3, True)
    assert choose_norm_constraint(bounds, [0.01, 0.5, 0.98, 0.99]) == (1e-2, True)  # "no higher than": ≤
    assert choose_norm_constraint(bounds, [0.995, 0.996, 0.997, 0.999]) == (1e-5, False)
    assert choose_norm_constraint([1e-3, 1e-5], [0.2, 0.1], ceiling=0.15) == (1e-5, True)  # order-free
    with pytest.raises(ValueError, match="one mean rewrite per bound"):
        choose_norm_constraint(bounds, [0.1])


def test_bad_tuning_requests_are_clear_errors(model):
    facts = load_counterfact(limit=1)
    with pytest.raises(ValueError, match="ft-1"):
        tune_norm_constraint(model, facts, "error_injection", "rome", 5)
    with pytest.raises(ValueError, match="unknown problem"):
        tune_norm_constraint(model, facts, "error_injektion", "ft-1", 5)
    with pytest.raises(ValueError, match="bounds must be positive"):
        tune_norm_constraint(model, facts, "error_injection", "ft-1", 5, bounds=[0.0, 1e-3])
    with pytest.raises(ValueError, match="no facts"):
        tune_norm_constraint(model, [], "error_injection", "ft-1", 5)


def test_looser_bound_edits_more_on_real_facts(model):
    facts = load_counterfact(limit=2)  # cf:0 (Danielle Darrieux → French), cf:13
    lines = []
    res = tune_norm_constraint(model, facts, "error_injection", "ft-1", 12, bounds=[1e-2, 1e-5],
                               stop_above=False, progress=lines.append)
    t = res.table
    assert t["norm_constraint"].to_list() == [1e-5, 1e-2] and t["n"].to_list() == [2, 2] and len(lines) == 2
    tight, loose = t["rewrite_mean"].to_list()
    # measured: ~0.000 at 1e-5 (the GPT-J-scale bound does nothing on SmolLM2) vs > 0.3 unconstrained
    assert tight < 0.02 and loose > tight + 0.2
    assert res.chosen == (1e-2 if loose <= 0.99 else 1e-5) and res.fact_ids == ("cf:0", "cf:13")
