"""The five problems' targets, the correctness filter's batched greedy decoding, and run_edit, on the embedded model.

Kept cheap (2 shared CPU cores): a few short decodes and two FT edits with 1–2 steps."""

import math

import polars as pl
import pytest
import torch

from locedit.problems import PROBLEMS, load_counterfact, load_known, problem_hparams, run_edit
from locedit.problems.filters import greedy_continuations, known_mask, min_target_prob_mask
from locedit.problems.metrics import erasure_score, neighborhood_score, paraphrase_score, rewrite_score
from locedit.editors import method_layers
from locedit.problems.variants import MissingTargetError, default_noise
from locedit.tracer.corruption import GaussianNoise
from locedit.tracer.probs import target_probs
from locedit.tracer.tokens import encode


@pytest.fixture(scope="module")
def facts():
    return {f.id: f for f in load_counterfact(limit=3)}  # cf:0, cf:13, cf:14


def test_problem_targets_on_a_real_fact(model, facts):
    f = facts["cf:0"]  # The mother tongue of Danielle Darrieux is → French (o_false English)
    assert PROBLEMS["error_injection"].target(model, f) == " English" == f.o_false
    for name in ("fact_erasure", "fact_amplification", "fact_forcing"):
        assert PROBLEMS[name].target(model, f) == " French" == f.o_true
    assert PROBLEMS["fact_erasure"].objective == "minimize"
    assert PROBLEMS["fact_forcing"].noised_input and not PROBLEMS["fact_amplification"].noised_input
    noise = default_noise(model)
    o_noise = PROBLEMS["tracing_reversal"].target(model, f, noise)
    assert o_noise == " a"  # measured: under subject noise the model continues "... is a"
    assert o_noise != f.o_true
    # cross-check with tracer.probs: o_noise beats o_true under the same noise (mean of p over samples)
    p = target_probs(model, [f.prompt] * 2, [o_noise, f.o_true], subjects=[f.subject] * 2, noise=noise)
    assert p[0] > p[1]
    with pytest.raises(MissingTargetError):
        PROBLEMS["error_injection"].target(model, load_known()[0])


def test_problem_hparams_follow_appendix_a():
    assert problem_hparams("error_injection", "rome", tuned=False).kl_factor == 1.0  # GPT-J's App. A: the base
    assert problem_hparams("error_injection", "memit").kl_factor == 0.9
    # the embedded model's tuned table (tracer/data/tuned/smollm2.json, `locedit tune`) goes on top of it
    from locedit.tracer import profile_for

    for (p, m), overrides in profile_for("smollm2-135m").tuned.items():
        hp = problem_hparams(p, m)
        assert all(getattr(hp, k) == v for k, v in overrides.items()), (p, m)
    assert problem_hparams("error_injection", "rome", "EleutherAI/gpt-j-6B").kl_factor == 1.0
    gptj = "EleutherAI/gpt-j-6B"
    assert problem_hparams("error_injection", "ft-1", gptj).norm_constraint == 1e-4
    assert problem_hparams("error_injection", "ft-5", gptj).norm_constraint == 2e-5
    # the embedded model's base (what a tuning run starts from): GPT-J's table with an earlier Error Injection FT
    # bound-only tuning; the tuned table (checked above, whatever it holds) goes on top
    assert problem_hparams("error_injection", "ft-1", "SmolLM2-135M-Instruct", tuned=False).norm_constraint == 1e-2
    assert problem_hparams("error_injection", "ft-5", tuned=False).norm_constraint == 1e-3
    assert problem_hparams("error_injection", "ft-1", "gpt2-xl").norm_constraint == 1e-3
    assert problem_hparams("tracing_reversal", "ft-1", tuned=False).norm_constraint == 1e-5
    ff = problem_hparams("fact_forcing", "ft-1", tuned=False)
    assert ff.num_steps == 50 and ff.norm_constraint == 1e-4
    assert problem_hparams("fact_forcing", "rome", tuned=False).v_num_grad_steps == 25
    # an entry the tuned table does not hold keeps the base
    untuned = [(p, m) for p in ("tracing_reversal", "fact_amplification") for m in ("rome", "ft-1")
               if (p, m) not in profile_for("smollm2-135m").tuned]
    assert all(problem_hparams(p, m) == problem_hparams(p, m, tuned=False) for p, m in untuned)
    assert problem_hparams("fact_amplification", "rome").kl_factor == 0.0625  # default


def test_method_layers_window_and_range():
    assert method_layers("rome", 30, 6) == (6,) and method_layers("ft-1", 30, 0) == (0,)
    assert method_layers("memit", 30, 6) == (4, 5, 6, 7, 8)
    assert method_layers("ft-5", 30, 0) == (0, 1, 2) and method_layers("memit", 30, 29) == (27, 28, 29)
    from locedit.editors import LayerOutOfRangeError

    with pytest.raises(LayerOutOfRangeError, match="n_layers=30"):
        method_layers("rome", 30, 30)
    with pytest.raises(ValueError, match="unknown edit method"):
        method_layers("ft", 30, 3)


def _reference_greedy(model, prompt, n):
    toks = encode(model, prompt)[None]
    for _ in range(n):
        toks = torch.cat([toks, model(toks)[0, -1].argmax().view(1, 1)], 1)
    return model.tokenizer.decode(toks[0, -n:].tolist())


