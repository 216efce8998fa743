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
