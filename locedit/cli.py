"""The ``locedit`` command line: ``trace``, ``run``, ``report``, ``pack``, ``migrate``, ``findings``, ``summary``,
``status``, ``tune``, ``tuning-doc``, ``info``."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def cmd_trace(args) -> int:
    from locedit.tracer import GaussianNoise, load_model, trace

    noise = GaussianNoise(scale=args.noise, samples=args.samples)  # checked before the model loads
    if args.fact:
        from locedit.problems import load_dataset

        facts = {f.id: f for f in load_dataset(args.dataset)}
        if args.fact not in facts:
            raise ValueError(f"no fact {args.fact!r} in {args.dataset}")
        fact = facts[args.fact]
        prompt, subject, target = fact.prompt, fact.subject, fact.o_true
    else:
        if args.prompt is None or args.subject is None or args.target is None:
            raise ValueError("give --fact ID, or --prompt, --subject and --target")
        prompt, subject, target = args.prompt, args.subject, args.target
        if not target.strip():
            raise ValueError("--target is empty: give the continuation with its leading space, e.g. --target ' French'")
        if not subject.strip() or subject not in prompt:
            raise ValueError(f"--subject {subject!r} does not occur in --prompt {prompt!r}")
    model = load_model(args.model, device=args.device)
    t0 = time.perf_counter()
    res = trace(model, prompt, subject, target, kind=args.kind, window=args.window, noise=noise,
                algorithm=args.algorithm)
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from locedit.tracer.atomic import write_atomic

    write_atomic(out, res.plot().to_html(include_plotlyjs=True, full_html=True))
    print(f"{prompt!r} -> {target!r}: sigma={res.sigma:.4f} ({args.noise:g} x the s3 rule's std) "
          f"p_clean={res.p_clean:.4f} p_noised={res.p_noised:.4f} peak layer={res.peak_layer()} ({secs:.1f} s); "
          f"heatmap: {out}")
    return 0


def cmd_run(args) -> int:
    from locedit.config import load_config
    from locedit.report import write_report
    from locedit.study import run_study

    config = load_config(args.config)
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    if args.executor == "ray":
        from locedit.executor import run_study_ray

        if args.shard != (0, 1):
            raise ValueError("--shard is the no-Ray way to split a study; with --executor ray use --actors")
        summary = run_study_ray(
            config, run_dir, address=args.address, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor, threads_per_actor=args.threads_per_actor, device=args.device,
            limit=args.limit, retry_failed=args.retry_failed,
        )
    else:
        model = None
        if args.device:
            from locedit.tracer import load_model

            model = load_model(config.model, device=args.device)
        summary = run_study(config, run_dir, model=model, limit=args.limit, shard=args.shard,
                            retry_failed=args.retry_failed)
    print(f"study {config.name!r}: {summary.done} units done, {summary.skipped} already done, "
          f"{summary.failed} failed, {summary.seconds:.0f} s -> {run_dir}")
    if summary.stopped is not None:
        print(f"locedit: stopped on {signal.Signals(summary.stopped).name} after a fact's last unit; rerun the same "
              "command to resume", file=sys.stderr)
        return 0
    if not args.no_report and args.shard == (0, 1) and summary.done + summary.skipped > 0:
        path = write_report(run_dir)
        print(f"report: {path}")
    if summary.failed:
        print(f"locedit: {summary.failed} unit(s) failed; tracebacks in {run_dir / 'study.log'}; rerun with "
              "--retry-failed to try them again", file=sys.stderr)
        return 1
    return 0


def _warn_bad_lines(run_dirs) -> None:
    from locedit.rundir import RunDir

    bad = [b for d in run_dirs for b in RunDir(d).bad_lines()]
    if bad:
        where = ", ".join(f"{Path(p).name}:{n}" for p, n in bad[:5]) + (" ..." if len(bad) > 5 else "")
        print(f"locedit: skipped {len(bad)} bad journal line(s) ({where}); the next `locedit run` on the directory "
              "moves them to journal/quarantine.jsonl", file=sys.stderr)


def cmd_report(args) -> int:
    from locedit.report import write_report

    path = write_report(*args.run_dirs, out=args.out)
    _warn_bad_lines(args.run_dirs)
    print(f"report: {path}")
    return 0


def cmd_pack(args) -> int:
    from locedit.rundir import RunDir

    for run_dir in args.run_dirs:
        for path, removed in RunDir(run_dir).pack():
            state = "plain journal removed" if removed else "snapshot: a run is appending to the plain journal"
            print(f"{path} ({path.stat().st_size / 2**10:.0f} KiB; {state})")
    return 0


def cmd_migrate(args) -> int:
    from locedit.migrate import migrate_run_dir

    for run_dir in args.run_dirs:
        print(migrate_run_dir(run_dir).summary())
    return 0


def cmd_findings(args) -> int:
    from locedit.findings import write_findings

    fresh = write_findings(args.run_dir, args.doc, companions=args.companions, check=args.check)
    runs = " + ".join([args.run_dir, *args.companions])
    if args.check:
        print(f"{args.doc}: {'up to date' if fresh else 'out of date'} with {runs}")
        return 0 if fresh else 1
    print(f"{args.doc}: {'unchanged' if fresh else 'tables regenerated'} from {runs}")
    return 0


def cmd_tuning_doc(args) -> int:
    from locedit.tuning_doc import write_tuning_doc

    fresh = write_tuning_doc(args.doc, check=args.check)
    if args.check:
        print(f"{args.doc}: {'up to date' if fresh else 'out of date'} with the shipped tuned tables")
        return 0 if fresh else 1
    print(f"{args.doc}: {'unchanged' if fresh else 'tables regenerated'} from the shipped tuned tables")
    return 0


def cmd_summary(args) -> int:
    import polars as pl

    from locedit.rundir import collect_tables
    from locedit.stats.tables import score_summary, to_markdown

    edits = collect_tables(*args.run_dirs)["edits"]
    _warn_bad_lines(args.run_dirs)
    if edits.is_empty():
        raise ValueError(f"no finished edits in {', '.join(args.run_dirs)}")
    by = [c.strip() for c in args.by.split(",") if c.strip()]
    if "token" in edits.columns and "token" not in by and edits["token"].n_unique() > 1:
        by.insert(by.index("layer") if "layer" in by else len(by), "token")  # a token study: one row per token rule
    table = score_summary(edits, by=by)
    if args.markdown:
        print(to_markdown(table))
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, float_precision=3):
            print(table)
    return 0


def cmd_status(args) -> int:
    from locedit.progress import study_progress

    for d in args.run_dirs:
        print(study_progress(d).text())
    return 0


def _parse_grid(text: str) -> tuple[str, tuple[float, ...]]:
    try:
        name, values = text.split("=", 1)
        return name.strip(), tuple(float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like FIELD=V1,V2,... (e.g. kl_factor=0.0625,0.9,1), "
                                         f"got {text!r}") from None


def cmd_tune(args) -> int:
    import polars as pl

    from locedit.editors.methods import resolve_method
    from locedit.problems import load_dataset
    from locedit.stopping import stop_on_signal
    from locedit.tuning import TuningRule, known_sample, sweep_layers, tune, write_tuned_table
    from locedit.tracer import load_model, profile_for
    from locedit.tracer.profiles import TUNED_DIR

    if args.layers and (len(args.problems) != 1 or len(args.methods) != 1):
        raise ValueError(f"a layer sweep takes one problem and one method, got --problems {' '.join(args.problems)} "
                         f"--methods {' '.join(args.methods)}")
    if args.skip < 0:
        raise ValueError(f"--skip must be >= 0, got {args.skip}")
    model = load_model(args.model, device=args.device)
    profile = profile_for(model)
    layer = args.layer if args.layer is not None else profile.edit_layer(model.cfg.n_layers)
    directory = Path(args.dir or f"tune-{args.model}")
    facts = known_sample(model, load_dataset(args.dataset), args.facts, skip=args.skip,
                         record=directory / "facts.json", dataset=str(args.dataset))
    say = lambda line: print(line, flush=True)  # noqa: E731
    shown = dict(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, float_precision=3)
    installed = TUNED_DIR / f"{profile.family}.json"
    rule = TuningRule(ceiling=args.ceiling, neighborhood_tolerance=args.tolerance, reach=args.reach)
    if args.layers:
        problem, method = args.problems[0], args.methods[0]
        say(f"layer sweep: {method} for {problem} at layers {args.layers} on {len(facts)} known facts of "
            f"{args.dataset} (after the first {args.skip}); journal {directory / 'sweep'}")
        with stop_on_signal("the running fact's layers") as stop:
            sw = sweep_layers(model, facts, problem, method, args.layers, directory=directory / "sweep",
                              progress=say, peaks=not args.no_peaks, rule=rule, stop=stop)
        with pl.Config(**shown):
            print(sw.table.select("layer", "n", "rewrite_mean", "ci_low", "ci_high", "paraphrase_mean",
                                  "neighborhood_mean", "admissible", "diff_vs_best", "p_vs_best_holm",
                                  "indistinguishable", "trace_peaks"))
        say(f"best layer {sw.best_layer} (the highest mean rewrite among layers with rewrite >= {rule.reach} and "
            f"neighborhood within {rule.neighborhood_tolerance} of the best such layer's); not distinguishable from "
            f"it in rewrite (paired t, Holm, alpha 0.05): {sw.indistinguishable}")
        if sw.peak_layers:
            say(f"tracing peaks of the {len(sw.peak_layers)} facts (MLP, window 5), swept layers or not: "
                f"{sorted(sw.peak_layers)}")
        if args.install:
            write_tuned_table(installed, model.cfg.model_name, profile.family, edit_layer=sw)
            say(f"default edit layer {sw.best_layer} written to {installed}")
        return 0
    if args.evaluate:
        from locedit.tuning import evaluate

        say(f"held-out check: the {profile.family} profile's hyper-parameters for {', '.join(args.methods)} × "
            f"{', '.join(args.problems)} at layer {layer} on {len(facts)} known facts (after the first {args.skip})")
        with stop_on_signal("the running edit") as stop:
            table = evaluate(model, facts, args.problems, args.methods, layer, directory=directory / "evaluate",
                             edit_samples=args.edit_samples, progress=say, stop=stop)
        with pl.Config(**shown):
            print(table.drop("hparams"))
        return 0
    def per_method(pairs):  # --grid / --budget FIELD=V1,V2: to every method whose hyper-parameters have FIELD
        if not pairs:
            return None
        out = {}
        for m in args.methods:
            entry = resolve_method(m, aliases=False)
            mine = {f: v for f, v in pairs if f in entry.hparams.__dataclass_fields__}
            if mine:
                out[entry.name] = mine
        return out or None

    grids, budget = per_method(args.grid), per_method(args.budget)
    say(f"tuning {', '.join(args.methods)} for {', '.join(args.problems)} at layer {layer} on {len(facts)} known "
        f"facts of {args.dataset} (after the first {args.skip}): {rule}; journal {directory}")
    with stop_on_signal("the running edit") as stop:
        results = tune(model, facts, args.problems, args.methods, layer, rule=rule, grids=grids, budget=budget,
                       widen=not args.no_widen, directory=directory, edit_samples=args.edit_samples, progress=say,
                       stop=stop)
    for r in results:
        with pl.Config(**shown):
            print(f"\n{r.problem} × {r.method} at layer {r.layer}"
                  + (" (the paper's grid stayed below the reach threshold: optimizer budget searched)" if r.widened
                     else ""))
            print(r.table.drop("point"))
        verdict = "" if r.within_rule else " — NO grid point is admissible (all above the ceiling): lowest rewrite"
        say(f"chosen for {r.problem} {r.method}: {r.chosen} (rewrite {r.chosen_row['rewrite_mean']:.3f}){verdict}")
    table_path = directory / "tuned.json"
    write_tuned_table(table_path, model.cfg.model_name, profile.family, results)
    say(f"tuned table: {table_path}")
    if args.install:
        write_tuned_table(installed, model.cfg.model_name, profile.family, results)
        say(f"installed into the {profile.family} profile: {installed}")
    return 0


def cmd_info(args) -> int:
    import torch
    from locedit.tracer import cache_dir
    from locedit.tracer.models import EMBEDDED_MODEL

    from importlib.metadata import version

    print(f"locedit {version('locedit')}; torch {torch.__version__}; transformer-lens {version('transformer-lens')}")
    print(f"cuda available: {torch.cuda.is_available()}; threads: {torch.get_num_threads()}")
    root = cache_dir()
    print(f"cache: {root} ({'exists' if root.exists() else 'empty'})")
    if root.exists():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            size = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
            print(f"  {sub.name:10s} {size / 2**20:8.1f} MiB")
    from locedit.problems import load_counterfact, load_known, load_zsre

    print(f"data: CounterFact {len(load_counterfact())} facts, zsRE {len(load_zsre())}, known_1000 {len(load_known())}")
    if args.model:
        from locedit.tracer import load_model

        m = load_model(args.model)
        c = m.cfg
        print(f"model {args.model}: {c.model_name}, {c.n_layers} layers, d_model {c.d_model}, d_mlp {c.d_mlp}, "
              f"{c.n_heads} heads, vocab {c.d_vocab}")
    else:
        print(f"default model: {EMBEDDED_MODEL} (load with --model {EMBEDDED_MODEL})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from locedit.editors.methods import EDIT_METHODS
    from locedit.problems.variants import PROBLEMS
    from locedit.tracer.vocab import TRACING_ALGORITHMS, TRACING_KINDS
    from locedit.tuning import TuningRule

    p = argparse.ArgumentParser(prog="locedit", description="Does localization inform editing?")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of this command (default: torch's, one per core); e.g. 1 each for two "
                        "jobs sharing 2 cores (recorded in a study's provenance.json)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("trace", help="trace one fact and write its heatmap (HTML)")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--device", default=None)
    t.add_argument("--fact", help="a fact id, e.g. cf:1234 (from --dataset)")
    t.add_argument("--dataset", default="counterfact")
    t.add_argument("--prompt")
    t.add_argument("--subject")
    t.add_argument("--target", help="with its leading space, e.g. ' French'")
    t.add_argument("--kind", default="mlp", choices=list(TRACING_KINDS))
    t.add_argument("--window", type=int, default=5)
    t.add_argument("--samples", type=int, default=10)
    t.add_argument("--noise", type=float, default=3.0, help="noise scale: a multiplier of the s3 rule's std (ROME's; 3 gives sigma 0.350 on the embedded model)")
    t.add_argument("--algorithm", default="exact", choices=list(TRACING_ALGORITHMS), help="tracing algorithm")
    t.add_argument("--out", default="trace.html")
    t.set_defaults(func=cmd_trace)

    r = sub.add_parser("run", help="run or resume a study from a TOML config")
    r.add_argument("config")
    r.add_argument("--run-dir", default=None, help="default: runs/<study name>")
    r.add_argument("--limit", type=_positive_int, default=None, help="only the first N selected facts (N >= 1)")
    r.add_argument("--shard", type=_parse_shard, default=(0, 1), help="i/n: run facts i, i+n, ...")
    r.add_argument("--retry-failed", action="store_true")
    r.add_argument("--device", default=None)
    r.add_argument("--no-report", action="store_true")
    r.add_argument("--executor", choices=("serial", "ray"), default="serial",
                   help="serial (one process, or --shard i/n) or ray (actors; pip install -e '.[ray]')")
    r.add_argument("--address", default=None, help="ray: a running cluster (auto, HOST:PORT); default: a local Ray")
    r.add_argument("--actors", type=int, default=2, help="ray: number of actors (each loads the model once)")
    r.add_argument("--gpus-per-actor", type=float, default=0.0)
    r.add_argument("--cpus-per-actor", type=float, default=1.0)
    r.add_argument("--threads-per-actor", type=int, default=None, help="ray: torch threads per actor (default: cpus)")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="tables and figures (report.html) from one or more run dirs / shards")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", default=None, help="default: <first run dir>/report.html")
    rep.set_defaults(func=cmd_report)

    pk = sub.add_parser("pack", help="gzip a run directory's journals for shipping (it reports and resumes as is)")
    pk.add_argument("run_dirs", nargs="+")
    pk.set_defaults(func=cmd_pack)

    mg = sub.add_parser("migrate", help="rewrite a run directory of an older run format into the current one "
                        "(config, journal keys, recorded plan); idempotent, byte-reproducible")
    mg.add_argument("run_dirs", nargs="+")
    mg.set_defaults(func=cmd_migrate)

    fd = sub.add_parser("findings", help="regenerate a findings document's tables (docs/FINDINGS.md) from a run dir")
    fd.add_argument("run_dir", help="the study whose pre-registered analysis the document reports")
    fd.add_argument("companions", nargs="*", help="companion runs of the same design (other edit methods, a dense "
                    "layer sweep...: same model, data, localization and noise) merged into the tables")
    fd.add_argument("--doc", default="docs/FINDINGS.md")
    fd.add_argument("--check", action="store_true", help="write nothing; exit 1 if the document is out of date")
    fd.set_defaults(func=cmd_findings)

    td = sub.add_parser("tuning-doc", help="regenerate docs/TUNING.md's tables from the shipped tuned tables "
                        "(tracer/data/tuned/, what `locedit tune --install` wrote)")
    td.add_argument("--doc", default="docs/TUNING.md")
    td.add_argument("--check", action="store_true", help="write nothing; exit 1 if the document is out of date")
    td.set_defaults(func=cmd_tuning_doc)

    sm = sub.add_parser("summary", help="mean scores, probabilities and seconds per problem × method × layer")
    sm.add_argument("run_dirs", nargs="+")
    sm.add_argument("--by", default="problem,method,layer", help="comma-separated grouping columns")
    sm.add_argument("--markdown", action="store_true", help="print a Markdown table")
    sm.set_defaults(func=cmd_summary)

    st = sub.add_parser("status", help="a study's progress from its run directory alone: units done / total per "
                        "stage, seconds per unit, what is left at that rate, its sittings")
    st.add_argument("run_dirs", nargs="+")
    st.set_defaults(func=cmd_status)

    tf = sub.add_parser("tune", help="tune editors for a model by Hase et al.'s rule (App. A), or sweep the edit layer")
    tf.add_argument("--model", default="smollm2-135m")
    tf.add_argument("--device", default=None)
    tf.add_argument("--problems", nargs="+", default=[next(iter(PROBLEMS))], choices=list(PROBLEMS))
    tf.add_argument("--methods", nargs="+", default=["rome"], choices=list(EDIT_METHODS), help="edit methods")
    tf.add_argument("--layer", type=int, default=None, help="default: the model profile's default edit layer")
    tf.add_argument("--facts", type=_positive_int, default=100, help="the first N known facts (the paper: 100)")
    tf.add_argument("--skip", type=int, default=0,
                    help="skip the first K known facts (e.g. 100: disjoint from a study of the first 100)")
    tf.add_argument("--dataset", default="counterfact")
    tf.add_argument("--grid", type=_parse_grid, action="append", default=None,
                    help="replace the paper's grid of a field, e.g. kl_factor=0.0625,0.9,1 (repeatable)")
    tf.add_argument("--budget", type=_parse_grid, action="append", default=None,
                    help="search these optimizer-budget fields instead of the defaults (jointly: every "
                         "combination), e.g. v_lr=0.05,0.5 (repeatable: one per field)")
    rule = TuningRule()  # the rule's defaults, said once
    tf.add_argument("--ceiling", type=float, default=rule.ceiling,
                    help="highest admissible mean rewrite (the paper: 0.99)")
    tf.add_argument("--tolerance", type=float, default=rule.neighborhood_tolerance,
                    help="admissible points keep mean neighborhood within this of the grid's best")
    tf.add_argument("--reach", type=float, default=rule.reach,
                    help="search the optimizer budget when the paper's grid stays below this mean rewrite")
    tf.add_argument("--no-widen", action="store_true", help="never search the optimizer budget")
    tf.add_argument("--layers", type=int, nargs="+", default=None,
                    help="sweep these edit layers instead (first of --problems x --methods, tuned hyper-parameters)")
    tf.add_argument("--no-peaks", action="store_true", help="layer sweep: skip the causal traces of the facts")
    tf.add_argument("--edit-samples", type=_positive_int, default=None,
                    help="Fact Forcing: the edit optimises over the first N noise draws (a study's forcing_edit_samples;"
                         " default all)")
    tf.add_argument("--evaluate", action="store_true",
                    help="score the profile's current (tuned) hyper-parameters instead (use held-out facts: --skip)")
    tf.add_argument("--dir", default=None,
                    help="journal directory (resumable; it also records the fact sample, facts.json); default "
                         "tune-<model>")
    tf.add_argument("--install", action="store_true",
                    help="merge the result into the model family's shipped tuned table (tracer/data/tuned/)")
    tf.set_defaults(func=cmd_tune)

    i = sub.add_parser("info", help="versions, cache, data, and optionally a model's config")
    i.add_argument("--model", default=None)
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (a ``ValueError`` / ``TypeError`` — bad config, name, input — or an ``OSError``:
    a missing file, a full disk, no permission) prints one line and exits 2; Ctrl-C prints one line and exits 130; ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    from locedit.executor import RayUnavailableError
    from locedit.stopping import RunStopped
    from locedit.tracer.models import ModelUnavailableError

    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except RunStopped as e:  # a clean stop on request (SIGTERM / SIGINT at a boundary): not an error
        print(f"locedit: {e}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("locedit: interrupted (finished units are kept; rerun the same command to resume)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ModelUnavailableError, RayUnavailableError) as e:
        if args.debug:
            raise
        print(f"locedit: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
