"""docs/TUNING.md's tables are generated from the shipped tuned tables (tracer/data/tuned/), so the document and the
values the editors run with cannot drift apart; the generator marks what the rule admits and what it chose."""

import json
from pathlib import Path

import pytest

from locedit.cli import main
from locedit.findings import update_document
from locedit.tracer.profiles import TUNED_FORMAT
from locedit.tuning_doc import TUNING_BLOCK_KINDS, tuning_blocks, write_tuning_doc

ROOT = Path(__file__).resolve().parent.parent


def _row(point, rewrite, neighborhood, stage="paper"):
    return {"point": json.dumps(point, sort_keys=True), **point, "n": 3, "rewrite_mean": rewrite, "rewrite_sd": 0.1,
            "paraphrase_mean": 0.2, "neighborhood_mean": neighborhood, "opt_p_target_mean": 0.9,
            "opt_steps_mean": 20.0, "edit_seconds_mean": 1.5, "rewrite_heldout_noise_mean": float("nan"),
            "stage": stage}


def _table(tmp_path: Path, edit_layer=None) -> Path:
    rule = {"ceiling": 0.99, "neighborhood_tolerance": 0.05, "reach": 0.9}
    grid = [_row({"kl_factor": 0.0625}, 0.995, 0.97),   # above the ceiling: not admissible
            _row({"kl_factor": 0.9}, 0.93, 0.96),       # admissible, the highest rewrite: chosen
            _row({"kl_factor": 1.0}, 0.91, 0.90)]       # neighborhood 0.07 below the grid's best: not admissible
    entry = {"problem": "error_injection", "method": "rome", "overrides": {"kl_factor": 0.9}, "within_rule": True,
             "widened": False, "rewrite_mean": 0.93, "paraphrase_mean": 0.2, "neighborhood_mean": 0.96,
             "provenance": {"model": "tiny", "layer": 2, "facts": ["cf:1", "cf:2", "cf:3"], "rule": rule,
                            "date": "2026-12-02", "locedit": "0.1.0", "table": grid}}
    d = tmp_path / "tuned"
    d.mkdir()
    (d / "tiny.json").write_text(json.dumps({"format": TUNED_FORMAT, "family": "tiny", "entries": [entry],
                                             "edit_layer": edit_layer}))
    return d


def test_the_blocks_mark_admissible_and_chosen_points(tmp_path):
    blocks = tuning_blocks(_table(tmp_path))
    assert set(blocks) == {f"tiny-{k}" for k in TUNING_BLOCK_KINDS}
    assert "| Error Injection × ROME (1 layer) | kl_factor 0.9 | 0.930 |" in blocks["tiny-chosen"]
    rows = [r for r in blocks["tiny-grids"].splitlines() if r.startswith("| ") and "paper" in r]
    assert len(rows) == 3
    assert rows[0].endswith("| no |") and rows[2].endswith("| no |")  # the ceiling; the neighborhood tolerance
    assert rows[1].startswith("| **paper** | **0.9** |") and rows[1].endswith("| **yes** |")
    assert "No layer sweep is installed" in blocks["tiny-layers"]


def test_the_layer_block_shows_the_sweep_and_its_choice(tmp_path):
    table = [{"layer": 1, "n": 3, "rewrite_mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "paraphrase_mean": 0.1,
              "neighborhood_mean": 0.9, "diff_vs_best": -0.3, "p_vs_best_holm": 0.0004, "indistinguishable": False,
              "trace_peaks": 2},
             {"layer": 3, "n": 3, "rewrite_mean": 0.8, "ci_low": 0.7, "ci_high": 0.9, "paraphrase_mean": 0.1,
              "neighborhood_mean": 0.9, "diff_vs_best": 0.0, "p_vs_best_holm": None, "indistinguishable": True,
              "trace_peaks": 0}]
    layer = {"layer": 3, "method": "rome", "problem": "error_injection", "indistinguishable": [3],
             "provenance": {"facts": ["cf:1", "cf:2", "cf:3"], "date": "2026-12-02", "peak_layers": [1, 1, 2],
                            "table": table}}
    block = tuning_blocks(_table(tmp_path, layer))["tiny-layers"]
    assert "chosen: **layer 3**" in block and "peaks: 1, 1, 2" in block
    assert "| 1 | 0.500 [0.400, 0.600] | 0.100 | 0.900 | no | -0.300 (< 0.001) | no | 2 |" in block
    assert "| **3** |" in block and "**best**" in block
    assert "| **no** | **best** |" in block  # neither layer reaches 0.9: the highest rewrite, none admissible


def test_a_document_is_regenerated_and_checked(tmp_path, capsys):
    tuned = _table(tmp_path)
    doc = tmp_path / "T.md"
    doc.write_text("prose\n<!-- tuning:tiny-chosen -->\nstale\n<!-- /tuning:tiny-chosen -->\nmore prose\n")
    assert not write_tuning_doc(doc, tuned_dir=tuned, check=True) and "stale" in doc.read_text()
    assert not write_tuning_doc(doc, tuned_dir=tuned)
    text = doc.read_text()
    assert "stale" not in text and "kl_factor 0.9" in text and text.endswith("more prose\n")
    assert write_tuning_doc(doc, tuned_dir=tuned, check=True)
    with pytest.raises(ValueError, match="unknown tuning block"):
        update_document("<!-- tuning:other-chosen -->\n<!-- /tuning:other-chosen -->\n", {}, prefix="tuning")
    # findings blocks are not tuning blocks and stay as they are
    assert update_document("<!-- findings:x -->\nkeep\n<!-- /findings:x -->\n", {}, prefix="tuning").count("keep") == 1


def test_the_shipped_tuning_document_is_current(capsys):
    text = (ROOT / "docs" / "TUNING.md").read_text()
    assert all(f"<!-- tuning:smollm2-{k} -->" in text for k in TUNING_BLOCK_KINDS)
    assert main(["tuning-doc", "--doc", str(ROOT / "docs" / "TUNING.md"), "--check"]) == 0, (
        "docs/TUNING.md is out of date with tracer/data/tuned/: run `locedit tuning-doc`")
    assert "up to date" in capsys.readouterr().out
