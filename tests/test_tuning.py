"""Editor tuning by Hase et al.'s App. A rule (locedit.tuning): the rule on hand-made tables, `tune` on a tiny model
choosing the grid point an independently computed table says it should, resuming from its journal without a single
new edit, the tuned table round-tripping into the profile exactly, the layer sweep's statistics on planted data, and
(slow) a real FT scan on the embedded model where a looser bound really edits more."""

import math
import os
import signal
from dataclasses import replace

import polars as pl
import pytest
import torch

from locedit.editors import key_second_moment
from locedit.problems import load_counterfact
from locedit.problems.run import run_edit
from locedit.tuning import (
    PAPER_GRIDS,
    LayerSweep,
    TuningConfigMismatch,
    budget_axes,
    TuningRule,
    choose_setting,
    evaluate,
    grid_points,
    layer_table,
    tune,
    write_tuned_table,
)
from locedit.problems.variants import problem_hparams
from locedit.tracer import profiles
from locedit.tracer.corruption import GaussianNoise
from locedit.tracer.profiles import TunedTableError, read_tuned_table, with_tuned_table


def _table(rewrite, neighborhood):
    return pl.DataFrame({"rewrite_mean": rewrite, "neighborhood_mean": neighborhood})


def test_rule_highest_rewrite_within_ceiling_and_neighborhood():
    rule = TuningRule()
    assert choose_setting(_table([0.5, 0.98, 0.999], [1.0, 0.99, 0.9]), rule) == (1, True)
    assert choose_setting(_table([0.5, 0.99, 0.999], [1.0, 0.99, 0.9]), rule) == (1, True)  # "no higher than": ≤
    # the highest rewrite within the ceiling gives up too much neighborhood (0.90 < 1.0 - 0.05): next best
    assert choose_setting(_table([0.5, 0.7, 0.98], [1.0, 0.97, 0.90]), rule) == (1, True)
    assert choose_setting(_table([0.5, 0.7, 0.98], [1.0, 0.97, 0.90]), TuningRule(neighborhood_tolerance=0.2)) == (2, True)
    # ties go to the earlier grid point; nothing admissible: the lowest rewrite, flagged
    assert choose_setting(_table([0.8, 0.8], [1.0, 1.0]), rule) == (0, True)
    assert choose_setting(_table([0.995, 0.992, 0.999], [1.0, 1.0, 1.0]), rule) == (1, False)
    assert choose_setting(_table([math.nan, 0.4], [1.0, 1.0]), rule) == (1, True)
    with pytest.raises(ValueError, match="rewrite_mean"):
        choose_setting(pl.DataFrame({"rewrite_mean": [0.5]}), rule)
    with pytest.raises(ValueError, match="reach"):
        TuningRule(reach=1.5)


def test_grid_points_paper_grid_then_budget():
    base = problem_hparams("fact_forcing", "rome", "gpt-j", tuned=False)  # v_lr 0.05, 25 steps (App. A)
    assert grid_points("rome", base) == [{"kl_factor": k} for k in (0.0625, 0.9, 1.0)]
    axes = budget_axes("rome", base)
    assert axes == {"v_lr": (0.05, 0.1, 0.2, 0.5), "v_num_grad_steps": (25, 50)}  # base values included
    wide = grid_points("rome", base, None, {"v_lr": axes["v_lr"]})
    assert wide[:2] == [{"v_lr": 0.05, "kl_factor": 0.0625}, {"v_lr": 0.05, "kl_factor": 0.9}] and len(wide) == 12
    ei = problem_hparams("error_injection", "ft-1", "gpt-j", tuned=False)
    ft = grid_points("ft-1", ei, {"norm_constraint": (1e-3, 1e-5)}, {"num_steps": budget_axes("ft-1", ei)["num_steps"]})
    assert ft[:2] == [{"num_steps": 25, "norm_constraint": 1e-5}, {"num_steps": 25, "norm_constraint": 1e-3}]
    assert sorted({p["num_steps"] for p in ft}) == [25, 50, 100]
    with pytest.raises(ValueError, match="not a hyper-parameter"):
        grid_points("rome", base, {"norm_constraint": (1e-4,)})
    with pytest.raises(ValueError, match="not a hyper-parameter"):
        budget_axes("ft-1", ei, {"v_lr": (0.5,)})