def test_batched_greedy_matches_single_prompt_decoding(model):
    prompts = [  # two of equal token length (one batch), one longer
        "The mother tongue of Danielle Darrieux is",
        "The mother tongue of Jean Galland is",
        "Ferrari F40, developed by",
    ]
    got = greedy_continuations(model, prompts, n_tokens=3, batch_size=8)
    assert got == [_reference_greedy(model, p, 3) for p in prompts]


def test_known_and_min_prob_filters(model, facts):
    fs = [facts["cf:0"], facts["cf:13"]]
    # cf:0 continues " French. She is..." (known); cf:13 " the Italian team of Alessio Ferrari" — Ferrari only
    # after token 4, so with a 4-token budget it is not known, with the paper's 36 it is.
    assert known_mask(model, fs, n_tokens=4, use_cache=False) == [True, False]
    p = target_probs(model, [f.prompt for f in fs], [f.o_true for f in fs])
    assert min_target_prob_mask(model, fs) == [bool(x >= 0.02) for x in p]
    assert min_target_prob_mask(model, fs, threshold=0.0) == [True, True]


def test_run_edit_error_injection_ft(model, facts):
    from locedit.editors import FTHyperParams

    f = facts["cf:0"]
    before = {k: v.clone() for k, v in model.state_dict().items() if "blocks.3.mlp" in k}
    out = run_edit(model, f, "error_injection", "ft-1", 3,
                   hparams=FTHyperParams(num_steps=2, norm_constraint=1e-3), essence=True)
    for k, v in before.items():  # weights restored bit-identically
        assert torch.equal(model.state_dict()[k], v)
    assert out.fact_id == "cf:0" and out.target == " English" and out.layers == (3,) and out.method == "ft-1"
    # pre-edit probabilities are the unedited model's
    p_pre = target_probs(model, [f.prompt, *f.paraphrases, *f.neighborhood], [" English"] * 13)
    assert out.p_rewrite_pre == pytest.approx(float(p_pre[0]), rel=1e-5)
    assert out.p_paraphrase_pre == pytest.approx(float(p_pre[1:3].mean()), rel=1e-5)
    assert out.p_neighborhood_pre == pytest.approx(float(p_pre[3:].mean()), rel=1e-5)
    assert out.p_rewrite_post > out.p_rewrite_pre  # the edit pushed " English"
    assert out.rewrite_score == pytest.approx(rewrite_score(out.p_rewrite_pre, out.p_rewrite_post))
    assert out.overall_score == pytest.approx((out.rewrite_score + out.paraphrase_score + out.neighborhood_score) / 3)
    assert 0.0 <= out.essence_score <= 1.0 and out.ppl_pre > 1.0
    assert out.n_paraphrases == 2 and out.n_neighborhood == 10
    assert out.efficacy_success in (0.0, 1.0) and not math.isnan(out.neighborhood_success)
    row = out.as_row()
    assert row["layers"] == [3]
    assert pl.DataFrame([row]).shape == (1, len(row))


def test_run_edit_fact_forcing_scores_on_noised_subject(model, facts):
    from locedit.editors import FTHyperParams

    f = facts["cf:0"]
    noise = GaussianNoise(sigma=default_noise(model).sigma, samples=3, seed=1)
    out = run_edit(model, f, "fact_forcing", "ft-5", 1, noise=noise,
                   hparams=FTHyperParams(num_steps=1, norm_constraint=1e-3), essence=False)
    assert out.layers == (0, 1, 2, 3) and out.target == " French" and math.isnan(out.essence_score)
    pn = target_probs(model, [f.prompt, *f.paraphrases], [" French"] * 3, subjects=[f.subject] * 3, noise=noise)
    assert out.p_rewrite_pre == pytest.approx(float(pn[0]), rel=1e-5)  # noised, not the clean p
    assert out.p_paraphrase_pre == pytest.approx(float(pn[1:].mean()), rel=1e-5)
    clean = float(target_probs(model, [f.prompt], [" French"])[0])
    assert out.p_rewrite_pre < clean


def test_run_edit_bad_layer_is_a_clear_error(model, facts):
    from locedit.editors import LayerOutOfRangeError

    with pytest.raises(LayerOutOfRangeError, match="out of range"):
        run_edit(model, facts["cf:0"], "fact_erasure", "rome", 99)


def test_fluency_generation_is_seeded_and_cached(model, tmp_path, monkeypatch):
    """The fluency generations are reproducible (same seed, same texts) and the unedited value is cached on disk."""
    from locedit.problems.fluency import generate_texts, generation_entropy, unedited_generation_entropy

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    prompts = ("Danielle Darrieux was born in", "The Eiffel Tower is in")
    a = generate_texts(model, prompts, max_len=24)
    assert a == generate_texts(model, prompts, max_len=24) and a[0].startswith(prompts[0])
    value = generation_entropy(model, prompts, max_len=24)
    assert 0 < value < 10
    assert unedited_generation_entropy(model, prompts, max_len=24) == pytest.approx(value)
    assert len(list((tmp_path / "fluency").rglob("*.json"))) == 1
