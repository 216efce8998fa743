"""A study's shared path (one memo per fact: pre-edit scores once, v*/z shared by ROME and r-ROME and optimised for
all layers in one lockstep batch, FT's layer sets finetuned in lockstep) writes the rows the one-edit-at-a-time
path writes (``memo=None``), within 1e-5 (issue 24: "every number the study writes is unchanged"), on a tiny random
Llama-family model with every edit method, Error Injection and Fact Forcing."""


import torch

from locedit.config import parse_config
from locedit.plan import resolve_plan
from rows import assert_rows_equal

CONFIG = {
    "study": {"name": "shared-path"},
    "data": {"dataset": "counterfact", "filter": "none", "sample": 1, "seed": 0},
    "localization": {"kinds": [], "samples": 2},
    "editing": {"problems": ["error_injection", "fact_forcing"], "methods": ["rome", "r-rome", "memit", "ft-1", "ft-5"],
                "layers": [0, 2], "essence": False, "forcing_edit_samples": 1, "covariance_tokens": 256},
    "hparams": {"rome": {"v_num_grad_steps": 3, "context_lengths": [[3, 1]]},
                "r-rome": {"v_num_grad_steps": 3, "context_lengths": [[3, 1]]},
                "memit": {"v_num_grad_steps": 3, "context_lengths": [[3, 1]]},
                "ft-1": {"num_steps": 3, "lr": 0.02}, "ft-5": {"num_steps": 3, "lr": 0.02}},
}


def test_shared_path_rows_equal_one_edit_at_a_time(tiny_llama, tmp_path, monkeypatch):
    from locedit.problems import load_dataset
    from locedit.study import run_unit

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))  # the tiny model's own key statistics
    # float64: Adam's first steps move each element by ~lr·sign(gradient), so float32 summation noise in a
    # near-zero gradient entry of a random tiny model flips a whole step (one thread, AMD EPYC: v* losses 11.0407 vs
    # 11.0445 after 3 steps); in float64 the two paths meet the same tolerances without that amplified noise
    model = tiny_llama(name="tiny-shared-path", dtype=torch.float64)
    config = parse_config(CONFIG)
    dataset = load_dataset("counterfact")
    facts = dataset[:1]
    plan = resolve_plan(config, model, [f.id for f in facts])
    units = plan.units()
    assert len(units) == 2 * 5 * 2  # problems x methods x layers
    by_id = {f.id: f for f in facts}
    memo: dict = {}
    for u in units:
        table, shared = run_unit(model, by_id[u.fact_id], u, plan, dataset, memo)
        _, alone = run_unit(model, by_id[u.fact_id], u, plan, dataset, None)
        assert table == "edits", shared
        skip = {"seconds", "edit_seconds"}
        assert_rows_equal({k: v for k, v in shared.items() if k not in skip},
                          {k: v for k, v in alone.items() if k not in skip}, rel=1e-5, abs_=1e-7, context=(u.key(),))
    targets = memo["targets"]
    # per problem: ROME's v* at layers 0 and 2 (one batch), MEMIT's z at layer 2 (both windows clip to 0..2), FT-1's
    # two layers (one batch), FT-5's one clipped window; reused: ROME at 2, r-ROME at 0 and 2, MEMIT, FT-1 and FT-5
    # at their second layer
    assert targets.computed == 2 * (2 + 1 + 2 + 1)
    assert targets.reused == 2 * (1 + 2 + 1 + 1 + 1)