def test_the_budget_is_searched_jointly_at_the_paper_stages_kl(monkeypatch):
    """Widening scans every (learning rate, steps) combination at the KL weight the paper stage chose, and the rule
    picks the best admissible one over the whole table: here 50 steps at the base learning rate, a combination a
    learning-rate-first search never reaches (it fixes lr 0.1 at 25 steps, whose 50-step version is inadmissible)."""
    import locedit.tuning as tuning

    base = problem_hparams("fact_forcing", "rome", "gpt-j", tuned=False)  # v_lr 0.05, 25 steps

    def outcome(hp):  # rewrite and the neighborhood damage both grow with lr and steps (ROME's Fact Forcing, L15)
        rewrite = min(0.95, 0.1 + hp.v_lr + 0.004 * (hp.v_num_grad_steps - 25) - 0.01 * hp.kl_factor)
        return {"rewrite_score": rewrite, "paraphrase_score": rewrite,
                "neighborhood_score": 1.0 - 0.02 * hp.v_lr * hp.v_num_grad_steps}

    from types import SimpleNamespace

    facts = [SimpleNamespace(id="f1"), SimpleNamespace(id="f2")]

    class FakeRunner:
        def __init__(self, *a, **k):
            self.facts, self.progress, self.scanned = facts, None, []

        def journaled_point(self, problem, method, layer, base_, point):
            return dict(point)

        def outcome(self, fact, problem, method, layer, hp, point):
            self.scanned.append(tuple(sorted(point.items())))
            return outcome(hp)

    runners = []
    monkeypatch.setattr(tuning, "_Runner", lambda *a, **k: runners.append(FakeRunner()) or runners[-1])
    monkeypatch.setattr(tuning, "problem_hparams", lambda p, meth, mod, tuned=True: base)
    monkeypatch.setattr("locedit.problems.variants.default_noise", lambda model, noise=None: None)
    res, = tuning.tune(None, facts, ["fact_forcing"], ["rome"], 5)
    t = res.table
    assert res.widened and t.filter(pl.col("stage") == "paper").height == 3
    budget = t.filter(pl.col("stage") == "budget:v_lr×v_num_grad_steps")
    # 4 rates × 2 step counts at the paper stage's KL (0.0625: the highest rewrite there), less the paper point
    assert budget.height == 7 and set(budget["kl_factor"].to_list()) == {0.0625}
    assert res.chosen == {"kl_factor": 0.0625, "v_lr": 0.05, "v_num_grad_steps": 50}, res.chosen
    assert res.table.filter(pl.col("chosen"))["rewrite_mean"].item() == pytest.approx(0.2493750)


def test_widening_scans_each_budgets_bounds_downward_and_chooses_what_the_full_scan_chooses(monkeypatch):
    """FT's widening: per step budget the L∞ bounds are scanned from the largest down to the first admissible one
    (a smaller bound edits less under the same budget: it cannot be chosen). Planted outcomes, monotone in the bound
    and the steps, where neighborhood binds (FT on a small model): the same choice as measuring every point, with
    fewer points measured; the table lists the measured rows in grid order."""
    import locedit.tuning as tuning
    from types import SimpleNamespace

    base = problem_hparams("error_injection", "ft-1", "gpt-j", tuned=False)  # 25 steps
    bounds = PAPER_GRIDS[type(base)]["norm_constraint"]

    def outcome(hp):  # the rewrite grows with the bound and the steps, the neighborhood damage with the bound
        rewrite = min(0.999, 100 * hp.norm_constraint * hp.num_steps / 25)
        return {"rewrite_score": rewrite, "paraphrase_score": rewrite / 2,
                "neighborhood_score": 1.0 - 15 * hp.norm_constraint}

    facts = [SimpleNamespace(id="f1")]
    scanned = []

    class FakeRunner:
        def __init__(self, *a, **k):
            self.facts, self.progress = facts, None

        def journaled_point(self, problem, method, layer, base_, point):
            return dict(point)

        def outcome(self, fact, problem, method, layer, hp, point):
            scanned.append((hp.num_steps, hp.norm_constraint))
            return outcome(hp)

    monkeypatch.setattr(tuning, "_Runner", FakeRunner)
    monkeypatch.setattr(tuning, "problem_hparams", lambda p, meth, mod, tuned=True: base)
    monkeypatch.setattr("locedit.problems.variants.default_noise", lambda model, noise=None: None)
    res, = tuning.tune(None, facts, ["error_injection"], ["ft-1"], 5)
    # the whole grid, measured point by point, and the rule on it
    full = [{"num_steps": n, "norm_constraint": b} for n in (25, 50, 100) for b in bounds]
    table = pl.DataFrame([{"rewrite_mean": o["rewrite_score"], "neighborhood_mean": o["neighborhood_score"]}
                          for o in (outcome(replace(base, **p)) for p in full)])
    best = full[choose_setting(table)[0]]
    assert res.widened and res.chosen == best, (res.chosen, best)
    assert best == {"num_steps": 50, "norm_constraint": 3e-3}  # rewrite 0.6, neighborhood 0.955 (0.045 given up)
    budget = [(n, b) for n, b in scanned if n != 25]
    # per budget from 1e-2 down to its first admissible bound: 1e-2 gives up 0.15 of neighborhood; at 100 steps 3e-3
    # is over the ceiling (0.999)
    assert budget == [(50, 1e-2), (50, 3e-3), (100, 1e-2), (100, 3e-3), (100, 1e-3)]
    assert len(scanned) == 8 + 5 < len(full)  # the paper stage's upward scan ends at 1e-2, over the ceiling
    rows = res.table.filter(pl.col("stage") != "paper")
    assert rows.select("num_steps", "norm_constraint").rows() == [(50, 3e-3), (50, 1e-2), (100, 1e-3), (100, 3e-3),
                                                                  (100, 1e-2)]  # grid order per budget


