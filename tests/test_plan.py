"""The resolved plan, the run directory, the run format and its migration, the one namespace (issue 23).

Fast tier: a tiny random Llama-family model with the embedded model's tokenizer; the σ of the embedded model itself
is checked in the slow tier (`test_every_entry_point_gives_the_same_sigma`)."""

import ast
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from locedit.config import ConfigError, parse_config
from locedit.plan import SCHEMA_VERSION, EditUnit, StudyPlan, TraceUnit, UnitKeyError, parse_key, resolve_plan
from locedit.rundir import OutdatedRunDirError, RunDir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama(name="tiny-plan-llama")


# ----------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("unit", [
    TraceUnit("cf:12", "noise", "mlp", 5), TraceUnit("known:3", "attribution", "resid", 1),
    EditUnit("cf:12", "fact_forcing", "rome", 29, "subject_last"), EditUnit("cf:12", "error_injection", "memit", 0, -1),
    EditUnit("cf:12", "error_injection", "rome", 4, 2), EditUnit("zsre:7", "fact_erasure", "ft-5", 12, None),
])
def test_unit_keys_round_trip(unit):
    assert parse_key(unit.key()) == unit


@pytest.mark.parametrize("key", ["trace|cf:1|mlp|w5", "edit|cf:1|error_injection|rome", "edit|cf:1|a|b|Lx",
                                 "trace|cf:1|mlp|w5|noise|extra", "nonsense"])
def test_keys_of_another_format_are_typed_errors(key):
    with pytest.raises(UnitKeyError, match="not a unit key"):
        parse_key(key)


# ----------------------------------------------------------------------------------------------- one setting end to end
STUDY = {
    "study": {"name": "plan-e2e"},
    "data": {"dataset": "counterfact", "filter": "none", "sample": 2, "seed": 3},
    "localization": {"methods": ["noise"], "kinds": ["mlp"], "windows": [1], "samples": 2, "noise": 2.0},
    "editing": {"problems": ["error_injection", "fact_forcing"], "methods": ["rome", "ft-1"], "layers": [1],
                "tokens": ["subject_last", "prompt_last"], "essence": False, "forcing_edit_samples": 1,
                "covariance_tokens": 512},
    "hparams": {"rome": {"v_num_grad_steps": 3, "context_lengths": []}, "ft-1": {"num_steps": 2}},
}


