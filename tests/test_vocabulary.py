"""One vocabulary, one model profile, one corruption, one fast path (issue "consolidate the design")."""

import math
import re
from pathlib import Path

import pytest
import torch

from locedit.editors import EDIT_METHODS, default_hparams, method_layers, resolve_method
from locedit.editors.hparams import FTHyperParams, MEMITHyperParams, ROMEHyperParams
from locedit.problems import PROBLEMS
from locedit.tracer import (
    CORRUPTIONS,
    FALLBACK_PROFILE,
    TRACING_ALGORITHMS,
    TRACING_KINDS,
    GaussianNoise,
    SubjectFlip,
    TraceResult,
    UndefinedEffectError,
    Zeroing,
    as_corruption,
    embedding_std,
    profile_for,
    trace,
    tracing_frame,
    window_layers,
)
from locedit.tracer.atomic import atomic_path, write_atomic

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tracer", "editors", "problems", "stats", "locedit")
P, S, O = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French"


def _files_mentioning(word: str) -> set[str]:
    out = set()
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            if re.search(re.escape(word), f.read_text(encoding="utf-8")):
                out.add(str(f.relative_to(ROOT)))
    return out


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_each_problem_name_is_declared_in_at_most_two_source_files(name):
    files = _files_mentioning(f'"{name}"') | _files_mentioning(name)
    assert len(files) <= 2, files
    assert "problems/variants.py" in files


def test_stats_labels_and_orders_come_from_the_registries():
    from locedit.stats.tables import METHOD_LABELS, METHOD_ORDER, PROBLEM_LABELS, PROBLEM_ORDER, method_label

    assert PROBLEM_ORDER == tuple(PROBLEMS) and METHOD_ORDER == tuple(EDIT_METHODS)
    assert PROBLEM_LABELS == {n: p.label for n, p in PROBLEMS.items()}
    assert METHOD_LABELS == {n: m.label for n, m in EDIT_METHODS.items()}
    assert method_label("ft-5") == "FT (5 layers)" and method_label("rome", short=True) == "ROME"


def test_config_and_cli_choices_read_the_registries():
    from locedit.cli import build_parser
    from locedit.config import ConfigError, parse_config

    for m in EDIT_METHODS:
        assert parse_config({"editing": {"methods": [m]}, "hparams": {m: {}}}).editing.methods == (m,)
    for p in PROBLEMS:
        assert parse_config({"editing": {"problems": [p]}}).editing.problems == (p,)
    with pytest.raises(ConfigError, match="unknown edit method 'ft'"):
        parse_config({"editing": {"methods": ["ft"]}})
    with pytest.raises(ConfigError, match=r"unknown \[hparams.<edit method>\] section 'ft'"):
        parse_config({"hparams": {"ft": {"num_steps": 3}}})
    parser = build_parser()
    trace_cmd = parser._subparsers._group_actions[0].choices["trace"]
    choices = {a.dest: a.choices for a in trace_cmd._actions if a.choices}
    assert tuple(choices["kind"]) == tuple(TRACING_KINDS) and tuple(choices["algorithm"]) == TRACING_ALGORITHMS


def test_edit_method_registry_entries():
    assert resolve_method("FT").name == "ft-1"  # the algorithm alias, where layers are explicit
    with pytest.raises(ValueError, match="unknown edit method 'ft'"):
        resolve_method("ft", aliases=False)  # ambiguous at study level
    assert EDIT_METHODS["ft-5"].parameter_names([3]) == ["blocks.3.mlp.W_out", "blocks.3.mlp.b_out"]
    assert method_layers("ft-5", 30, 1) == (0, 1, 2, 3) == tuple(window_layers(1, 5, 30))
    assert {m.hparams for m in EDIT_METHODS.values()} == {FTHyperParams, ROMEHyperParams, MEMITHyperParams}