@pytest.fixture()
def tiny_setup(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    m = tiny_llama()
    facts = [f for f in load_counterfact(limit=3)][:3]
    return m, facts


def test_the_tuning_sample_is_remembered_so_a_resume_decodes_nothing(tiny_setup, tmp_path, monkeypatch):
    """The known filter's cache is per machine; the selection is recorded in the tuning directory (ids and content
    digests per model, dataset, skip, n), so a resume elsewhere reads it back -- unless a fact's content changed."""
    from locedit.tuning import known_sample

    m, _ = tiny_setup
    facts = load_counterfact(limit=40)
    decoded = []

    def mask(model, part):  # a stand-in for greedy decoding: every third fact is "known"
        decoded.extend(f.id for f in part)
        return [int(f.id.split(":")[1]) % 3 == 0 for f in part]

    monkeypatch.setattr("locedit.problems.filters.known_mask", mask)
    record = tmp_path / "tune" / "facts.json"
    first = known_sample(m, facts, 4, skip=2, record=record, dataset="counterfact")
    expect = [f for f in facts if int(f.id.split(":")[1]) % 3 == 0][2:6]
    assert first == expect and decoded
    decoded.clear()
    assert known_sample(m, facts, 4, skip=2, record=record, dataset="counterfact") == expect and decoded == []
    other = known_sample(m, facts, 3, skip=0, record=record, dataset="counterfact")  # another sample: decoded
    assert other == [f for f in facts if int(f.id.split(":")[1]) % 3 == 0][:3] and decoded
    decoded.clear()
    assert known_sample(m, facts, 4, skip=2, record=record, dataset="counterfact") == expect and decoded == []
    changed = [replace(f, o_true=" Mars") if f.id == expect[1].id else f for f in facts]
    again = known_sample(m, changed, 4, skip=2, record=record, dataset="counterfact")
    assert decoded and [f.id for f in again] == [f.id for f in expect] and again[1].o_true == " Mars"


def test_tune_on_a_tiny_model_picks_the_hand_computed_point_and_resumes(tiny_setup, tmp_path, monkeypatch):
    m, facts = tiny_setup
    layer, problem, n_tok = 1, "error_injection", 512
    base = replace(problem_hparams(problem, "rome", m, tuned=False), v_num_grad_steps=6, context_lengths=((3, 2),))
    grid = (0.0625, 1.0, 4.0)
    cov = lambda mm, lay: key_second_moment(mm, lay, n_tokens=n_tok, progress=False)  # noqa: E731
    # the slow, obviously-correct table: every edit alone through run_edit (its own pre-edit scores and v*)
    hand = []
    for k in grid:
        outs = [run_edit(m, f, problem, "rome", layer, hparams=replace(base, kl_factor=k), essence=False,
                         covariance=cov) for f in facts]
        hand.append((sum(o.rewrite_score for o in outs) / len(outs), sum(o.neighborhood_score for o in outs) / len(outs)))
    ranked = sorted(range(len(grid)), key=lambda i: -hand[i][0])
    # a random 32-wide model barely moves p(target) (rewrites ~1e-5), but the three points still differ by far more
    # than the two paths do
    assert hand[ranked[0]][0] - hand[ranked[1]][0] > 1e-7, hand
    ceiling = (hand[ranked[0]][0] + hand[ranked[1]][0]) / 2  # the top point is over it: the rule must take the 2nd
    rule = TuningRule(ceiling=ceiling, neighborhood_tolerance=1.0, reach=0.0)
    monkeypatch.setattr("locedit.tuning.problem_hparams", lambda p, meth, mod, tuned=True: base)
    d = tmp_path / "tune"
    res, = tune(m, facts, [problem], ["rome"], layer, rule=rule, grids={"rome": {"kl_factor": grid}}, directory=d,
                covariance_tokens=n_tok)
    got = res.table["rewrite_mean"].to_list()
    assert got == pytest.approx([h[0] for h in hand], rel=1e-3, abs=1e-9)
    assert res.chosen == {"kl_factor": grid[ranked[1]]} and res.within_rule and not res.widened
    assert res.table["chosen"].to_list() == [i == ranked[1] for i in range(len(grid))]
    # the held-out check scores the profile's current setting (here the base, kl 1 = a grid point) the same way
    ev = evaluate(m, facts, [problem], ["rome"], layer, covariance_tokens=n_tok)
    assert base.kl_factor in grid and not ev["tuned"][0]
    assert ev["rewrite_mean"][0] == pytest.approx(got[grid.index(base.kl_factor)], rel=1e-6, abs=1e-12)
    assert ev["ci_low"][0] <= ev["rewrite_mean"][0] <= ev["ci_high"][0]
    # resume: the journal answers every edit (none is recomputed) and the table is the same
    calls = []
    monkeypatch.setattr("locedit.problems.run.run_edit", lambda *a, **k: calls.append(1))
    again, = tune(m, facts, [problem], ["rome"], layer, rule=rule, grids={"rome": {"kl_factor": grid}}, directory=d,
                  covariance_tokens=n_tok)
    assert calls == [] and again.table.equals(res.table) and again.chosen == res.chosen
    # the same settings under other labels (ints for floats, a base value written out) are the journalled edits
    relabelled, = tune(m, facts, [problem], ["rome"], layer, rule=rule, directory=d, covariance_tokens=n_tok,
                       grids={"rome": {"kl_factor": tuple(int(k) if k == int(k) else k for k in grid),
                                       "v_num_grad_steps": (base.v_num_grad_steps,)}})
    assert calls == [] and relabelled.table["rewrite_mean"].to_list() == got
    # another rule in the same directory re-decides from the same rows (the rule chooses, it does not change a row)
    loose, = tune(m, facts, [problem], ["rome"], layer, rule=replace(rule, ceiling=1.0),
                  grids={"rome": {"kl_factor": grid}}, directory=d, covariance_tokens=n_tok)
    assert calls == [] and loose.chosen == {"kl_factor": grid[ranked[0]]}
    with pytest.raises(TuningConfigMismatch, match="layer"):
        tune(m, facts, [problem], ["rome"], 0, rule=rule, grids={"rome": {"kl_factor": grid}}, directory=d,
             covariance_tokens=n_tok)


def test_widening_searches_the_budget_when_the_grid_falls_short(tiny_setup, monkeypatch):
    m, facts = tiny_setup
    base = replace(problem_hparams("error_injection", "ft-1", m, tuned=False), num_steps=2)
    monkeypatch.setattr("locedit.tuning.problem_hparams", lambda p, meth, mod, tuned=True: base)
    res, = tune(m, facts[:1], ["error_injection"], ["ft-1"], 1, rule=TuningRule(reach=0.99),
                grids={"ft-1": {"norm_constraint": (1e-6,)}}, budget={"ft-1": {"num_steps": (4,)}})
    # a bound of 1e-6 edits nothing: below reach, so the budget (2 and 4 steps) is searched and marked
    assert res.widened and res.table["stage"].to_list() == ["paper", "budget:num_steps"]
    assert res.table["num_steps"].to_list() == [2, 4]  # the paper row is the base budget (2 steps)
    assert res.chosen["norm_constraint"] == 1e-6 and all(isinstance(v, float) for v in res.chosen.values())


def test_tuned_table_round_trips_into_the_profile_exactly(tiny_setup, tmp_path, monkeypatch):
    m, facts = tiny_setup
    base = replace(problem_hparams("error_injection", "ft-1", "smollm2-135m", tuned=False), num_steps=2)
    monkeypatch.setattr("locedit.tuning.problem_hparams", lambda p, meth, mod, tuned=True: base)
    res, = tune(m, facts[:1], ["error_injection"], ["ft-1"], 1, widen=False,
                grids={"ft-1": {"norm_constraint": (3e-3, 7e-3)}})
    path = tmp_path / "smollm2.json"
    write_tuned_table(path, "SmolLM2-135M-Instruct", "smollm2", [res], date="2026-12-02")
    table = read_tuned_table(path)
    entry, = table["entries"]
    assert entry["overrides"] == res.chosen and entry["provenance"]["facts"] == [facts[0].id]
    assert len(entry["provenance"]["table"]) == 2 and entry["provenance"]["date"] == "2026-12-02"
    tuned = with_tuned_table(profiles.SMOLLM2, table)
    monkeypatch.setattr(profiles, "PROFILES", {**profiles.PROFILES, "smollm2": tuned})
    from locedit.problems import variants

    applied = variants.problem_hparams("error_injection", "ft-1", "smollm2-135m")
    assert applied.norm_constraint == res.chosen["norm_constraint"]
    assert variants.problem_hparams("error_injection", "ft-1", "smollm2-135m", tuned=False).norm_constraint == \
        profiles.SMOLLM2.problem_hparams[("error_injection", "ft-1")]["norm_constraint"]
    # a second write merges (replaces the same problem × method, keeps it and adds the sweep's layer)
    sweep = LayerSweep("error_injection", "rome", pl.DataFrame({"layer": [3, 7], "indistinguishable": [False, True]}),
                       7, ("cf:0",))
    write_tuned_table(path, "SmolLM2-135M-Instruct", "smollm2", [res], edit_layer=sweep, date="2026-12-03")
    again = read_tuned_table(path)
    assert len(again["entries"]) == 1 and again["edit_layer"]["layer"] == 7
    assert with_tuned_table(profiles.SMOLLM2, again).edit_layer(30) == 7
    with pytest.raises(ValueError, match="not 'gemma3'"):
        write_tuned_table(path, "gemma", "gemma3", [res])
    path.write_text('{"format": 99}')
    with pytest.raises(TunedTableError, match="format"):
        read_tuned_table(path)


def test_layer_table_finds_the_planted_best_layer_and_its_equals():
    rng = torch.Generator().manual_seed(0)
    n, means = 30, {0: 0.2, 4: 0.8, 8: 0.79, 12: 0.5}
    fact_effect = torch.randn(n, generator=rng) * 0.1
    rows = [{"fact_id": f"f{i}", "layer": lay, "rewrite_score": mu + float(fact_effect[i]) +
             0.02 * float(torch.randn(1, generator=rng)), "paraphrase_score": 0.0, "neighborhood_score": 1.0}
            for i in range(n) for lay, mu in means.items()]
    t, best = layer_table(pl.DataFrame(rows), peaks=[4, 4, 8, 12, 30])
    assert best == 4
    ind = dict(zip(t["layer"].to_list(), t["indistinguishable"].to_list()))
    assert ind == {0: False, 4: True, 8: True, 12: False}
    assert t["trace_peaks"].to_list() == [0, 2, 1, 1]
    r4 = t.filter(pl.col("layer") == 4).row(0, named=True)
    assert r4["ci_low"] < r4["rewrite_mean"] < r4["ci_high"] and r4["ci_high"] - r4["ci_low"] < 0.1
    assert not any(t["admissible"])  # no layer reaches the rule's 0.9: the highest rewrite, none admissible


def test_the_layer_rule_gives_up_rewrite_for_neighborhood_only_within_the_tolerance():
    """Gemma's sweep: the highest mean rewrite (layer 12, 0.991) broke half the neighborhood (0.508) where layer 2
    edits almost as well (0.979) at 0.906. The reference neighborhood is the best among layers that edit (≥ reach):
    layer 16 keeps 0.906 too but edits nothing, and a layer that edits nothing keeps a perfect neighborhood."""
    from locedit.tuning import TuningRule, choose_layer

    t = pl.DataFrame({"layer": [0, 2, 4, 12, 16, 17], "rewrite_mean": [0.83, 0.979, 0.984, 0.991, 0.199, 0.001],
                      "neighborhood_mean": [0.968, 0.906, 0.817, 0.508, 0.906, 0.995]})
    assert choose_layer(t) == (2, [False, True, False, False, False, False])
    assert choose_layer(t, TuningRule(neighborhood_tolerance=0.1))[0] == 4
    assert choose_layer(t, TuningRule(neighborhood_tolerance=0.5))[0] == 12
    assert choose_layer(t, TuningRule(reach=0.8, neighborhood_tolerance=0.05))[0] == 0  # 0 now edits: ref 0.968
    assert choose_layer(t.with_columns(pl.col("rewrite_mean") * 0.5))[0] == 12  # none edits: highest rewrite


@pytest.mark.parametrize("family,layer", [("smollm2", 15), ("gemma3", 2)])
def test_the_shipped_default_edit_layers_follow_the_layer_rule(family, layer):
    """Each profile's installed edit layer is what the rule gives on the sweep table it ships as provenance."""
    from locedit.tracer.profiles import TUNED_DIR
    from locedit.tuning import choose_layer

    entry = read_tuned_table(TUNED_DIR / f"{family}.json")["edit_layer"]
    table = pl.DataFrame(entry["provenance"]["table"]).select("layer", "rewrite_mean", "neighborhood_mean")
    assert entry["layer"] == layer == choose_layer(table)[0]


def test_looser_bound_edits_more_on_real_facts(model):
    facts = load_counterfact(limit=2)  # cf:0 (Danielle Darrieux → French), cf:13
    lines = []
    res, = tune(model, facts, ["error_injection"], ["ft-1"], 12, widen=False,
                grids={"ft-1": {"norm_constraint": (1e-2, 1e-5)}}, progress=lines.append)
    t = res.table
    assert t["norm_constraint"].to_list() == [1e-5, 1e-2] and t["n"].to_list() == [2, 2] and len(lines) == 3
    tight, loose = t["rewrite_mean"].to_list()
    # measured: ~0.000 at 1e-5 (the GPT-J-scale bound does nothing on SmolLM2) vs > 0.3 unconstrained
    assert tight < 0.02 and loose > tight + 0.2
    # the rule: the loose bound only if within the ceiling *and* its neighborhood is within 0.05 of the tight one's
    nb_tight, nb_loose = t["neighborhood_mean"].to_list()
    admissible = loose <= 0.99 and nb_loose >= max(nb_tight, nb_loose) - 0.05
    assert res.chosen == {"norm_constraint": 1e-2 if admissible else 1e-5}
    assert t["chosen"].to_list() == [not admissible, admissible]


def test_fact_forcing_reports_transfer_to_the_noise_draws_its_edit_did_not_see(tiny_setup):
    """An FF edit over the first 2 of 4 noise draws: ``rewrite_score_heldout_noise`` is the rewrite score on draws 3
    and 4, i.e. from p(target) averaged over exactly those draws (checked draw by draw, before and after the same
    edit); with every draw optimised there is nothing held out (NaN)."""
    from locedit.editors import EditRequest, edit
    from locedit.problems import metrics as M
    from locedit.problems.variants import default_noise
    from locedit.tracer import target_probs
    from locedit.tracer.tokens import locate_subject

    m, facts = tiny_setup
    fact = facts[0]
    noise = default_noise(m, GaussianNoise(scale=3.0, samples=4, seed=1))
    hp = replace(problem_hparams("fact_forcing", "ft-1", m, tuned=False), num_steps=3, norm_constraint=1e-1)
    out = run_edit(m, fact, "fact_forcing", "ft-1", 1, hparams=hp, noise=noise, essence=False, edit_samples=2)
    full = run_edit(m, fact, "fact_forcing", "ft-1", 1, hparams=hp, noise=noise, essence=False)
    assert math.isnan(full.rewrite_score_heldout_noise) and math.isfinite(out.rewrite_score_heldout_noise)
    s, e = locate_subject(m, fact.prompt, fact.subject).subject_span
    eps = noise.draw(e - s, m.cfg.d_model)

    def p_by_draw():
        return [float(target_probs(m, [fact.prompt], [out.target], subjects=[fact.subject],
                                   noise=replace(noise, samples=1, values=eps[j:j + 1], of=None))[0]) for j in (2, 3)]

    before = p_by_draw()
    req = EditRequest(template=fact.template, subject=fact.subject, target=out.target)
    with edit(m, req, method="ft-1", layers=[1], hparams=hp, noise=noise.prefix(2)):
        after = p_by_draw()
    want = M.rewrite_score(sum(before) / 2, sum(after) / 2)
    assert out.rewrite_score_heldout_noise == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert out.rewrite_score_heldout_noise != pytest.approx(out.rewrite_score, rel=1e-6)


def test_cli_tune_refuses_bad_requests_in_one_line(capsys):
    from locedit.cli import main

    assert main(["tune", "--layers", "1", "2", "--methods", "rome", "ft-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one problem and one method" in err[0]
    assert main(["tune", "--skip", "-1"]) == 2 and "--skip must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--grid", "kl_factor"])  # argparse: FIELD=V1,V2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_tune_and_sweep_at_a_clean_boundary_and_the_resume_equals_an_uninterrupted_run(
        tiny_setup, tmp_path, monkeypatch, signum):
    """`kill PID` during a tune's first edit: that edit is journalled, RunStopped is raised (the CLI: one line, exit
    0), and the same call resumes to the table of a run nobody stopped. A layer sweep stops after the running fact's
    layers (its lockstep batch is never cut in two)."""
    import locedit.problems.run as run_mod
    from locedit.journal import read_journal
    from locedit.stopping import RunStopped, stop_on_signal
    from locedit.tuning import sweep_layers

    m, facts = tiny_setup
    base = replace(problem_hparams("error_injection", "ft-1", m, tuned=False), num_steps=2)
    monkeypatch.setattr("locedit.tuning.problem_hparams", lambda p, meth, mod, tuned=True: base)
    kw = dict(grids={"ft-1": {"norm_constraint": (1e-3, 1e-2)}}, widen=False)
    whole, = tune(m, facts, ["error_injection"], ["ft-1"], 1, directory=tmp_path / "whole", **kw)
    real, calls = run_mod.run_edit, []

    def signalling(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)  # recorded only: this edit finishes and is journalled
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "run_edit", signalling)
    previous = signal.getsignal(signum)
    with pytest.raises(RunStopped) as stopped, stop_on_signal("the running edit") as stop:
        tune(m, facts, ["error_injection"], ["ft-1"], 1, directory=tmp_path / "cut", stop=stop, **kw)
    assert stopped.value.signal == signum and signal.getsignal(signum) == previous
    assert len(calls) == 1 and len(list(read_journal(tmp_path / "cut" / "tune.jsonl"))) == 1
    rest, = tune(m, facts, ["error_injection"], ["ft-1"], 1, directory=tmp_path / "cut", **kw)
    assert len(calls) == 1 + 2 * len(facts) - 1  # only the edits not journalled ran
    cols = [c for c in whole.table.columns if "seconds" not in c]
    assert rest.table.select(cols).equals(whole.table.select(cols)) and rest.chosen == whole.chosen

    sw_kw = dict(hparams=base, peaks=False)
    ref = sweep_layers(m, facts, "error_injection", "ft-1", [0, 1], directory=tmp_path / "sw-whole", **sw_kw)
    calls.clear()  # the next edit signals again
    with pytest.raises(RunStopped), stop_on_signal("the running fact's layers") as stop:
        sweep_layers(m, facts, "error_injection", "ft-1", [0, 1], directory=tmp_path / "sw-cut", stop=stop, **sw_kw)
    journalled = list(read_journal(tmp_path / "sw-cut" / "sweep.jsonl"))
    assert sorted(r["layer"] for r in journalled) == [0, 1] and {r["fact_id"] for r in journalled} == {facts[0].id}
    again = sweep_layers(m, facts, "error_injection", "ft-1", [0, 1], directory=tmp_path / "sw-cut", **sw_kw)
    assert again.table.equals(ref.table) and again.best_layer == ref.best_layer


def test_cli_reports_a_clean_stop_in_one_line_and_exits_0(monkeypatch, capsys):
    from locedit import cli
    from locedit.stopping import RunStopped

    def stopped(args):
        raise RunStopped(signal.SIGTERM, "after an edit (journalled)")

    monkeypatch.setattr(cli, "cmd_tune", stopped)
    assert cli.main(["tune"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["locedit: stopped on SIGTERM after an edit (journalled); rerun the same command to resume"]