def test_a_setting_arrives_where_it_is_used_as_the_plan_resolved_it(tiny, tmp_path, monkeypatch):
    """``[editing] tokens``, the noise scale and one hyper-parameter go config -> plan -> unit -> editor / tracer
    unchanged, and provenance.json records them."""
    import locedit.editors.methods as methods
    import locedit.problems.localize as localize
    from locedit.study import run_study
    from locedit.tracer.corruption import noise_std

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))  # the tiny model's own key statistics
    seen = {"rome": [], "ft": [], "trace": []}
    real_rome, real_ft, real_trace = methods.execute_rome, methods.execute_ft, localize.trace

    def rome_spy(model, request, layer, hp, objective, noise, **kw):
        seen["rome"].append((layer, hp, noise, kw["token"]))
        return real_rome(model, request, layer, hp, objective, noise, **kw)

    def ft_spy(model, request, layers, hp, objective, noise, **kw):
        seen["ft"].append((tuple(layers), hp, noise))
        return real_ft(model, request, layers, hp, objective, noise, **kw)

    def trace_spy(*args, noise=None, **kw):
        seen["trace"].append(noise)
        return real_trace(*args, noise=noise, **kw)

    monkeypatch.setattr(methods, "execute_rome", rome_spy)
    monkeypatch.setattr(methods, "execute_ft", ft_spy)
    monkeypatch.setattr(localize, "trace", trace_spy)
    config = parse_config(STUDY)
    run = tmp_path / "run"
    summary = run_study(config, run, model=tiny, progress=False)
    # 2 facts x (1 grid + 2 problems x (ROME at 2 tokens + FT-1 once) at 1 layer)
    assert summary.failed == 0 and summary.done == 2 * (1 + 2 * 3)

    prov = json.loads((run / "provenance.json").read_text())["plan"]
    sigma = 2.0 * noise_std(tiny, "s3")
    assert prov["noise"] == {"sigma": pytest.approx(sigma, rel=1e-12), "rule": "s3", "scale": 2.0, "samples": 2,
                             "seed": 0}
    assert prov["hparams"]["fact_forcing|rome"]["v_num_grad_steps"] == 3
    assert prov["hparams"]["error_injection|ft-1"]["num_steps"] == 2
    assert prov["tokens"] == {"rome": ["subject_last", "prompt_last"], "ft-1": [None]}
    assert prov["covariance_tokens"] == 512 and prov["layers"] == [1] and prov["n_facts"] == 2

    assert len(seen["trace"]) == 2 and all(n.sigma == prov["noise"]["sigma"] and n.samples == 2 for n in seen["trace"])
    assert sorted(tok for *_, tok in seen["rome"]) == ["prompt_last"] * 4 + ["subject_last"] * 4
    assert all(hp.v_num_grad_steps == 3 and hp.context_lengths == () and layer == 1
               for layer, hp, _, _ in seen["rome"])
    forced = [n for _, _, n, _ in seen["rome"] if n is not None]  # Fact Forcing: the plan's draw, first sample only
    assert len(forced) == 4 and all(n.sigma == prov["noise"]["sigma"] and n.samples == 1 for n in forced)
    assert len(seen["ft"]) == 4 and all(hp.num_steps == 2 and layers == (1,) for layers, hp, _ in seen["ft"])

    edits = pl.read_parquet(run / "edits.parquet")
    assert set(zip(edits["method"], edits["token"])) == {("rome", "subject_last"), ("rome", "prompt_last"),
                                                         ("ft-1", "subject_last")}  # FT rows: the table's convention
    assert all(parse_key(k) for k in edits["key"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["schema_version"] == SCHEMA_VERSION and parse_config(cfg) == config
    assert cfg["analysis"]["bound"] == "none"  # [analysis] is declared in config.json before any unit runs

    # a resume keeps the recorded plan, and says so when today's code would resolve it differently
    rd = RunDir(run)
    other = resolve_plan(parse_config({**STUDY, "hparams": {"rome": {"v_num_grad_steps": 4}}}), tiny, rd.fact_ids())
    with pytest.warns(UserWarning, match="v_num_grad_steps 3 -> 4"):
        kept = rd.fix_plan(lambda: other, json.loads((run / "provenance.json").read_text()))
    assert kept.hparams[("error_injection", "rome")].v_num_grad_steps == 3
    assert StudyPlan.from_json(prov, config, rd.fact_ids()).to_json() == prov  # the record round-trips exactly


def test_a_run_directory_refuses_another_config_with_the_sections_that_differ(tiny, tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.start(parse_config(STUDY))
    rd.start(parse_config(STUDY))  # the same config: a resume
    with pytest.raises(ValueError, match=r"another config.*localization\.noise"):
        rd.start(parse_config({**STUDY, "localization": {**STUDY["localization"], "noise": 3.0}}))


# ----------------------------------------------------------------------------------------------- run format, migration
def _v1_run(path: Path) -> Path:
    """A run directory of format 1: flat config.json with a [tracing] section written before noise_scale_rule
    existed, noise and default-token keys without their suffix, a compressed and a plain journal."""
    (path / "journal").mkdir(parents=True)
    flat = {"name": "old", "model": "smollm2-135m",
            "data": {"dataset": "counterfact", "filter": "none", "sample": 2, "seed": 0},
            "tracing": {"kinds": ["mlp"], "windows": [5], "samples": 10, "noise": 3.0, "sigma": None,
                        "seed": 0},
            "editing": {"problems": ["error_injection"], "methods": ["rome", "ft-1"], "layers": [4],
                        "essence": False},
            "hparams": {}}
    (path / "config.json").write_text(json.dumps(flat, indent=2))
    (path / "facts.json").write_text(json.dumps(["cf:1", "cf:2"]))
    hp = {"error_injection|rome": {"v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5,
                                   "clamp_norm_factor": 4.0, "kl_factor": 1.0, "mom2_adjustment": True,
                                   "context_lengths": [[5, 10], [10, 10]], "early_stop_loss": 0.05},
          "error_injection|ft-1": {"lr": 5e-4, "num_steps": 25, "norm_constraint": 1e-3, "skip_loss": 0.01}}
    (path / "provenance.json").write_text(json.dumps({"threads": 2, "device": "cpu", "hparams": hp,
                                                      "model": {"name": "SmolLM2-135M-Instruct", "n_layers": 30}}))
    trace = {"tokens": ["a", "b"], "subject_span": [0, 1], "grid": [[0.5, 0.1], [0.2, 0.9]], "p_clean": 0.9,
             "p_noised": 0.1, "kind": "mlp", "window": 5, "algorithm": "exact", "sigma": 0.4067, "samples": 10,
             "corrupt": "noise", "traced": None, "prompt": "a b", "subject": "a", "target": " c",
             "flip_subject": None, "extra": {}, "localization": "noise"}
    lines = [json.dumps({"fact_id": f, **trace, "key": f"trace|{f}|mlp|w5", "seconds": 1.0}) for f in ("cf:1", "cf:2")]
    with gzip.GzipFile(path / "journal" / "tracing.shard-0-of-1.jsonl.gz", "wb", mtime=0) as gz:
        gz.write(("\n".join(lines) + "\n").encode())
    edit = {"problem": "error_injection", "layer": 4, "token": "subject_last", "token_index": 0,
            "rewrite_score": 0.5, "seconds": 2.0}
    rows = [{"fact_id": "cf:1", "method": m, **edit, "key": f"edit|cf:1|error_injection|{m}|L4"} for m in ("rome", "ft-1")]
    (path / "journal" / "edits.shard-0-of-1.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"key": "torn')
    return path


def test_an_unmigrated_run_gets_one_line_and_migrate_rewrites_it_reproducibly(tmp_path, capsys):
    from locedit.cli import main
    from locedit.migrate import migrate_run_dir

    a, b = _v1_run(tmp_path / "a"), _v1_run(tmp_path / "b")
    for argv in (["report", str(a)], ["summary", str(a)], ["findings", str(a), "--check"], ["pack", str(a)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"locedit migrate {a}" in err[0], err
    with pytest.raises(OutdatedRunDirError, match="run format 1"):
        RunDir(a).config()

    report = migrate_run_dir(a)
    assert (report.from_version, report.to_version, report.keys_rewritten, report.records) == (1, 2, 3, 4)
    migrate_run_dir(b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and not p.name.startswith(".lock")
                   and p.suffix != ".parquet")
    for f in files:  # byte-reproducible (Parquet carries a writer version; its content is compared below)
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert pl.read_parquet(a / "edits.parquet").equals(pl.read_parquet(b / "edits.parquet"))

    rd = RunDir(a)
    config = rd.config()
    assert config.localization.noise_scale_rule == "embedding"  # what a [tracing] section without a rule ran with
    assert "analysis" not in rd.raw_config()  # a format-1 run declared no analysis: it stays exploratory
    keys = {r["key"] for t in ("tracing", "edits") for r in rd.records(t)}
    assert keys == {"trace|cf:1|mlp|w5|noise", "trace|cf:2|mlp|w5|noise", "edit|cf:1|error_injection|rome|L4|Tsubject_last",
                    "edit|cf:1|error_injection|ft-1|L4"}
    assert '{"key": "torn' in (a / "journal" / "edits.shard-0-of-1.jsonl").read_text()  # a bad line is not dropped
    plan = json.loads((a / "provenance.json").read_text())
    assert plan["plan"]["noise"]["sigma"] == 0.4067 and plan["plan"]["noise"]["rule"] == "embedding"
    assert plan["plan"]["hparams"]["error_injection|ft-1"]["norm_constraint"] == 1e-3 and "hparams" not in plan
    assert plan["migrated"]["assumed"] and "covariance_tokens" in plan["migrated"]["assumed"][0]
    assert migrate_run_dir(a).summary().endswith("nothing to do")
    assert main(["summary", str(a)]) == 0


def test_the_shipped_studies_are_current_and_their_units_parse():
    for name in ("reber", "tokens", "reference-v1"):
        rd = RunDir(ROOT / "studies" / name)
        assert rd.schema_version() == SCHEMA_VERSION, name
        plan = rd.provenance()["plan"]
        assert plan["noise"]["sigma"] == pytest.approx(0.4067 if name == "tokens" else 0.3500, abs=1e-4), name
        keys = [r["key"] for t in ("tracing", "edits") for r in rd.records(t)]
        units = [parse_key(k) for k in keys]
        edits = [u for u in units if isinstance(u, EditUnit)]
        assert edits and all(u.token is not None for u in edits if u.method == "rome"), name


def test_old_config_sections_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="now called \\[localization\\]"):
        parse_config({"tracing": {"samples": 3}})


# ----------------------------------------------------------------------------------------------- namespace, layering
def test_s3_subjects_are_known_1000s():
    from locedit.problems import load_dataset
    from locedit.tracer.corruption import s3_subjects

    assert s3_subjects() == sorted({f.subject for f in load_dataset("known")})


_LAYERS = {  # what each package may import of locedit's (lower floors only)
    "tracer": {"tracer"},
    "editors": {"tracer", "editors"},
    "problems": {"tracer", "editors", "problems"},
    "stats": {"tracer", "editors", "problems", "stats"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_packages_import_only_their_own_floor_and_below_and_only_through_the_namespace():
    bare = re.compile(r"^(tracer|editors|problems|stats)(\.|$)")
    for pkg, allowed in _LAYERS.items():
        for path in (ROOT / pkg).glob("*.py"):
            mods = _imports(path)
            assert not [m for m in mods if bare.match(m)], (path, "import through locedit.*")
            used = {m.split(".")[1] for m in mods if m.startswith("locedit.") and m.count(".") >= 1}
            assert used <= allowed, (path, used - allowed)
    assert "locedit.editors.methods" not in _imports(ROOT / "editors" / "hparams.py")  # no hparams <-> methods cycle


def test_no_absolute_machine_paths_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(?<![\w.~])/(?:work|home|root|Users|mnt|opt)/\w")
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".gz", ".parquet", ".ipynb", ".html") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, hits


def test_the_wheel_installs_one_top_level_package(tmp_path):
    """``pip install .`` adds exactly one importable top-level package, ``locedit``; ``import stats`` then fails."""
    src, target = tmp_path / "src", tmp_path / "site"  # a copy: a build writes build/ and *.egg-info beside it
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "locedit", "tracer", "editors", "problems", "stats"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-compile", "--target", str(target), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["locedit"], top
    assert {p.name for p in (target / "locedit").iterdir() if p.is_dir()} >= {"tracer", "editors", "problems", "stats"}
    assert (target / "locedit" / "problems" / "data" / "counterfact.json.gz").exists()
    assert (target / "locedit" / "tracer" / "data" / "s3_subjects.json").exists()
    probe = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
             "print([importlib.util.find_spec(n) is not None for n in ('locedit.stats', 'stats', 'tracer', 'problems')])")
    out = subprocess.run([sys.executable, "-I", "-c", probe, str(target)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "[True, False, False, False]", out.stderr
    shutil.rmtree(target)


def test_every_entry_point_gives_the_same_sigma(model, tmp_path, monkeypatch, capsys):
    """``trace()``, ``locedit trace``, ``run_edit`` (o_noise / Fact Forcing) and a default study resolve a bare
    scale 3 to the same σ on the embedded model: ROME's s3 rule, 0.350."""
    import locedit.problems.run as run_mod
    from locedit import tracer
    from locedit.cli import main
    from locedit.problems import load_dataset, run_edit
    from locedit.tracer import trace

    fact = next(f for f in load_dataset("counterfact") if f.id == "cf:0")
    sigmas = {"trace()": trace(model, fact.prompt, fact.subject, fact.o_true, window=1, samples=1).sigma}
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: model)
    assert main(["trace", "--prompt", fact.prompt, "--subject", fact.subject, "--target", fact.o_true,
                 "--window", "1", "--samples", "1", "--out", str(tmp_path / "t.html")]) == 0
    sigmas["locedit trace"] = float(re.search(r"sigma=([\d.]+)", capsys.readouterr().out).group(1))
    seen = []
    real = run_mod.default_noise
    monkeypatch.setattr(run_mod, "default_noise", lambda m, n=None: seen.append(real(m, n)) or seen[-1])
    hp = run_mod.problem_hparams("fact_forcing", "ft-1", model)
    run_edit(model, fact, "fact_forcing", "ft-1", 3, hparams=type(hp)(**{**hp.__dict__, "num_steps": 1}),
             essence=False, edit_samples=1)
    sigmas["run_edit"] = seen[0].sigma
    sigmas["default study"] = resolve_plan(parse_config({}), model, ["cf:0"]).noise.sigma
    assert sigmas["trace()"] == pytest.approx(0.3500, abs=5e-5)
    assert all(s == pytest.approx(sigmas["trace()"], rel=1e-9, abs=5e-5) for s in sigmas.values()), sigmas


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for pattern in
                                        ("configs/*.toml", "studies/*.toml", "studies/next/*.toml")
                                        for p in ROOT.glob(pattern)))
def test_every_shipped_config_parses(path):
    from locedit.config import load_config

    config = load_config(ROOT / path)  # a shipped config that does not parse is a ConfigError here, not at its run
    assert config.name and config.model, path