def test_window_rule_is_the_reference_rule():
    for L in (1, 5, 30):
        for w in (1, 2, 3, 5, 10):
            for layer in range(L):
                got = window_layers(layer, w, L)
                assert got == range(max(0, layer - w // 2), min(L, layer - (-w // 2)))
                assert layer in got and len(got) <= w


def test_profiles_and_the_fallback():
    assert profile_for("SmolLM2-135M-Instruct").family == "smollm2"
    assert profile_for("EleutherAI/gpt-j-6B").family == "gpt-j" and profile_for("gpt2-xl").family == "gpt2-xl"
    unknown = profile_for("some-new-model")
    assert unknown is FALLBACK_PROFILE and unknown.edit_layer(28) == 5 and unknown.edit_layer(56) == 10
    assert default_hparams("memit", "some-new-model") == MEMITHyperParams()  # reference values
    assert default_hparams("memit", "smollm2").mom2_update_weight == 5000.0
    assert default_hparams("ft-1", "gpt2-xl").norm_constraint == 1e-3
    assert profile_for("gpt-j").edit_layer(28) == 5
    # SmolLM2's default edit layer is the layer sweep's choice (`locedit tune --layers`, tracer/data/tuned/smollm2.json),
    # not GPT-J's 5 of 28 scaled (which the profile alone would give)
    assert profile_for("smollm2").edit_layer(30) == 15 and profile_for("smollm2").default_edit_layer is None


def test_a_bare_float_means_the_same_noise_everywhere(model):
    """``run_edit(..., noise=3.0)`` and ``trace(..., noise=3.0)`` use the same sigma (3 x the s3 rule's std): a bare
    float used to be an absolute sigma in run_edit."""
    from locedit.problems.variants import default_noise
    from locedit.tracer.corruption import noise_std

    sigma = 3.0 * noise_std(model, "s3")
    assert sigma != pytest.approx(3.0 * embedding_std(model), rel=1e-3)  # the s3 rule, not std(W_E)
    t = trace(model, P, S, O, noise=3.0, samples=2, cells={8: [3]})
    assert t.sigma == pytest.approx(sigma)
    assert default_noise(model, 3.0).sigma == pytest.approx(sigma)
    assert as_corruption(3.0).resolve(model).sigma == pytest.approx(sigma)
    assert GaussianNoise(sigma=0.5).resolve(model).sigma == 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_noise_values_are_validated_once(bad):
    with pytest.raises(ValueError, match="finite and > 0"):
        GaussianNoise(scale=bad)
    with pytest.raises(ValueError, match="finite and > 0"):
        GaussianNoise(sigma=bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        GaussianNoise(scale=None, sigma=1.0, samples=1, values=torch.full((1, 2, 3), float("nan")))
    with pytest.raises(ValueError):
        SubjectFlip("  ")


def test_corruption_objects_drive_trace(model):
    flip = trace(model, P, S, O, noise=SubjectFlip("Barack Obama"), cells={9: [29]})
    kw = trace(model, P, S, O, corrupt="flip", flip_subject="Barack Obama", cells={9: [29]})
    assert flip.corrupt == "flip" and torch.equal(flip.grid.nan_to_num(-1), kw.grid.nan_to_num(-1))
    z = trace(model, P, S, O, noise=Zeroing())
    assert z.corrupt == "zero" and z.p_noised is None
    assert set(CORRUPTIONS) == {"noise", "flip", "zero"} and CORRUPTIONS["zero"].effect == "deleted"


def _result(grid, p_clean, p_noised, corrupt="noise"):
    return TraceResult(tokens=("a", "b"), subject_span=(0, 1), grid=torch.tensor(grid, dtype=torch.float64),
                       p_clean=p_clean, p_noised=p_noised, kind="mlp", window=5, algorithm="exact", sigma=0.1,
                       corrupt=corrupt)


def test_one_degenerate_convention_nan_and_no_peak():
    r = _result([[0.3, 0.3], [0.3, 0.3]], 0.3, 0.3)
    assert torch.isnan(r.fractional()).all()
    with pytest.raises(UndefinedEffectError):
        r.peak_layer()
    z = _result([[0.0, 0.0], [0.0, 0.0]], 0.0, None, corrupt="zero")
    assert torch.isnan(z.fractional()).all()
    z = _result([[0.1, 0.4], [0.4, 0.4]], 0.4, None, corrupt="zero")
    torch.testing.assert_close(z.fractional()[0], torch.tensor([0.75, 0.0], dtype=torch.float64))


def test_record_round_trip_and_one_long_table():
    r = _result([[0.5, 0.1], [0.2, 0.9]], 0.9, 0.1)
    back = TraceResult.from_record(r.to_record())
    assert torch.equal(back.grid, r.grid) and back.p_noised == r.p_noised and back.algorithm == "exact"
    df = tracing_frame([{**r.to_record(), "fact_id": "f"}])
    assert df.equals(r.to_frame("f"))
    assert df["fractional"].to_list() == pytest.approx([0.5, 0.0, 0.125, 1.0])
    old = {"fact_id": "f", "kind": "mlp", "window": 5, "tokens": ["a", "b"], "subject_span": [0, 1],
           "grid": [[0.5, 0.1], [0.2, 0.9]], "p_clean": 0.9, "p_noised": 0.1, "sigma": 0.1}  # a record of format 1
    with pytest.raises(KeyError):  # no read-side fallbacks: `locedit migrate` is the one place old runs are read
        tracing_frame([old])
    from locedit.stats.collapse import with_fractional

    assert with_fractional(df)["fractional"].to_list() == df["fractional"].to_list()


def test_atomic_writes_leave_no_temporaries(tmp_path):
    write_atomic(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "folder", directory=True) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_path(tmp_path / "folder", directory=True) as tmp:
        (tmp / "x").write_text("done")
    assert (tmp_path / "folder" / "x").read_text() == "done"


@torch.no_grad()
def test_suffix_runner_backends_agree(model):
    """The lean and TransformerLens backends of the one suffix runner give the same block outputs on ragged rows
    with a restoration and a query-position subset."""
    from locedit.tracer.suffix import Restore, SuffixRunner

    toks = model.to_tokens(["The mother tongue of Danielle Darrieux is", "Danielle Darrieux was born in Paris"])
    _, cache = model.run_with_cache(toks)
    j = 7
    starts = torch.tensor([4, 2])
    width = 3
    x = torch.stack([cache[f"blocks.{j}.hook_resid_pre"][r, s : s + width] for r, s in enumerate(starts.tolist())])
    restore = Restore("mlp", torch.tensor([True, False]), 0, torch.randn(model.cfg.d_model))
    out = {}
    for lean in (True, False):
        run = SuffixRunner(model, lean=lean)
        prefix = run.prefix(j, cache[f"blocks.{j}.attn.hook_k"], cache[f"blocks.{j}.attn.hook_v"])
        out[lean] = run.block(j, x, prefix, starts=starts, query_positions=torch.tensor([0, 2]), restore=restore)
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)
    # without the restoration, row 1 is the full model's own block output at its positions
    run = SuffixRunner(model, lean=True)
    prefix = run.prefix(j, cache[f"blocks.{j}.attn.hook_k"], cache[f"blocks.{j}.attn.hook_v"])
    plain = run.block(j, x, prefix, starts=starts)
    torch.testing.assert_close(plain[1], cache[f"blocks.{j}.hook_resid_post"][1, 2:5], rtol=1e-4, atol=1e-4)
    assert not math.isclose(float((out[True][0, 0] - plain[0, 0]).abs().max()), 0.0)
