"""docs/FINDINGS.md: its tables are generated from the shipped reference study (and say so), the paper's numbers are
transcribed consistently, and the block machinery keeps the prose."""

import math
from pathlib import Path

import pytest

from locedit.findings import FINDINGS_BLOCKS, update_document, write_findings
from locedit.stats.paper import PAPER_TABLE2_ROME, PAPER_TABLE3
from locedit.stats.tables import METHOD_LABELS, PROBLEM_LABELS

ROOT = Path(__file__).resolve().parent.parent


def test_paper_table3_is_transcribed_consistently():
    # 4 methods x 5 problems, keyed by the registries' labels; Diff = Both - Layer up to the printed rounding
    assert len(PAPER_TABLE3) == 20
    for (problem, method), row in PAPER_TABLE3.items():
        assert problem in PROBLEM_LABELS.values() and method in METHOD_LABELS.values()
        assert abs(row.both - row.layer - row.diff) <= 0.0015, (problem, method)
        assert row.trace <= row.both + 1e-9 and row.layer <= row.both + 1e-9
    assert math.isclose(PAPER_TABLE2_ROME.both - PAPER_TABLE2_ROME.layer, PAPER_TABLE2_ROME.diff, abs_tol=1e-9)


def test_update_document_replaces_only_the_blocks_and_names_unknown_ones():
    text = "intro\n<!-- findings:table1 -->\nold\n<!-- /findings:table1 -->\nprose stays\n"
    assert update_document(text, {"table1": "| new |\n"}) == (
        "intro\n<!-- findings:table1 -->\n| new |\n<!-- /findings:table1 -->\nprose stays\n")
    with pytest.raises(ValueError, match="unknown findings block"):
        update_document(text.replace("table1", "tabel1"), {"table1": ""})


@pytest.mark.parametrize("doc, study", [("FINDINGS.md", "reference"), ("FINDINGS-v1.md", "reference-v1")])
def test_findings_documents_are_generated_from_their_shipped_studies(doc, study):
    path = ROOT / "docs" / doc
    text = path.read_text()
    assert all(f"<!-- findings:{name} -->" in text for name in FINDINGS_BLOCKS)
    assert write_findings(ROOT / "studies" / study, path, check=True), (
        f"docs/{doc} is out of date with studies/{study}: run `locedit findings studies/{study} --doc docs/{doc}`")


def test_the_fact_block_also_fits_without_the_last_layer_where_a_target_vector_cannot_reach_the_prediction():
    """ROME's v* at the model's last layer has no path to the prediction: its rows get a second fit without that
    layer (statsmodels on the subset); FT's do not (its weights act at every position)."""
    import numpy as np
    import polars as pl
    import statsmodels.formula.api as smf

    from locedit.findings import _fact_block

    rng = np.random.default_rng(0)
    rows = [{"fact_id": f"cf:{f}", "problem": "error_injection", "method": m, "layer": layer,
             "rewrite_score": 0.0 if (m == "rome" and layer == 3) else float(rng.uniform())}
            for m in ("rome", "ft-1") for f in range(6) for layer in (0, 1, 3)]
    edits = pl.DataFrame(rows)
    md = _fact_block(edits, n_layers=4)
    assert "ROME (1 layer), without layer 3 (the last)" in md and "FT (1 layer), without" not in md
    sub = edits.filter((pl.col("method") == "rome") & (pl.col("layer") != 3)).to_pandas()
    expect = smf.ols("rewrite_score ~ C(layer)", sub).fit().rsquared
    line = next(row for row in md.splitlines() if "without layer 3" in row)
    assert line.split("|")[4].strip() == f"{expect:.3f}"
    assert "without" not in _fact_block(edits, n_layers=5)  # the last layer (4) was not edited
